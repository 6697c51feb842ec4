"""The shared pieces of diffusers-layout pipelines: the memory estimate, and evaluating a stage's dataclass."""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx

from imagegen.diffusers_pipeline import MAX_TEXT_TOKENS, estimate_memory
from imagegen.pipeline import arrays
from imagegen.registry import ModelSpec


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
    plain = ModelSpec(id="plain", family="test", load=lambda *a, **k: None)
    guided = ModelSpec(id="guided", family="test", load=lambda *a, **k: None, options=frozenset({"guidance"}))
    assert estimate_memory(plain, None, "bfloat16", None, 64, 64, 1, hidden_size=lambda root: 8) == 0
    (tmp_path / "transformer").mkdir()  # no weight files: the estimate is the activations alone
    small = estimate_memory(plain, tmp_path, "bfloat16", None, 64, 64, 1, hidden_size=lambda root: 3072)
    tokens = 4 * 4 + MAX_TEXT_TOKENS
    assert small == tokens * 3072 * 2 * 16  # the transformer dominates at a small size
    assert estimate_memory(guided, tmp_path, "bfloat16", None, 64, 64, 1, hidden_size=lambda root: 3072) == small
    cfg = estimate_memory(
        guided, tmp_path, "bfloat16", None, 64, 64, 1, hidden_size=lambda root: 3072, cfg_doubles=True
    )
    assert cfg - small == tokens * 3072 * 2 * 16
    no_cfg = estimate_memory(
        plain, tmp_path, "bfloat16", None, 64, 64, 1, hidden_size=lambda root: 3072, cfg_doubles=True
    )
    assert no_cfg == small  # a model without guidance runs one batch
    big = estimate_memory(plain, tmp_path, "bfloat16", None, 2048, 2048, 1, hidden_size=lambda root: 8)
    assert big == 2048 * 2048 * 128 * 2 * 6  # the VAE dominates with a tiny transformer
