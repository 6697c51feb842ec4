"""The shared pieces of diffusers-layout pipelines: the memory estimate, and evaluating a stage's dataclass."""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx

from imagegen.diffusers_pipeline import MAX_TEXT_TOKENS, estimate_memory
from imagegen.pipeline import arrays


@dataclass(frozen=True)
class Conditioning:
    text: mx.array
    negative: mx.array | None
    grids: tuple[tuple[int, int], ...]
    parts: list


def test_arrays_finds_every_array_of_a_conditioning():
    a, b, c = mx.ones(2), mx.zeros(3), mx.arange(4)
    found = arrays(Conditioning(a, None, ((1, 2),), [b, {"x": c}]))
    assert [x.shape for x in found] == [(2,), (3,), (4,)]  # mx.eval(conditioning) alone evaluates none of them


def test_memory_estimate_is_weights_plus_the_larger_activations(tmp_path):
    assert estimate_memory(None, "bfloat16", None, 64, 64, 1, lambda root: 8) == 0
    (tmp_path / "transformer").mkdir()  # no weight files: the estimate is the activations alone
    small = estimate_memory(tmp_path, "bfloat16", None, 64, 64, 1, lambda root: 3072)
    tokens = 4 * 4 + MAX_TEXT_TOKENS
    assert small == tokens * 3072 * 2 * 16  # the transformer dominates at a small size
    cfg = estimate_memory(tmp_path, "bfloat16", None, 64, 64, 1, lambda root: 3072, cfg=2)
    assert cfg - small == tokens * 3072 * 2 * 16
    big = estimate_memory(tmp_path, "bfloat16", None, 2048, 2048, 1, lambda root: 8)
    assert big == 2048 * 2048 * 128 * 2 * 6  # the VAE dominates with a tiny transformer
