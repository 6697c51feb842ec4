"""Parity of the Z-Image transformer with diffusers' ZImageTransformer2DModel on a tiny random config."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
import torch
from diffusers import ZImageTransformer2DModel
from imagegen_zimage.config import ZImageTransformerConfig
from imagegen_zimage.transformer import ZImageTransformer, quant_predicate

from imagegen.testing import ZIMAGE_TRANSFORMER, randomize_norms
from imagegen.weights import load_module

TINY = {
    **ZIMAGE_TRANSFORMER,
    "in_channels": 16,
    "norm_eps": 1e-5,
    "qk_norm": True,
    "rope_theta": 256.0,
    "t_scale": 1000.0,
    "axes_lens": [256, 32, 32],
}
CAP_LENS = (7, 40, 20)  # caption runs of 32, 64, 32 tokens: pad tokens, and two groups out of batch order
GRID = (8, 10)  # latent H x W: 20 image tokens, padded to 32 with x_pad_token


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    torch.manual_seed(0)
    ref = ZImageTransformer2DModel(**TINY).eval()
    randomize_norms(ref)  # constant-initialised norms and pad tokens would prove less than they seem
    folder = tmp_path_factory.mktemp("zimage") / "transformer"
    ref.save_pretrained(folder, safe_serialization=True)
    model = ZImageTransformer(ZImageTransformerConfig.from_file(folder / "config.json"))
    load_module(model, folder, dtype="float32")
    return ref, model


def inputs(seed: int = 0):
    rng = np.random.default_rng(seed)
    c, (h, w) = TINY["in_channels"], GRID
    latents = rng.standard_normal((len(CAP_LENS), h, w, c)).astype(np.float32)
    caps = [rng.standard_normal((n, TINY["cap_feat_dim"])).astype(np.float32) for n in CAP_LENS]
    t = np.array([0.3, 0.85, 0.6], dtype=np.float32)
    return latents, caps, t


def reference(ref, latents, caps, t) -> np.ndarray:
    x = [torch.from_numpy(lat).permute(2, 0, 1)[:, None] for lat in latents]  # [C, F=1, H, W]
    with torch.no_grad():
        out = ref(x, torch.from_numpy(t), [torch.from_numpy(cp) for cp in caps], return_dict=False)[0]
    return np.stack([o[:, 0].permute(1, 2, 0).numpy() for o in out])


def padded_captions(caps, length: int) -> mx.array:
    """Captions left-aligned in a [B, length, D] array; the tail is noise the model must ignore."""
    out = np.random.default_rng(1).standard_normal((len(caps), length, caps[0].shape[1])).astype(np.float32) * 10
    for i, cp in enumerate(caps):
        out[i, : len(cp)] = cp
    return mx.array(out)


@pytest.mark.parametrize("pace", [0, 1])
def test_matches_diffusers_with_unequal_captions(models, pace):
    """pace 1: blocks compiled one by one with the host paced (imagegen.nn.pacing), the same numbers."""
    ref, model = models
    model.pace(pace)
    latents, caps, t = inputs()
    expected = reference(ref, latents, caps, t)
    layout = model.layout(CAP_LENS, *GRID)
    assert layout.image_tokens == 32 and [g.cap_tokens for g in layout.groups] == [32, 64]
    assert layout.order is not None
    got = np.array(model(mx.array(latents), mx.array(t), padded_captions(caps, 45), layout))
    assert got.shape == expected.shape and got.dtype == np.float32
    err = np.abs(got - expected).max()
    rel = err / np.abs(expected).max()
    print(f"max abs err {err:.2e}, relative to max |out| {rel:.2e}")
    assert rel < 1e-5

    # Captions of one run length: a single group over the whole batch
    pick = [0, 2]
    layout = model.layout([CAP_LENS[i] for i in pick], *GRID)
    assert len(layout.groups) == 1 and layout.groups[0].index is None
    got = model(mx.array(latents[pick]), mx.array(t[pick]), padded_captions([caps[i] for i in pick], 20), layout)
    np.testing.assert_allclose(np.array(got), expected[pick], rtol=0, atol=1e-5 * np.abs(expected).max())
    model.pace(0)


def test_compiled_step_matches_eager(models):
    _, model = models
    latents, caps, t = inputs(seed=2)
    layout = model.layout(CAP_LENS, *GRID)
    assert model.layout(list(CAP_LENS), *GRID) is layout  # cached per run shape
    cap = padded_captions(caps, max(CAP_LENS))
    eager = model(mx.array(latents), mx.array(t), cap, layout)
    step = mx.compile(lambda x, tt, c: model(x, tt, c, layout))
    compiled = step(mx.array(latents), mx.array(t), cap)
    np.testing.assert_allclose(np.array(compiled), np.array(eager), rtol=1e-5, atol=1e-5)


def test_quant_predicate_keeps_embedders_modulation_and_final_layer(models):
    _, model = models
    picked = {path for path, m in model.named_modules() if isinstance(m, nn.Linear) and quant_predicate(path, m)}
    assert "layers.0.attention.to_qkv" in picked and "noise_refiner.0.feed_forward.w2" in picked
    assert "layers.0.feed_forward.w13" in picked
    assert "context_refiner.0.attention.to_out.0" in picked
    assert not any("adaLN" in p or "embedder" in p or "final_layer" in p for p in picked)
