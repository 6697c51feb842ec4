"""Pacing bounds a lazy graph's memory: the host waits every `every` blocks, so only a segment's temporaries are
alive at once instead of every block's (the reason imagegen.nn.pacing exists)."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from imagegen.nn.pacing import Pacer


class Block(nn.Module):
    """A residual MLP whose 4x-wide hidden activation is the temporary pacing must not let pile up."""

    def __init__(self, dim: int):
        super().__init__()
        self.up, self.down = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)

    def __call__(self, x: mx.array) -> mx.array:
        return x + self.down(mx.maximum(self.up(x), 0))


def peak_above_start(blocks: list[Block], x: mx.array, every: int) -> tuple[int, mx.array]:
    mx.reset_peak_memory()
    start = mx.get_active_memory()
    pace = Pacer(every)
    for block in blocks:
        x = block(x)
        pace(x)
    mx.eval(x)
    return mx.get_peak_memory() - start, x


def test_pacing_bounds_peak_memory_and_changes_nothing():
    mx.random.seed(0)
    blocks = [Block(128) for _ in range(12)]
    mx.eval([b.parameters() for b in blocks])
    x = mx.random.normal((1024, 128))
    mx.eval(x)
    hidden = 1024 * 4 * 128 * 4  # one block's hidden activation, float32
    whole, want = peak_above_start(blocks, x, every=0)
    paced, got = peak_above_start(blocks, x, every=1)
    assert mx.array_equal(got, want)
    assert whole > 6 * hidden  # unpaced, the graph's temporaries pile up
    assert paced < 3 * hidden  # paced: about two segments' worth, whatever the depth
