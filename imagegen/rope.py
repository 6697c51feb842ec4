"""n-axis rotary position embeddings: integer position ids [L, n_axes] -> cos/sin, and applying them.

FLUX.2 (4 axes) and Z-Image (3 axes) rotate interleaved pairs (x0, x1), (x2, x3), ...; Qwen3
rotates the two halves of each head. Angles are computed on the host in float64, as diffusers
does, then stored as float32, so long positions lose no precision on devices without float64.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache

import mlx.core as mx
import numpy as np


def inverse_frequencies(dim: int, theta: float) -> np.ndarray:
    """theta^(-2i/dim) for i < dim/2, float64."""
    return 1.0 / (theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim))


def rope_cos_sin(
    positions: np.ndarray, axes_dims: Sequence[int], theta: float, float32_angles: bool = False
) -> tuple[mx.array, mx.array]:
    """Positions [..., L, n_axes] (ints) -> cos, sin of shape [..., L, sum(axes_dims) // 2], float32.

    Axis a takes axes_dims[a] channels of each head (axes_dims[a] // 2 rotation pairs).
    float32_angles rounds the angles to float32 before cos/sin, as Z-Image's RopeEmbedder does
    (`.float()` before `torch.polar`): at positions ~1000 that moves cos/sin by up to 6e-5."""
    positions = np.asarray(positions, dtype=np.float64)
    if positions.shape[-1] < len(axes_dims):
        raise ValueError(f"positions have {positions.shape[-1]} axes, axes_dims needs {len(axes_dims)}")
    angles = np.concatenate(
        [positions[..., a, None] * inverse_frequencies(d, theta) for a, d in enumerate(axes_dims)], axis=-1
    )
    if float32_angles:
        angles = angles.astype(np.float32).astype(np.float64)
    return mx.array(np.cos(angles).astype(np.float32)), mx.array(np.sin(angles).astype(np.float32))


def apply_rope(x: mx.array, cos: mx.array, sin: mx.array) -> mx.array:
    """Rotate interleaved pairs. x: [B, H, L, D]; cos/sin: [L, D/2] or [B, 1, L, D/2].

    Computed in float32 and cast back, as diffusers does."""
    shape, dtype = x.shape, x.dtype
    pairs = x.astype(mx.float32).reshape(*shape[:-1], shape[-1] // 2, 2)
    x0, x1 = pairs[..., 0], pairs[..., 1]
    out = mx.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], axis=-1)
    return out.reshape(shape).astype(dtype)


def apply_rope_half(x: mx.array, cos: mx.array, sin: mx.array) -> mx.array:
    """Rotate halves (Qwen / Llama convention): x: [B, H, L, D]; cos/sin: [L, D/2]."""
    half = x.shape[-1] // 2
    x0, x1 = x[..., :half], x[..., half:]
    cos, sin = cos.astype(x.dtype), sin.astype(x.dtype)
    return mx.concatenate([x0 * cos - x1 * sin, x1 * cos + x0 * sin], axis=-1)


def rope_tables(cos: mx.array, sin: mx.array) -> tuple[mx.array, mx.array]:
    """Per-pair cos, sin [..., D/2] -> full-width tables [..., D] for apply_rope_tables: cos repeated
    for both members of a pair, sin signed (-s, +s). Build once per run, not per call."""
    signs = mx.array([-1.0, 1.0], dtype=sin.dtype)
    full = (*cos.shape[:-1], 2 * cos.shape[-1])
    return mx.repeat(cos, 2, axis=-1), (sin[..., None] * signs).reshape(full)


@lru_cache(maxsize=8)
def _pair_swap(dim: int, dtype: mx.Dtype) -> mx.array:
    """[D, D] permutation: (x @ P)[2i] = x[2i+1], (x @ P)[2i+1] = x[2i]."""
    perm = np.arange(dim).reshape(-1, 2)[:, ::-1].reshape(-1)
    return mx.array(np.eye(dim, dtype=np.float32)[perm].T).astype(dtype)


def apply_rope_tables(x: mx.array, cos: mx.array, sin: mx.array) -> mx.array:
    """apply_rope with rope_tables' full-width tables (cos/sin broadcastable to x): the same result,
    bit for bit, as one elementwise expression that mx.compile fuses (on an H100, ~3x faster than
    apply_rope's stack). The pair swap is a matmul with a permutation, exact for 16-bit inputs;
    float32 inputs swap through a strided view, since float32 matmuls may run as TF32 on GPUs."""
    shape, dtype = x.shape, x.dtype
    if dtype == mx.float32:
        swapped = x.reshape(*shape[:-1], shape[-1] // 2, 2)[..., ::-1].reshape(shape)
    else:
        swapped = x @ _pair_swap(shape[-1], dtype)
    return (x.astype(mx.float32) * cos + swapped.astype(mx.float32) * sin).astype(dtype)
