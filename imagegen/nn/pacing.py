"""Bounding how much of a lazy graph is in flight on the GPU.

MLX builds a whole transformer step as one lazy graph and the host enqueues it far ahead of the GPU; a temporary is
released only once the kernels that read it have completed, so a step's peak memory grows with the number of blocks.
Running the blocks one by one, each compiled on its own, and pacing the host bounds that: every `every` blocks the
current activations are scheduled and the host waits for the previous segment, so at most two segments'
temporaries exist while the GPU stays fed. H100, Klein 4B pipeline at 1024x1024 (15.0 GB of weights resident): one
compiled graph 60.4 ms peaking at 24.2 GB, paced every block 60.8 ms at 15.6 GB.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import mlx.core as mx


class Pacer:
    """Call after each block with its outputs; a no-op when `every` is 0 (the whole step stays one graph).
    `ahead`: segments the GPU may run ahead of the host: 1 keeps it fed (transformers), 0 waits for each one
    (the VAE, whose layers' temporaries are large)."""

    def __init__(self, every: int, ahead: int = 1):
        self.every, self.ahead = every, ahead
        self.count = 0
        self.pending: tuple[mx.array, ...] | None = None

    def __call__(self, *arrays: mx.array) -> None:
        if not self.every:
            return
        self.count += 1
        if self.count % self.every:
            return
        if not self.ahead:
            mx.eval(*arrays)
            return
        mx.async_eval(*arrays)
        if self.pending is not None:
            mx.eval(*self.pending)  # already scheduled: waits for the previous segment only
        self.pending = arrays


def compile_each(blocks: Sequence[Callable]) -> list[Callable]:
    """One compiled function per block (its weights are captured as constants, as `mx.compile(model)` does)."""
    return [mx.compile(block) for block in blocks]


class PacedBlocks:
    """Mixin for a model whose block lists (attribute names in `paced_lists`) can run paced."""

    paced_lists: tuple[str, ...] = ()

    def pace(self, every: int) -> None:
        """Blocks compiled one by one with the host waiting every `every` blocks; 0 restores the plain blocks (then
        compile the whole call, as the pipelines do)."""
        lists = tuple(compile_each(getattr(self, name)) for name in self.paced_lists) if every else ()
        # a plain attribute, not child modules: the compiled blocks hold the blocks' own weights
        object.__setattr__(self, "_pacing", (every, *lists) if every else None)

    def paced_blocks(self) -> tuple:
        """(every, *block lists) to run: the compiled ones when paced, else the modules themselves."""
        return self.__dict__.get("_pacing") or (0, *(getattr(self, name) for name in self.paced_lists))
