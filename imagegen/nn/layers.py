"""Layers shared by the families. mlx.nn already has Linear (fused addmm), QuantizedLinear (affine,
mxfp4, mxfp8, nvfp4), RMSNorm, LayerNorm (affine or not), Embedding, GroupNorm and Conv2d: we
re-export those and add only what it lacks."""

from __future__ import annotations

import math

import mlx.core as mx
import mlx.nn as nn


def timestep_embedding(
    t: mx.array,
    dim: int,
    flip_sin_to_cos: bool = True,
    downscale_freq_shift: float = 0.0,
    scale: float = 1.0,
    max_period: float = 10000.0,
) -> mx.array:
    """Sinusoidal embedding of (fractional) timesteps [N] -> [N, dim], float32 (diffusers' get_timestep_embedding)."""
    half = dim // 2
    exponent = -math.log(max_period) * mx.arange(half, dtype=mx.float32) / (half - downscale_freq_shift)
    args = scale * t.astype(mx.float32)[:, None] * mx.exp(exponent)[None]
    emb = mx.concatenate([mx.sin(args), mx.cos(args)], axis=-1)
    if flip_sin_to_cos:
        emb = mx.concatenate([emb[:, half:], emb[:, :half]], axis=-1)
    if dim % 2:
        emb = mx.pad(emb, [(0, 0), (0, 1)])
    return emb


class TimestepEmbedding(nn.Module):
    """linear_1 -> SiLU -> linear_2, with diffusers' key names."""

    def __init__(self, in_channels: int, dim: int, bias: bool = True, out_dim: int | None = None):
        super().__init__()
        self.linear_1 = nn.Linear(in_channels, dim, bias=bias)
        self.linear_2 = nn.Linear(dim, out_dim or dim, bias=bias)

    def __call__(self, x: mx.array) -> mx.array:
        return self.linear_2(nn.silu(self.linear_1(x)))
