"""n-axis rotary position embeddings: integer position ids [L, n_axes] -> cos/sin, and applying them.

FLUX.2 (4 axes) and Z-Image (3 axes) rotate interleaved pairs (x0, x1), (x2, x3), ...; Qwen3
rotates the two halves of each head. Angles are computed on the host in float64, as diffusers
does, then stored as float32, so long positions lose no precision on devices without float64.
"""

from __future__ import annotations

from collections.abc import Sequence

import mlx.core as mx
import numpy as np


def inverse_frequencies(dim: int, theta: float) -> np.ndarray:
    """theta^(-2i/dim) for i < dim/2, float64."""
    return 1.0 / (theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim))


def rope_cos_sin(positions: np.ndarray, axes_dims: Sequence[int], theta: float,
                 float32_angles: bool = False) -> tuple[mx.array, mx.array]:
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
