"""FP8 linear layers: E4M3 weights with a float32 scale per output channel, E4M3 activations with one per token.

`--quantize fp8` turns each picked Linear into an Fp8Linear: half the bf16 weight bytes, and on Hopper / Ada GPUs
(compute capability 8.9 and up) the GEMM itself runs on the FP8 tensor cores, twice the bf16 rate. Three passes:
one CUDA kernel quantizes the activations per row (amax, scale, convert); cuBLASLt multiplies the two byte
matrices (imagegen.nn.fp8_gemm.cpp, built on first use by imagegen.nn.fp8_extension); one fused pass applies the
token and channel scales and the bias. That is "row-wise" W8A8 FP8, what torch._scaled_mm computes with per-row
scales (cuBLASLt 13.1 has no Hopper algorithm for those scales inside the GEMM, hence the separate pass).

Elsewhere (CPU, Metal, an older GPU, no C++ compiler for the extension) the same arithmetic runs in plain MLX:
the byte matrices widened to bf16 (exactly: E4M3 values are bf16 values) or float32, one GEMM, the same scaling
pass. Products of E4M3 values are exact in float32, so the paths differ only in summation order.
"""

from __future__ import annotations

import warnings
from functools import cache

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_unflatten

from . import cuda_kernels, fp8_extension

E4M3_MAX = 448.0  # the largest finite E4M3 value: each row's largest magnitude maps onto it
TINY = 1e-12  # an all-zero row keeps a finite scale (the kernel's 1e-12f)
THREADS = 256
PER = 8  # elements per packed load: 16 bytes of bf16 / fp16

# One block per row, the row held in registers (PACKS packs of PER values per thread, K a compile-time constant):
# its largest magnitude (a warp then a block reduction), then each value times 448 / amax converted to E4M3 (round
# to nearest even, saturating). `buffer` is the GEMM's output memory: allocated here, written by cuBLASLt.
_QUANTIZE_ROWS = """
  const long row = blockIdx.x;
  const T* xr = x + row * K;
  float v[PACKS][PER];
  float amax = 0.f;
  for (int p = 0; p < PACKS; ++p) {
    const long c = (long(p) * blockDim.x + threadIdx.x) * PER;
    if (c < K) {
      load_row<T, PER>(xr + c, 1, v[p]);
      for (int j = 0; j < PER; ++j) amax = fmaxf(amax, fabsf(v[p][j]));
    }
  }
  for (int offset = 16; offset > 0; offset >>= 1) amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, offset));
  __shared__ float warp_max[32];
  if ((threadIdx.x & 31) == 0) warp_max[threadIdx.x >> 5] = amax;
  __syncthreads();
  if (threadIdx.x < 32) {
    float m = threadIdx.x < (blockDim.x >> 5) ? warp_max[threadIdx.x] : 0.f;
    for (int offset = 16; offset > 0; offset >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, offset));
    if (threadIdx.x == 0) warp_max[0] = fmaxf(m, 1e-12f);
  }
  __syncthreads();
  amax = warp_max[0];
  const float inverse = 448.f / amax;
  for (int p = 0; p < PACKS; ++p) {
    const long c = (long(p) * blockDim.x + threadIdx.x) * PER;
    if (c < K) {
      Pack<unsigned char, PER> bytes;
      for (int j = 0; j < PER; ++j) bytes.v[j] = __nv_cvt_float_to_fp8(v[p][j] * inverse, __NV_SATFINITE, __NV_E4M3);
      *reinterpret_cast<Pack<unsigned char, PER>*>(q + row * K + c) = bytes;
    }
  }
  if (threadIdx.x == 0) scale[row] = amax / 448.f;
"""

# out = raw * x_scale[row] * w_scale[col] (+ bias[col]), PER columns per thread in packed loads and stores; the
# same float32 arithmetic as _rescale's MLX expression.
_RESCALE = """
  const long i = long(blockIdx.x) * blockDim.x + threadIdx.x;
  const long per_row = N / PER;
  if (i >= raw_shape[0] * per_row) return;
  const long row = i / per_row, col = (i % per_row) * PER;
  float v[PER];
  load_row<__nv_bfloat16, PER>(raw + row * N + col, 1, v);
  const float s = x_scale[row];
  Pack<T, PER> y;
  for (int j = 0; j < PER; ++j) {
    float value = v[j] * s * w_scale[col + j];
    BIAS
    y.v[j] = static_cast<T>(value);
  }
  *reinterpret_cast<Pack<T, PER>*>(out + row * N + col) = y;
"""


@mx.compile
def quantize_rows(a: mx.array) -> tuple[mx.array, mx.array]:
    """a [..., K] -> (E4M3 bytes [..., K] as uint8, float32 scales [...]) with a ~= bytes * scale per row: the
    reference the CUDA kernel is tested against, and how weights are quantized (a row = an output channel).
    Compiled: the float32 copy of `a` is never materialized."""
    a = a.astype(mx.float32)
    amax = mx.maximum(mx.max(mx.abs(a), axis=-1, keepdims=True), TINY)
    return mx.to_fp8(a * (E4M3_MAX / amax)), (amax / E4M3_MAX)[..., 0]


def dequantize_rows(q: mx.array, scale: mx.array, dtype: mx.Dtype) -> mx.array:
    """bytes * scale per row: the values quantize_rows stands for."""
    return (mx.from_fp8(q, dtype=mx.float32) * scale[..., None]).astype(dtype)


@cache
def _rescale(dtype: mx.Dtype, bias: bool):
    """out = raw * x_scale[:, None] * w_scale (+ bias) in float32, rounded once to `dtype`: one fused pass."""

    def rescale(raw: mx.array, x_scale: mx.array, w_scale: mx.array, *b: mx.array) -> mx.array:
        y = raw.astype(mx.float32) * x_scale[:, None] * w_scale
        return (y + b[0].astype(mx.float32) if bias else y).astype(dtype)

    return mx.compile(rescale, shapeless=True)


def raw_products(q: mx.array, w: mx.array, dtype: mx.Dtype) -> mx.array:
    """The portable x8 @ w8^T: bytes widened exactly (bf16 for 16-bit activations: fp16 sums could overflow)."""
    wide = mx.float32 if dtype == mx.float32 else mx.bfloat16
    return mx.from_fp8(q, dtype=wide) @ mx.from_fp8(w, dtype=wide).T


def _quantize_rows_kernel():
    return cuda_kernels.kernel("imagegen_fp8_rows", ["x"], ["q", "scale", "buffer"], _QUANTIZE_ROWS, ["cuda_fp8.h"])


def quantize_rows_fused(x: mx.array, out_features: int) -> tuple[mx.array, mx.array, mx.array]:
    """The CUDA kernel for x [M, K] (K a multiple of 8): (bytes, scales, an unwritten bf16 [M, out_features] buffer
    for the GEMM's output)."""
    rows, width = x.shape
    packs = -(-width // (THREADS * PER))
    q, scale, buffer = _quantize_rows_kernel()(
        inputs=[x],
        template=[("T", x.dtype), ("PER", PER), ("K", width), ("PACKS", packs)],
        grid=(rows * THREADS, 1, 1),
        threadgroup=(THREADS, 1, 1),
        output_shapes=[(rows, width), (rows,), (rows, out_features)],
        output_dtypes=[mx.uint8, mx.float32, mx.bfloat16],
    )
    return q, scale, buffer


def _rescale_kernel(bias: bool):
    body = _RESCALE.replace("BIAS", "value += static_cast<float>(bias[col + j]);" if bias else "")
    names = ["raw", "x_scale", "w_scale", *(["bias"] if bias else [])]
    return cuda_kernels.kernel(f"imagegen_fp8_rescale{'_bias' if bias else ''}", names, ["out"], body)


def rescale_fused(raw: mx.array, x_scale: mx.array, w_scale: mx.array, bias: mx.array | None, dtype: mx.Dtype):
    """The CUDA kernel for raw [M, N] bf16 (N a multiple of 8): the scaled (and biased) output in `dtype`."""
    rows, width = raw.shape
    inputs = [raw, x_scale, w_scale] + ([bias] if bias is not None else [])
    return _rescale_kernel(bias is not None)(
        inputs=inputs,
        template=[("T", dtype), ("PER", PER), ("N", width)],
        grid=(rows * width // PER, 1, 1),
        threadgroup=(THREADS, 1, 1),
        output_shapes=[(rows, width)],
        output_dtypes=[dtype],
    )[0]


@cache
def _extension():
    """The cuBLASLt extension, or None (with one warning) when it cannot be built or loaded here."""
    try:
        return fp8_extension.load()
    except fp8_extension.ExtensionUnavailable as e:
        warnings.warn(f"FP8 GEMMs run emulated (slow): {e}", stacklevel=3)
        return None


def _fp8_gpu() -> bool:
    return cuda_kernels.available() and _fp8_tensor_cores()


@cache
def _fp8_tensor_cores() -> bool:
    """Whether the GPU has FP8 tensor cores (compute capability 8.9 and up): asked once, not on every layer call."""
    info = mx.device_info(mx.gpu)
    return (int(info["compute_capability_major"]), int(info["compute_capability_minor"])) >= (8, 9)


class Fp8Linear(nn.Module):
    """y = x @ W^T (+ b) with W in E4M3 bytes [out, in] and a float32 scale per output channel (module docstring)."""

    def __init__(self, input_dims: int, output_dims: int, bias: bool = True):
        super().__init__()
        self.weight = mx.zeros((output_dims, input_dims), dtype=mx.uint8)
        self.weight_scale = mx.ones((output_dims,), dtype=mx.float32)
        if bias:
            self.bias = mx.zeros((output_dims,))

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> Fp8Linear:
        out_dims, in_dims = linear.weight.shape
        layer = cls(in_dims, out_dims, bias="bias" in linear)
        layer.weight, layer.weight_scale = quantize_rows(linear.weight)
        if "bias" in linear:
            layer.bias = linear.bias
        return layer

    def _extra_repr(self) -> str:
        out_dims, in_dims = self.weight.shape
        return f"input_dims={in_dims}, output_dims={out_dims}, bias={'bias' in self}, fp8=e4m3"

    def __call__(self, x: mx.array) -> mx.array:
        lead, width = x.shape[:-1], x.shape[-1]
        out_dims = self.weight.shape[0]
        rows = x.reshape(-1, width)
        bias = self["bias"] if "bias" in self else None
        if self._fast(rows):
            q, scale, buffer = quantize_rows_fused(rows, out_dims)
            raw = _extension().fp8_matmul(q, self.weight, buffer)
            y = rescale_fused(raw, scale, self.weight_scale, bias, x.dtype)
        else:
            q, scale = quantize_rows(rows)
            raw = raw_products(q, self.weight, x.dtype)
            y = _rescale(x.dtype, bias is not None)(raw, scale, self.weight_scale, *([] if bias is None else [bias]))
        return y.reshape(*lead, out_dims)

    def _fast(self, rows: mx.array) -> bool:
        out_dims, in_dims = self.weight.shape
        return (
            rows.dtype in (mx.bfloat16, mx.float16)
            and rows.shape[0] > 0
            and in_dims % 16 == 0
            and out_dims % 16 == 0
            and _fp8_gpu()
            and _extension() is not None
            and _extension().supported(rows.shape[0], out_dims, in_dims)  # cuBLASLt's answer, kept per shape
        )


def quantize_linears(model: nn.Module, pick) -> int:
    """Replace, in place, every nn.Linear that `pick(path, module)` accepts by its Fp8Linear; returns how many.
    Each layer is quantized on the spot (evaluated), so a load holds one layer's temporaries at a time, not all."""
    replaced = []
    for path, m in model.named_modules():
        if _linear(m) and pick(path, m):
            layer = Fp8Linear.from_linear(m)
            mx.eval(layer.weight, layer.weight_scale)
            replaced.append((path, layer))
    if replaced:
        model.update_modules(tree_unflatten(replaced))
    return len(replaced)


def rebuild_linears(model: nn.Module, weights: dict[str, mx.array]) -> None:
    """Before loading a saved fp8 model: turn into (empty) Fp8Linears exactly the Linears the file has scales for."""
    replaced = []
    for path, m in model.named_modules():
        if _linear(m) and f"{path}.weight_scale" in weights:
            out_dims, in_dims = m.weight.shape
            replaced.append((path, Fp8Linear(in_dims, out_dims, bias="bias" in m)))
    if replaced:
        model.update_modules(tree_unflatten(replaced))


def _linear(m: nn.Module) -> bool:
    return isinstance(m, nn.Linear) and not isinstance(m, nn.QuantizedLinear)
