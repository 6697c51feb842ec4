"""Bounding how much of a lazy graph is in flight on the GPU.

MLX builds a whole transformer step as one lazy graph and the host enqueues it far ahead of the GPU; a temporary is
released only once the kernels that read it have completed, so a step's peak memory grows with the number of blocks.
Pacing bounds that: every `every` blocks the current activations are scheduled and the host waits for the previous
segment, so at most two segments' temporaries exist while the GPU stays fed (measured in benchmarks/results/). A
paced step cannot be one compiled graph (the host waits inside it), so its blocks are compiled one by one
(imagegen.nn.compiled); an unpaced step is compiled whole by its pipeline.
"""

from __future__ import annotations

import mlx.core as mx

from .compiled import CompileCache


class Pacer:
    """Call after each block with its outputs; a no-op when `every` is 0 (the whole step stays one graph).
    `ahead`: segments the GPU may run ahead of the host: 1 keeps it fed (transformers), 0 lets a segment start only
    once the previous one has finished (the VAE, whose layers' temporaries are large). Either way the host builds
    the next segment's graph while the GPU runs the current one: waiting happens just before the next launch."""

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
        if self.ahead:
            mx.async_eval(*arrays)
            self.finish()  # already scheduled: waits for the previous segment only
        else:
            # the previous segment's temporaries are freed before this one's are allocated (its launch), yet this
            # one's graph was built while the previous ran: the GPU idles for the wait and launch alone
            self.finish()
            mx.async_eval(*arrays)
        self.pending = arrays

    def finish(self) -> None:
        """Wait for the last scheduled segment (so whatever follows allocates after its temporaries are gone)."""
        if self.pending is not None:
            mx.eval(*self.pending)
            self.pending = None


class PacedBlocks:
    """Mixin for a model whose block lists (attribute names in `paced_lists`) can run paced: `pace(every)` sets how
    often the host waits; `paced_blocks()` gives (every, *block lists) for the call to run with a Pacer(every)."""

    paced_lists: tuple[str, ...] = ()

    def pace(self, every: int) -> None:
        """The host waits every `every` blocks; 0 never (then compile the whole call, as the pipelines do)."""
        object.__setattr__(self, "pace_every", every)  # plain attributes, not child modules

    @property
    def compiled_blocks(self) -> CompileCache:
        """The blocks compiled one by one, by (list name, index); clear it when the weights change."""
        if "_compiled_blocks" not in self.__dict__:
            object.__setattr__(self, "_compiled_blocks", CompileCache())
        return self.__dict__["_compiled_blocks"]

    def paced_blocks(self) -> tuple:
        """(every, *block lists): each block compiled on its own when paced, else the modules themselves."""
        every = self.__dict__.get("pace_every", 0)
        lists = [getattr(self, name) for name in self.paced_lists]
        if every:
            lists = [
                [self.compiled_blocks((name, i), block) for i, block in enumerate(blocks)]
                for name, blocks in zip(self.paced_lists, lists)
            ]
        return (every, *lists)
