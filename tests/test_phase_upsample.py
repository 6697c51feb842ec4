"""Upsample2D as four 2x2 phase convolutions equals nearest 2x upsampling then the 3x3 conv (diffusers' Upsample2D);
on a CUDA machine the interleaving kernel equals its plain-MLX reference."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from imagegen.nn import cuda_kernels, phase_upsample
from imagegen.nn import vae_blocks as blocks


def _upsample(channels: int, dtype=mx.float32) -> blocks.Upsample2D:
    up = blocks.Upsample2D(channels)
    up.conv.weight = mx.random.normal(up.conv.weight.shape, key=mx.random.key(2)).astype(dtype)
    up.conv.bias = mx.random.normal(up.conv.bias.shape, key=mx.random.key(3)).astype(dtype)
    return up


@pytest.mark.parametrize("strip_rows", [None, 2])
def test_phases_match_nearest_upsampling_then_conv(monkeypatch, strip_rows):
    """Whole, or in strips of rows (very large inputs)."""
    monkeypatch.setattr(cuda_kernels, "ENABLED", False)
    up = _upsample(8)
    x = mx.random.normal((2, 7, 5, 8), key=mx.random.key(4))
    if strip_rows:
        monkeypatch.setattr(blocks, "CONV_WORKSPACE_BYTES", 2 * 6 * 4 * 8 * 4 * strip_rows)
    nearest = mx.repeat(mx.repeat(x, 2, axis=1), 2, axis=2)
    want = mx.conv2d(nearest, up.conv.weight, padding=1) + up.conv.bias
    got = up(x)
    assert got.shape == (2, 14, 10, 8)
    np.testing.assert_allclose(np.array(got), np.array(want), rtol=1e-5, atol=1e-5)


@pytest.mark.cuda
@pytest.mark.skipif(not cuda_kernels._cuda(), reason="the interleaving kernel runs on CUDA only")
@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16])
@pytest.mark.parametrize("shape", [(1, 9, 6, 64), (2, 17, 33, 256)])
def test_interleaving_kernel_matches_reference(dtype, shape):
    b, h1, w1, c = shape
    z = mx.random.normal((b, h1, w1, 4 * c), key=mx.random.key(5)).astype(dtype)
    bias = mx.random.normal((c,), key=mx.random.key(6)).astype(dtype)
    fused = phase_upsample.interleave_fused(z, bias)
    want = phase_upsample.interleave_reference(z, bias)
    assert fused.shape == want.shape == (b, 2 * (h1 - 1), 2 * (w1 - 1), c)
    if dtype == mx.float32:
        assert mx.array_equal(fused, want)
    else:  # the same sum, rounded from float32 (MLX's bf16 add may round the exact sum once)
        np.testing.assert_allclose(np.array(fused.astype(mx.float32)), np.array(want.astype(mx.float32)), rtol=2**-7)


@pytest.mark.cuda
@pytest.mark.skipif(not cuda_kernels._cuda(), reason="the interleaving kernel runs on CUDA only")
def test_upsample_with_the_kernel_matches_nearest_then_conv():
    up = _upsample(64, mx.bfloat16)
    x = mx.random.normal((1, 12, 10, 64), key=mx.random.key(7)).astype(mx.bfloat16)
    nearest = mx.repeat(mx.repeat(x, 2, axis=1), 2, axis=2)
    want = (mx.conv2d(nearest, up.conv.weight, padding=1) + up.conv.bias).astype(mx.float32)
    got = up(x).astype(mx.float32)
    assert float(mx.abs(got - want).max()) <= 2**-6 * float(mx.abs(want).max())  # bf16 roundings of the summed taps
