"""swiglu: the plain path against numpy, and (on a CUDA machine) the fused kernel against the plain path."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from imagegen.nn import cuda_kernels
from imagegen.nn.swiglu import swiglu


def _silu(x):
    return x / (1 + np.exp(-x))


@pytest.mark.parametrize("start", [0, 24])
def test_plain_path_matches_numpy(start, monkeypatch):
    monkeypatch.setattr(cuda_kernels, "ENABLED", False)
    x = np.random.default_rng(0).standard_normal((2, 5, start + 2 * 16)).astype(np.float32)
    got = swiglu(mx.array(x), start)
    gate, value = x[..., start : start + 16], x[..., start + 16 :]
    np.testing.assert_allclose(np.array(got), _silu(gate) * value, rtol=1e-5, atol=1e-6)


@pytest.mark.cuda
@pytest.mark.skipif(not cuda_kernels._cuda(), reason="the fused kernel runs on CUDA only")
@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16])
@pytest.mark.parametrize("start", [0, 384])
def test_fused_kernel_matches_plain_path(start, dtype, monkeypatch):
    x = mx.array(np.random.default_rng(1).standard_normal((1, 300, start + 2 * 256)).astype(np.float32)).astype(dtype)
    fused = np.array(swiglu(x, start).astype(mx.float32))
    monkeypatch.setattr(cuda_kernels, "ENABLED", False)
    plain = np.array(swiglu(x, start).astype(mx.float32))
    if dtype == mx.float32:
        np.testing.assert_allclose(fused, plain, rtol=1e-5, atol=1e-6)
    else:  # a bf16 rounding step or two apart at most
        assert np.abs(fused - plain).max() <= 2**-6 * max(1.0, np.abs(plain).max())
