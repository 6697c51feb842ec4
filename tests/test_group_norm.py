"""The CUDA group norm (imagegen.nn.group_norm): its host side against torch with the two kernels emulated in numpy
(CPU), and on a CUDA machine the kernels themselves against the portable path and a float64 reference."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
import torch

from imagegen.nn import cuda_kernels
from imagegen.nn import group_norm as gn
from imagegen.nn.vae_blocks import GroupNorm

# the last two: BFL's small decoder's widths (96 and 384 channels in 32 groups: 96 packs, blocks of 192 threads)
SHAPES = [((1, 16, 16, 128), 32), ((2, 8, 12, 512), 32), ((1, 9, 7, 64), 8), ((1, 10, 6, 96), 32), ((1, 8, 8, 384), 32)]


def reference(x: np.ndarray, weight: np.ndarray, bias: np.ndarray, groups: int, eps: float, silu: bool) -> np.ndarray:
    """torch.nn.GroupNorm (+ SiLU) in float64 on NHWC data."""
    t = torch.from_numpy(x.astype(np.float64)).permute(0, 3, 1, 2)
    y = torch.nn.functional.group_norm(
        t, groups, torch.from_numpy(weight.astype(np.float64)), torch.from_numpy(bias.astype(np.float64)), eps
    )
    if silu:
        y = torch.nn.functional.silu(y)
    return y.permute(0, 2, 3, 1).numpy()


def inputs(shape, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal(shape) * 3 + 5).astype(np.float32)  # an offset mean: the shifted sums must cope
    c = shape[-1]
    return x, rng.uniform(0.5, 1.5, c).astype(np.float32), rng.normal(0, 0.2, c).astype(np.float32)


class Emulated:
    """The two kernels as numpy, following their sources: block chunks of rows, packs of P channels."""

    @staticmethod
    def stats(inputs, template, grid, threadgroup, output_shapes, output_dtypes):
        x, first = (np.array(a) for a in inputs)
        params = dict(template)
        b, n, c = x.shape
        p, threads, blocks = params["P"], params["THREADS"], grid[0] // threadgroup[0]
        packs = c // p
        step = threads // packs
        rows = (-(-n // blocks) + step - 1) // step * step
        d = x - first[:, None, :]  # per-channel offsets
        out = np.zeros(output_shapes[0], np.float32)
        for block in range(blocks):
            part = d[:, block * rows : min((block + 1) * rows, n)]
            out[:, block, :, 0] = part.sum(axis=1).reshape(b, packs, p).sum(-1)
            out[:, block, :, 1] = (part * part).sum(axis=1).reshape(b, packs, p).sum(-1)
        return [mx.array(out)]

    @staticmethod
    def apply(inputs, template, grid, threadgroup, output_shapes, output_dtypes):
        x, scale, shift = (np.array(a.astype(mx.float32)) for a in inputs)
        z = x * scale[:, None, :] + shift[:, None, :]
        if dict(template)["SILU"]:
            z = z / (1 + np.exp(-z))
        return [mx.array(z).astype(output_dtypes[0])]


@pytest.mark.parametrize("shape, groups", SHAPES)
@pytest.mark.parametrize("silu", [False, True])
@pytest.mark.parametrize("input_bias", [False, True])
def test_host_side_with_emulated_kernels_matches_torch(shape, groups, silu, input_bias, monkeypatch):
    """input_bias: the norm of x + a per-channel bias (the convolution's before it) without adding it first."""
    monkeypatch.setattr(gn, "_stats_kernel", lambda: Emulated.stats)
    monkeypatch.setattr(gn, "_apply_kernel", lambda: Emulated.apply)
    x, w, b = inputs(shape)
    extra = np.random.default_rng(5).normal(0, 2, shape[-1]).astype(np.float32) if input_bias else None
    got = gn.group_norm(
        mx.array(x), mx.array(w), mx.array(b), groups, 1e-6, silu, input_bias=None if extra is None else mx.array(extra)
    )
    want = reference(x if extra is None else x + extra, w, b, groups, 1e-6, silu)
    np.testing.assert_allclose(np.array(got), want, rtol=1e-4, atol=1e-4)


def test_the_portable_path_runs_off_cuda():
    x, _, _ = inputs((1, 4, 4, 64))
    assert gn.supported(mx.array(x), 8) == cuda_kernels.available()


@pytest.mark.cuda
@pytest.mark.skipif(not cuda_kernels._cuda(), reason="the CUDA group norm runs on CUDA only")
@pytest.mark.parametrize("shape, groups", SHAPES + [((1, 128, 128, 256), 32)])
@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16])
@pytest.mark.parametrize("silu", [False, True])
def test_kernels_match_the_portable_path_and_float64(shape, groups, dtype, silu, monkeypatch):
    x, w, b = inputs(shape, seed=3)
    norm = GroupNorm(groups, shape[-1])
    norm.weight, norm.bias = mx.array(w).astype(dtype), mx.array(b).astype(dtype)
    xs = mx.array(x).astype(dtype)
    assert gn.supported(xs, groups)
    fused = np.array(norm(xs, silu=silu).astype(mx.float32))
    again = np.array(norm(xs, silu=silu).astype(mx.float32))
    np.testing.assert_array_equal(fused, again)  # no atomics: the same bits every run
    monkeypatch.setattr(cuda_kernels, "ENABLED", False)
    plain = np.array(norm(xs, silu=silu).astype(mx.float32))
    want = reference(
        np.array(xs.astype(mx.float32)),
        np.array(norm.weight.astype(mx.float32)),
        np.array(norm.bias.astype(mx.float32)),
        groups,
        norm.eps,
        silu,
    )
    if dtype == mx.float32:
        np.testing.assert_allclose(fused, want, rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(fused, plain, rtol=1e-4, atol=1e-4)
    else:  # one rounding to bf16 (the portable path rounds twice): no worse than it
        assert np.abs(fused - want).max() <= np.abs(plain - want).max() * 1.01 + 1e-6
        assert np.abs(fused - plain).max() <= 2**-6 * max(1.0, np.abs(want).max())


@pytest.mark.cuda
@pytest.mark.skipif(not cuda_kernels._cuda(), reason="the CUDA group norm runs on CUDA only")
@pytest.mark.parametrize("shape, groups", [SHAPES[0], SHAPES[3], ((1, 128, 128, 256), 32)])
@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16])
def test_kernels_with_an_input_bias_match_the_norm_of_the_sum(shape, groups, dtype, monkeypatch):
    """norm(x, input_bias=b) is norm(x + b) with the sum never rounded to the activation dtype."""
    x, w, b = inputs(shape, seed=4)
    norm = GroupNorm(groups, shape[-1])
    norm.weight, norm.bias = mx.array(w).astype(dtype), mx.array(b).astype(dtype)
    xs = mx.array(x).astype(dtype)
    extra = mx.array(np.random.default_rng(6).normal(0, 2, shape[-1]).astype(np.float32)).astype(dtype)
    fused = np.array(norm(xs, silu=True, input_bias=extra).astype(mx.float32))
    want = reference(
        np.array(xs.astype(mx.float32)) + np.array(extra.astype(mx.float32)),
        np.array(norm.weight.astype(mx.float32)),
        np.array(norm.bias.astype(mx.float32)),
        groups,
        norm.eps,
        True,
    )
    monkeypatch.setattr(cuda_kernels, "ENABLED", False)
    plain = np.array(norm(xs, silu=True, input_bias=extra).astype(mx.float32))  # adds first, in the dtype
    tolerance = 1e-4 if dtype == mx.float32 else 2**-6 * max(1.0, np.abs(want).max())
    np.testing.assert_allclose(fused, want, rtol=1e-4, atol=tolerance)
    assert np.abs(fused - want).max() <= np.abs(plain - want).max() * 1.01 + 1e-4
