"""Core layers against torch / diffusers: attention, masks, timestep embedding, norms, RoPE."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as mlx_nn
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from diffusers.models.embeddings import TimestepEmbedding as RefTimestepEmbedding
from diffusers.models.embeddings import apply_rotary_emb, get_1d_rotary_pos_embed, get_timestep_embedding
from transformers.models.qwen3.modeling_qwen3 import apply_rotary_pos_emb
from transformers.models.qwen3.modeling_qwen3 import repeat_kv as ref_repeat_kv

from imagegen import nn, rope

rng = np.random.default_rng(0)


def randn(*shape: int) -> np.ndarray:
    return rng.standard_normal(shape).astype(np.float32)


def close(ours: mx.array, ref: torch.Tensor, tol: float = 1e-5) -> None:
    np.testing.assert_allclose(np.array(ours.astype(mx.float32)), ref.detach().float().numpy(), rtol=tol, atol=tol)


@pytest.mark.parametrize("kv_heads", [4, 2])
@pytest.mark.parametrize("mask_kind", [None, "bool", "additive", "causal"])
def test_attention_matches_torch_sdpa(kv_heads, mask_kind):
    q, k, v = randn(2, 4, 7, 16), randn(2, kv_heads, 7, 16), randn(2, kv_heads, 7, 16)
    tq, tk, tv = (torch.from_numpy(a) for a in (q, k, v))
    tk, tv = ref_repeat_kv(tk, 4 // kv_heads), ref_repeat_kv(tv, 4 // kv_heads)
    mask = ref_mask = None
    if mask_kind == "bool":
        keep = rng.random((2, 1, 7, 7)) > 0.3
        keep[..., 0] = True
        mask, ref_mask = mx.array(keep), torch.from_numpy(keep)
    elif mask_kind == "additive":
        bias = randn(2, 1, 7, 7)
        mask, ref_mask = mx.array(bias), torch.from_numpy(bias)
    elif mask_kind == "causal":
        mask, ref_mask = nn.causal_mask(7), torch.ones(7, 7, dtype=torch.bool).tril()
    ours = nn.attention(mx.array(q), mx.array(k), mx.array(v), mask=mask)
    close(ours, F.scaled_dot_product_attention(tq, tk, tv, attn_mask=ref_mask))


def test_causal_mask_with_offset_and_padding():
    mask = np.array(nn.causal_mask(3, offset=2))
    assert mask.shape == (3, 5)
    assert mask.tolist() == [[True, True, True, False, False], [True] * 4 + [False], [True] * 5]
    pad = nn.padding_mask(mx.array([[1, 1, 0]]))
    both = np.array(nn.combine_masks(nn.causal_mask(3), pad))
    assert both.shape == (1, 1, 3, 3) and both[0, 0].tolist() == [
        [True, False, False],
        [True, True, False],
        [True, True, False],
    ]
    assert nn.combine_masks(None, None) is None


@pytest.mark.parametrize("flip,shift,dim", [(True, 0, 256), (False, 1, 64), (True, 1, 33)])
def test_timestep_embedding(flip, shift, dim):
    t = np.array([0.0, 0.25, 999.0, 500.5], dtype=np.float32)
    ref = get_timestep_embedding(torch.from_numpy(t), dim, flip_sin_to_cos=flip, downscale_freq_shift=shift)
    # sin(999.x) in float32: one ulp of the argument (6e-5) is the floor of agreement
    close(nn.timestep_embedding(mx.array(t), dim, flip, shift), ref, 1e-4)


def test_timestep_embedding_module_loads_diffusers_weights():
    torch.manual_seed(0)
    ref = RefTimestepEmbedding(32, 48)
    ours = nn.TimestepEmbedding(32, 48)
    ours.load_weights([(k, mx.array(v.numpy())) for k, v in ref.state_dict().items()], strict=True)
    x = randn(3, 32)
    close(ours(mx.array(x)), ref(torch.from_numpy(x)))


@pytest.mark.parametrize("affine", [True, False])
def test_layer_norm_and_rms_norm(affine):
    x = randn(2, 5, 32)
    ln = mlx_nn.LayerNorm(32, eps=1e-6, affine=affine)
    ref = torch.nn.LayerNorm(32, eps=1e-6, elementwise_affine=affine)
    if affine:
        w, b = randn(32), randn(32)
        ln.weight, ln.bias = mx.array(w), mx.array(b)
        ref.weight.data, ref.bias.data = torch.from_numpy(w), torch.from_numpy(b)
    close(ln(mx.array(x)), ref(torch.from_numpy(x)))
    rms, ref_rms = mlx_nn.RMSNorm(32, eps=1e-6), torch.nn.RMSNorm(32, eps=1e-6)
    w = randn(32)
    rms.weight, ref_rms.weight.data = mx.array(w), torch.from_numpy(w)
    close(rms(mx.array(x)), ref_rms(torch.from_numpy(x)))


def test_rope_interleaved_matches_diffusers_multi_axis():
    """FLUX.2-style: 4 axes, theta 2000, real cos/sin repeated per pair, applied on [B, H, L, D]."""
    axes, theta = [8, 8, 8, 8], 2000
    ids = np.stack([np.zeros(6), np.arange(6) // 3, np.arange(6) % 3, np.arange(6) * 7], -1).astype(np.int64)
    cos_parts, sin_parts = [], []
    for a, d in enumerate(axes):
        c, s = get_1d_rotary_pos_embed(
            d,
            torch.from_numpy(ids[:, a]).float(),
            theta=theta,
            repeat_interleave_real=True,
            use_real=True,
            freqs_dtype=torch.float64,
        )
        cos_parts.append(c), sin_parts.append(s)
    ref_cos, ref_sin = torch.cat(cos_parts, -1).float(), torch.cat(sin_parts, -1).float()
    cos, sin = rope.rope_cos_sin(ids, axes, theta)
    close(mx.repeat(cos, 2, axis=-1), ref_cos, 1e-6)
    x = randn(2, 3, 6, 32)  # [B, H, L, D]
    ref = apply_rotary_emb(torch.from_numpy(x).transpose(1, 2), (ref_cos, ref_sin), sequence_dim=1).transpose(1, 2)
    close(rope.apply_rope(mx.array(x), cos, sin), ref)


def test_rope_complex_convention_matches_zimage_style():
    """Z-Image multiplies complex pairs by polar(1, angle): the same rotation."""
    axes, theta = [4, 6, 6], 256.0
    ids = rng.integers(0, 40, size=(9, 3))
    cos, sin = rope.rope_cos_sin(ids, axes, theta)
    parts = []
    for a, d in enumerate(axes):
        freqs = 1.0 / (theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
        parts.append(
            torch.polar(
                torch.ones(len(ids), d // 2, dtype=torch.float64), torch.from_numpy(ids[:, a]).double()[:, None] * freqs
            )
        )
    freqs_cis = torch.cat(parts, -1).to(torch.complex64)
    x = randn(1, 9, 2, 16)  # [B, L, H, D] as Z-Image keeps it
    xc = torch.view_as_complex(torch.from_numpy(x).reshape(1, 9, 2, 8, 2))
    ref = torch.view_as_real(xc * freqs_cis[None, :, None]).flatten(3)
    ours = rope.apply_rope(mx.array(x).transpose(0, 2, 1, 3), cos, sin).transpose(0, 2, 1, 3)
    close(ours, ref)


def test_rope_half_split_matches_transformers_qwen():
    d, theta, L = 16, 1_000_000.0, 7
    inv = rope.inverse_frequencies(d, theta)
    angles = np.arange(L)[:, None] * inv[None]
    emb = np.concatenate([angles, angles], -1)
    q, k = randn(2, 3, L, d), randn(2, 3, L, d)
    cos_ref, sin_ref = (torch.from_numpy(f(emb)).float()[None] for f in (np.cos, np.sin))
    ref_q, _ = apply_rotary_pos_emb(torch.from_numpy(q), torch.from_numpy(k), cos_ref, sin_ref)
    cos, sin = rope.rope_cos_sin(np.arange(L)[:, None], [d], theta)
    close(rope.apply_rope_half(mx.array(q), cos, sin), ref_q)


def test_rope_tables_match_apply_rope_bit_for_bit():
    angles = mx.array(np.random.default_rng(3).uniform(0, 600, (1, 24, 1, 8)).astype(np.float32))
    cos, sin = mx.cos(angles), mx.sin(angles)
    for dtype in (mx.float32, mx.bfloat16):
        x = mx.random.normal((2, 24, 3, 16), key=mx.random.key(0)).astype(dtype)
        tables = rope.apply_rope_tables(x, *rope.rope_tables(cos, sin))
        assert mx.array_equal(tables, rope.apply_rope(x, cos, sin)).item()
