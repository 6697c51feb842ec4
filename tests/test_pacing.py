"""Pacing bounds a lazy graph's memory: the host waits every `every` blocks, so only a segment's temporaries are
alive at once instead of every block's (the reason imagegen.nn.pacing exists)."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from imagegen.nn.compiled import CompileCache
from imagegen.nn.pacing import PacedBlocks, Pacer


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


class Stack(PacedBlocks, nn.Module):
    """The shape of the transformers: a block list run with a Pacer at the pace `pace()` set."""

    paced_lists = ("blocks",)

    def __init__(self, depth: int, dim: int):
        super().__init__()
        self.blocks = [Block(dim) for _ in range(depth)]

    def __call__(self, x: mx.array) -> mx.array:
        every, blocks = self.paced_blocks()
        pace = Pacer(every)
        for block in blocks:
            x = block(x)
            pace(x)
        return x


def peak_of(fn, x: mx.array) -> tuple[int, mx.array]:
    mx.reset_peak_memory()
    start = mx.get_active_memory()
    out = fn(x)
    mx.eval(out)
    return mx.get_peak_memory() - start, out


def test_paced_model_bounds_memory_against_its_whole_compiled_step():
    """As the pipelines run it: paced, blocks compiled one by one; unpaced, the whole call compiled (CompileCache)."""
    mx.random.seed(1)
    model = Stack(12, 128)
    mx.eval(model.parameters())
    x = mx.random.normal((1024, 128))
    mx.eval(x)
    hidden = 1024 * 4 * 128 * 4
    whole_graphs = CompileCache()
    model.pace(0)
    peak_of(whole_graphs("step", model), x)  # traced once: the compile's own buffers are not the step's peak
    whole, want = peak_of(whole_graphs("step", model), x)
    model.pace(1)
    peak_of(model, x)
    paced, got = peak_of(model, x)
    assert len(whole_graphs) == 1 and len(model.compiled_blocks) == 12
    assert np.allclose(np.array(got), np.array(want), rtol=1e-5, atol=1e-5)
    assert paced < 3 * hidden < whole  # the paced step holds about two blocks' temporaries, the whole graph more


def test_compile_cache_keeps_by_key_until_cleared():
    """Keys are values: an equal key (built anew) finds the same function; clear() drops functions whose captured
    weights went stale, as after LoRA adapters replaced layers."""
    block = Block(8)
    mx.eval(block.parameters())
    x = mx.ones((2, 8))
    cache = CompileCache()
    first = cache(("step", (3, 4), 16, 16), block)
    assert cache(("step", (3, 4), 16, 16), block) is first
    before = first(x)
    block.down.bias = block.down.bias + 1  # a weight change the compiled function does not see
    assert mx.array_equal(cache(("step", (3, 4), 16, 16), block)(x), before)
    del first  # MLX drops a trace when its last compiled function is freed: nothing else may hold one
    cache.clear()
    assert mx.allclose(cache(("step", (3, 4), 16, 16), block)(x), before + 1)


def test_waiting_pacer_builds_the_next_graph_before_it_waits(monkeypatch):
    """ahead 0: a segment is launched only after the previous one finished (its temporaries are gone), yet the host
    returns right after each launch, so the next segment's graph is built while the GPU runs; ahead 1 launches first
    and then waits for the previous segment."""
    calls = []
    monkeypatch.setattr(mx, "eval", lambda *a: calls.append(("wait", a[0].item())))
    monkeypatch.setattr(mx, "async_eval", lambda *a: calls.append(("launch", a[0].item())))
    a, b = mx.array(1), mx.array(2)
    for ahead, want in (
        (0, [("launch", 1), ("wait", 1), ("launch", 2), ("wait", 2)]),
        (1, [("launch", 1), ("launch", 2), ("wait", 1), ("wait", 2)]),
    ):
        calls.clear()
        pace = Pacer(1, ahead)
        pace(a)
        pace(b)
        pace.finish()
        pace.finish()  # nothing left to wait for
        assert calls == want
