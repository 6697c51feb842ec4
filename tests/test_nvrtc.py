"""The hand-written CUDA kernels compile with NVRTC (no GPU needed for that) and their device code is kept on disk.

On a machine without a GPU the launches are replaced by a recorder: what is checked is the source each kernel
builds, that NVRTC turns it into a cubin for an H100/H200 (sm_90a), and the run-time shape arguments. That the
kernels compute the right thing is checked on a GPU (`pytest -m cuda`: test_swiglu, test_group_norm, ...)."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import pytest

from imagegen.nn import affine_dequantize, attention_inputs, cuda_kernels, group_norm, nvrtc, phase_upsample, swiglu


def _nvrtc_found() -> bool:
    try:
        nvrtc.library(), nvrtc.include_dirs()
        return True
    except nvrtc.NvrtcError:
        return False


@pytest.fixture
def cache(monkeypatch, tmp_path):
    monkeypatch.setenv("IMAGEGEN_KERNEL_CACHE", str(tmp_path / "kernels"))
    monkeypatch.setattr(nvrtc, "_compiled", {})
    return tmp_path / "kernels" / "imagegen"


@pytest.fixture
def launches(monkeypatch, cache):
    """Record each launch instead of running it (outputs: zeros of the declared shapes)."""
    calls = []

    def record(**kwargs):
        calls.append(kwargs)
        return [mx.zeros(s, d) for s, d in zip(kwargs["output_shapes"], kwargs["output_dtypes"])]

    monkeypatch.setattr(mx.fast, "precompiled_cuda_kernel", record, raising=False)
    monkeypatch.setattr(nvrtc, "device_arch", lambda: "sm_90a")
    return calls


@pytest.mark.skipif(
    not _nvrtc_found(), reason="NVRTC and the CUDA headers are not installed (the [test] extra on Linux)"
)
def test_every_kernel_compiles_and_gets_its_shapes_at_run_time(launches, cache):
    swiglu.swiglu_fused(mx.zeros((2, 5, 3 * 64), mx.bfloat16), start=64)
    for dtype, silu in ((mx.bfloat16, True), (mx.float16, False), (mx.float32, False)):
        group_norm.group_norm(mx.zeros((1, 4, 4, 96), dtype), mx.ones(96), mx.zeros(96), 32, 1e-6, silu)
    heads, dim = 2, 64
    sources = [
        (mx.zeros((1, n, 3 * heads * dim + extra), mx.bfloat16), nn.RMSNorm(dim), nn.RMSNorm(dim))
        for n, extra in ((3, 0), (5, 32))
    ]
    table = mx.zeros((8, dim))
    attention_inputs.qk_norm_rope_fused(sources, heads, dim, table, table)
    attention_inputs.qk_norm_rope_fused(sources[1:], heads, dim, table[:5], table[:5])
    for bits, group in ((4, 64), (8, 32)):
        w, scales, biases = mx.quantize(mx.zeros((64, 128)), group, bits)
        affine_dequantize.dequantize_fused(w, scales.astype(mx.bfloat16), biases.astype(mx.bfloat16), group, bits)
    phase_upsample.interleave_fused(mx.zeros((1, 5, 4, 4 * 64), mx.bfloat16), mx.zeros((64,), mx.bfloat16))

    names = [c["name"] for c in launches]
    assert names == ["imagegen_swiglu"] + ["imagegen_group_norm_stats", "imagegen_group_norm_apply"] * 3 + [
        "imagegen_qk_norm_rope_2",
        "imagegen_qk_norm_rope_1",
        "imagegen_affine_dequantize",
        "imagegen_affine_dequantize",
        "imagegen_phase_interleave",
    ]
    assert all(c["compiled_source"].startswith(nvrtc.ELF) and c["ensure_row_contiguous"] for c in launches)
    assert launches[0]["scalars"] == [2, 5, 192]  # x's shape
    assert launches[7]["scalars"] == [1, 3, 384, 1, 5, 416]  # xa's and xb's
    assert launches[9]["scalars"] == [64, 16]  # 4-bit codes: 128 columns in 16 words
    assert launches[11]["scalars"] == [1, 5, 4, 256] and launches[11]["grid"] == (1 * 8 * 6 * 64 // 8, 1, 1)
    assert len(list(cache.glob("*.cubin"))) == 12  # one file per instantiation: the next process compiles nothing


def test_device_code_is_compiled_once_then_read_from_disk(monkeypatch, cache):
    compiled = []
    monkeypatch.setattr(nvrtc, "version", lambda: "13.0")
    monkeypatch.setattr(
        nvrtc, "_nvrtc_compile", lambda source, name, arch: compiled.append(name) or nvrtc.ELF + source.encode()
    )
    first = nvrtc.compile_cubin("source", "k", "sm_90a")
    assert nvrtc.compile_cubin("source", "k", "sm_90a") == first  # this process's memory
    monkeypatch.setattr(nvrtc, "_compiled", {})  # a new process
    assert nvrtc.compile_cubin("source", "k", "sm_90a") == first and compiled == ["k"]
    assert [p.suffix for p in cache.iterdir()] == [".cubin"]  # written under a temporary name, then renamed
    nvrtc.compile_cubin("source", "k", "sm_100a")  # another GPU, another file
    assert compiled == ["k", "k"]
    damaged = next(cache.glob("*sm_90a*.cubin"))
    damaged.write_bytes(b"garbage")
    monkeypatch.setattr(nvrtc, "_compiled", {})
    assert nvrtc.compile_cubin("source", "k", "sm_90a") == first and compiled == ["k", "k", "k"]  # compiled again
    assert damaged.read_bytes() == first


def test_with_the_cache_off_nothing_is_written(monkeypatch, tmp_path):
    monkeypatch.setenv("IMAGEGEN_KERNEL_CACHE", "off")
    monkeypatch.setattr(nvrtc, "_compiled", {})
    monkeypatch.setattr(nvrtc, "version", lambda: "13.0")
    monkeypatch.setattr(nvrtc, "_nvrtc_compile", lambda source, name, arch: nvrtc.ELF + b"cubin")
    assert nvrtc.cache_folder() is None
    assert nvrtc.compile_cubin("source", "k", "sm_90a") == nvrtc.ELF + b"cubin"


def test_kernel_bodies_get_shapes_not_strides():
    with pytest.raises(ValueError, match="row-contiguous"):
        cuda_kernels.Kernel("k", ["x"], ["out"], "out[0] = x[x_strides[0]];")
    source = cuda_kernels.Kernel("k", ["x", "y"], ["out"], "out[0] = x[x_shape[1]] + y[0];").source(
        [mx.zeros((2, 3), mx.bfloat16), mx.zeros((4,))], [("T", mx.float16), ("N", 4), ("ON", True)], [mx.float32]
    )
    assert 'extern "C" __global__ void k(' in source
    assert (
        "const __nv_bfloat16* x,\n    const float* y,\n    float* out,\n    int x_shape_0,\n    int x_shape_1)"
        in source
    )
    assert "const long x_shape[2] = {x_shape_0, x_shape_1};" in source and "y_shape" not in source
    assert "using T = __half;" in source and "constexpr int N = 4;" in source and "constexpr bool ON = true;" in source
