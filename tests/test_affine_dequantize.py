"""affine_dequantize: the same values as mx.dequantize, through MLX's op everywhere and (on a CUDA machine) through
the vectorized kernel, for 4 and 8 bits, every group size, bf16 and float32 scales."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from imagegen.nn import cuda_kernels
from imagegen.nn.affine_dequantize import dequantize


def _quantized(rows: int, cols: int, group_size: int, bits: int, dtype: mx.Dtype):
    w = mx.random.normal((rows, cols)).astype(dtype)
    return mx.quantize(w, group_size=group_size, bits=bits)


@pytest.mark.parametrize("bits", [4, 8])
def test_matches_mlx_dequantize(bits):
    mx.random.seed(0)
    w, scales, biases = _quantized(8, 128, 64, bits, mx.bfloat16)
    want = mx.dequantize(w, scales, biases, group_size=64, bits=bits)
    got = dequantize(w, scales, biases, 64, bits)
    assert got.dtype == want.dtype and got.shape == (8, 128)
    np.testing.assert_array_equal(np.array(got.astype(mx.float32)), np.array(want.astype(mx.float32)))


@pytest.mark.cuda
@pytest.mark.skipif(not cuda_kernels._cuda(), reason="the fused kernel runs on CUDA only")
@pytest.mark.parametrize("dtype", [mx.bfloat16, mx.float32])
@pytest.mark.parametrize("group_size", [32, 64, 128])
@pytest.mark.parametrize("bits", [4, 8])
def test_fused_kernel_matches_mlx(bits, group_size, dtype):
    """At a real layer's shape (Klein 4B's MLP input): bf16 equal to the bit, float32 within one rounding."""
    mx.random.seed(1)
    w, scales, biases = _quantized(9216, 3072, group_size, bits, dtype)
    want = np.array(mx.dequantize(w, scales, biases, group_size=group_size, bits=bits).astype(mx.float32))
    got = np.array(dequantize(w, scales, biases, group_size, bits).astype(mx.float32))
    if dtype == mx.bfloat16:
        np.testing.assert_array_equal(got, want)
    else:  # MLX's compiler may fuse the multiply-add
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6 * np.abs(want).max())
