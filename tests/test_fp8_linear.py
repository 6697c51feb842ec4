"""fp8 quantization (imagegen.nn.fp8_linear): row-wise E4M3 against torch's float8_e4m3fn, the layer against the
same arithmetic in torch, quantize / save / load, LoRA on top; on a CUDA GPU the fused row quantizer and the
cuBLASLt GEMM against the portable path and torch._scaled_mm."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
import torch

from imagegen import quantize as q
from imagegen.lora.apply import LoraLinear, Patcher, merged
from imagegen.lora.deltas import LoraDelta
from imagegen.lora.targets import Part
from imagegen.memory import weight_bytes
from imagegen.nn import cuda_kernels, fp8_linear
from imagegen.nn.fp8_linear import Fp8Linear, quantize_rows
from imagegen.weights import load_module, save_module


def torch_rows(a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The reference: per row, amax / 448 as scale and a * (448 / amax) rounded to E4M3 by torch."""
    t = torch.from_numpy(a.astype(np.float32))
    amax = t.abs().amax(dim=-1, keepdim=True).clamp_min(fp8_linear.TINY)
    q8 = (t * (448.0 / amax)).clamp(-448, 448).to(torch.float8_e4m3fn)
    return q8.view(torch.uint8).numpy(), (amax / 448.0)[..., 0].numpy()


def torch_linear(x: np.ndarray, w: np.ndarray, b: np.ndarray | None) -> np.ndarray:
    """y = dequant(x8) @ dequant(w8)^T (+ b) in float32, everything quantized by torch."""
    x8, xs = torch_rows(x)
    w8, ws = torch_rows(w)

    def deq(q8, s):
        return torch.from_numpy(q8).view(torch.float8_e4m3fn).float() * torch.from_numpy(s)[:, None]

    y = deq(x8, xs) @ deq(w8, ws).T
    return (y + torch.from_numpy(b)).numpy() if b is not None else y.numpy()


def test_rows_match_torch_bit_for_bit():
    rng = np.random.default_rng(0)
    a = np.concatenate([rng.standard_normal((6, 96)) * 30, np.zeros((1, 96)), rng.standard_normal((3, 96)) * 1e-3])
    got_q, got_s = quantize_rows(mx.array(a.astype(np.float32)))
    want_q, want_s = torch_rows(a)
    np.testing.assert_array_equal(np.array(got_q), want_q)
    np.testing.assert_array_equal(np.array(got_s), want_s)
    assert (np.array(got_q) & 0x7F).max() == 0x7E  # the row maxima land on 448 (0x7E), none on NaN (0x7F)


@pytest.mark.parametrize("bias", [True, False])
def test_layer_equals_torch_reference(bias):
    mx.random.seed(3)
    linear = nn.Linear(64, 48, bias=bias)
    layer = Fp8Linear.from_linear(linear)
    assert layer.weight.dtype == mx.uint8 and layer.weight_scale.dtype == mx.float32
    x = mx.random.normal((2, 5, 64)) * 4
    got = layer(x)
    assert got.shape == (2, 5, 48) and got.dtype == mx.float32
    b = np.array(linear.bias) if bias else None
    want = torch_linear(np.array(x).reshape(10, 64), np.array(linear.weight), b).reshape(2, 5, 48)
    np.testing.assert_allclose(np.array(got), want, rtol=1e-5, atol=1e-5)
    # and close to the unquantized layer (E4M3 keeps ~2 significant digits)
    dense = np.array(linear(x))
    assert np.abs(np.array(got) - dense).max() < 0.1 * np.abs(dense).max()


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj_in = nn.Linear(64, 96)
        self.proj_out = nn.Linear(96, 32)
        self.norm = nn.RMSNorm(96)

    def __call__(self, x):
        return self.proj_out(self.norm(self.proj_in(x)))


def test_quantize_model_picks_linears_and_round_trips(tmp_path):
    mx.random.seed(4)
    model = Tiny()
    model.set_dtype(mx.bfloat16)
    record = q.quantize_model(model, "e4m3", q.keep_high_precision("proj_out"))
    assert record == {"quantization": "fp8", "mode": "fp8", "bits": 8, "group_size": 0}
    assert isinstance(model.proj_in, Fp8Linear) and type(model.proj_out) is nn.Linear
    assert model.proj_in.weight_scale.dtype == mx.float32 and model.proj_in.bias.dtype == mx.bfloat16
    x = mx.random.normal((3, 64)).astype(mx.bfloat16)
    expected = model(x)
    save_module(model, tmp_path / "q", record=record)
    again = Tiny()
    load_module(again, tmp_path / "q", dtype="bfloat16")
    assert isinstance(again.proj_in, Fp8Linear)
    assert again.proj_in.weight_scale.dtype == mx.float32  # the load's cast leaves the scales alone
    np.testing.assert_array_equal(np.array(again(x).astype(mx.float32)), np.array(expected.astype(mx.float32)))


def test_modes_and_memory_estimate(tmp_path):
    for alias in ("fp8", "FP8", "e4m3", "float8", "w8a8"):
        assert q.normalize_mode(alias) == "fp8"
    assert "fp8" in q.ALL_MODES
    q.check_supported("fp8")
    model = Tiny()
    save_module(model, tmp_path / "m")
    dense = weight_bytes(tmp_path / "m", "bfloat16", None, quantized=False)
    fp8 = weight_bytes(tmp_path / "m", "bfloat16", "fp8", quantized=True)
    assert fp8 < 0.55 * dense


def test_lora_side_path_on_fp8_equals_merging():
    mx.random.seed(5)
    tree = Tiny()
    tree.proj_in = quantized = Fp8Linear.from_linear(tree.proj_in)
    delta = LoraDelta(mx.random.normal((4, 64)), mx.random.normal((96, 4)), 1.0)
    patcher = Patcher(tree)
    patcher.apply([({"proj_in": [(delta, Part("proj_in"))]}, 0.5)])
    adapted = tree.proj_in
    assert isinstance(adapted, LoraLinear)
    zero = nn.Linear(64, 96, bias=False)
    zero.weight = mx.zeros((96, 64))
    placed = merged(zero, [(delta, Part("proj_in"), 0.5)]).weight
    x = mx.random.normal((3, 64))
    np.testing.assert_allclose(np.array(adapted(x)), np.array(quantized(x) + x @ placed.T), rtol=1e-4, atol=1e-4)
    patcher.restore()
    assert tree.proj_in is quantized


# --- CUDA: the fused quantizer and cuBLASLt's FP8 GEMM --------------------------------------------------------


def fp8_gemm_here() -> bool:
    return cuda_kernels._cuda() and fp8_linear._fp8_gpu() and fp8_linear._extension() is not None


@pytest.mark.cuda
@pytest.mark.skipif(not cuda_kernels._cuda(), reason="the fused kernel runs on CUDA only")
@pytest.mark.parametrize("dtype", [mx.bfloat16, mx.float16])
@pytest.mark.parametrize("width", [2560, 3072, 12288])  # the last pack of a row part-filled, full, 6 packs
def test_fused_rows_equal_reference(dtype, width):
    x = (mx.random.normal((333, width), key=mx.random.key(6)) * 7).astype(dtype)
    x = mx.concatenate([x, mx.zeros((1, width), dtype)])
    q8, scale, buffer = fp8_linear.quantize_rows_fused(x, 64)
    want_q, want_s = quantize_rows(x)
    assert buffer.shape == (334, 64) and buffer.dtype == mx.bfloat16
    np.testing.assert_array_equal(np.array(q8), np.array(want_q))
    np.testing.assert_array_equal(np.array(scale), np.array(want_s))


@pytest.mark.cuda
@pytest.mark.skipif(not cuda_kernels._cuda(), reason="the fused kernel runs on CUDA only")
@pytest.mark.parametrize("dtype", [mx.bfloat16, mx.float16, mx.float32])
@pytest.mark.parametrize("bias", [True, False])
def test_fused_rescale_equals_reference(dtype, bias):
    keys = mx.random.split(mx.random.key(8), 4)
    raw = (mx.random.normal((77, 1024), key=keys[0]) * 1e4).astype(mx.bfloat16)
    x_scale, w_scale = mx.random.uniform(0, 0.1, (77,), key=keys[1]), mx.random.uniform(0, 0.1, (1024,), key=keys[2])
    b = mx.random.normal((1024,), key=keys[3]).astype(dtype) if bias else None
    got = fp8_linear.rescale_fused(raw, x_scale, w_scale, b, dtype)
    want = fp8_linear._rescale(dtype, bias)(raw, x_scale, w_scale, *([b] if bias else []))
    assert got.dtype == dtype
    scale = float(mx.abs(want.astype(mx.float32)).max())
    tol = 1e-6 if dtype == mx.float32 else 4e-3  # one rounding of the last add (FMA or not)
    np.testing.assert_allclose(
        np.array(got.astype(mx.float32)), np.array(want.astype(mx.float32)), atol=tol * scale, rtol=0
    )


@pytest.mark.cuda
@pytest.mark.skipif(not fp8_gemm_here(), reason="needs an FP8 CUDA GPU (compute capability >= 8.9) and the extension")
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("rows", [1, 77, 4608])
def test_cublaslt_gemm_equals_exact_products_and_scaled_mm(bias, rows):
    mx.random.seed(7)
    linear = nn.Linear(3072, 1024, bias=bias)
    linear.set_dtype(mx.bfloat16)
    layer = Fp8Linear.from_linear(linear)
    x = (mx.random.normal((rows, 3072)) * 3).astype(mx.bfloat16)
    assert layer._fast(x)
    fast = np.array(layer(x).astype(mx.float32))
    x8, xs = quantize_rows(x)
    w = fp8_linear.dequantize_rows(layer.weight, layer.weight_scale, mx.float32)
    exact = np.array(fp8_linear.dequantize_rows(x8, xs, mx.float32) @ w.T)
    if bias:
        exact = exact + np.array(linear.bias.astype(mx.float32))
    scale = np.abs(exact).max()
    np.testing.assert_allclose(fast, exact, atol=1e-2 * scale, rtol=0)  # bf16 output rounding
    if torch.cuda.is_available():  # the PyTorch reference on the same GPU: row-wise scaled FP8
        a = torch.from_numpy(np.array(x8)).cuda().view(torch.float8_e4m3fn)
        b = torch.from_numpy(np.array(layer.weight)).cuda().view(torch.float8_e4m3fn)
        ref = torch._scaled_mm(
            a,
            b.t(),
            scale_a=torch.from_numpy(np.array(xs)).cuda()[:, None],
            scale_b=torch.from_numpy(np.array(layer.weight_scale)).cuda()[None, :],
            bias=torch.from_numpy(np.array(linear.bias.astype(mx.float32))).cuda().bfloat16() if bias else None,
            out_dtype=torch.bfloat16,
        )
        np.testing.assert_allclose(fast, ref.float().cpu().numpy(), atol=1e-2 * scale, rtol=0)


# --- the extension's build: clear refusals, nothing half written ---------------------------------------------


def test_extension_build_refuses_clearly(monkeypatch, tmp_path):
    from imagegen.nn import fp8_extension as ext

    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    with pytest.raises(ext.ExtensionUnavailable, match="no-such-compiler is not a program"):
        ext.compile_extension(tmp_path)
    failing = tmp_path / "failing-c++"
    failing.write_text("#!/bin/sh\necho 'fp8_gemm.cpp:1: error: no cuBLASLt here' >&2\nexit 1\n")
    failing.chmod(0o755)
    monkeypatch.setenv("CXX", str(failing))
    monkeypatch.setattr(ext, "_package_dir", lambda name: tmp_path)  # mlx and nanobind "found"
    monkeypatch.setattr(ext, "_folder_with", lambda name, sub: tmp_path)
    (tmp_path / "libcublasLt.so.13").touch()
    with pytest.raises(ext.ExtensionUnavailable, match="compiling fp8_gemm.cpp failed:\n.*no cuBLASLt here"):
        ext.compile_extension(tmp_path / "out")
    assert not [p for p in (tmp_path / "out").iterdir() if p.is_file()]  # no library, no temporary
    monkeypatch.setattr(ext, "_package_dir", lambda name: (_ for _ in ()).throw(ext.ExtensionUnavailable(name)))
    with pytest.raises(ext.ExtensionUnavailable):
        ext.compile_extension(tmp_path / "out")


def test_library_name_follows_source_flags_and_abi(monkeypatch):
    from imagegen.nn import fp8_extension as ext

    name = ext.library_name()
    assert name.startswith("_imagegen_fp8-") and name == ext.library_name()
    monkeypatch.setattr(ext, "FLAGS", (*ext.FLAGS, "-O3"))
    assert ext.library_name() != name


def test_a_damaged_cached_library_is_built_again(monkeypatch, tmp_path):
    from imagegen.nn import fp8_extension as ext

    monkeypatch.setenv("IMAGEGEN_KERNEL_CACHE", str(tmp_path))
    monkeypatch.setattr(ext, "_loaded", None)
    damaged = tmp_path / "imagegen" / ext.library_name()
    damaged.parent.mkdir()
    damaged.write_bytes(b"\x7fELF truncated")
    builds = []

    def build(folder):
        builds.append(folder)
        raise ext.ExtensionUnavailable("no compiler here")

    monkeypatch.setattr(ext, "compile_extension", build)
    with pytest.raises(ext.ExtensionUnavailable, match="no compiler here"):
        ext.load()
    assert builds == [tmp_path / "imagegen"]
