"""SwiGLU over a fused projection: silu(gate) * value, where gate and value are the two halves of the projection's
columns from `start` on (FLUX.2's single blocks put q, k, v first; its MLPs and Z-Image's w13 start at 0).

On CUDA one kernel reads both halves in packed 16-byte loads and writes the product (the compiled MLX expression
reads the strided halves element by element); elsewhere the plain expression runs (imagegen.nn.cuda_kernels)."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from . import cuda_kernels

THREADS = 256

# Each thread: PER consecutive outputs of one row. Rounded after each op as MLX's compiled silu(g) * v is.
_KERNEL = """
  const long i = long(blockIdx.x) * blockDim.x + threadIdx.x;
  const long per_row = M / PER;
  long rows = 1;
  for (int d = 0; d < x_ndim - 1; ++d) rows *= x_shape[d];
  if (i >= rows * per_row) return;
  const long row = i / per_row, col = (i % per_row) * PER;
  const T* g = x + row * C + START + col;
  float gate[PER], value[PER];
  load_row<T, PER>(g, 1, gate);
  load_row<T, PER>(g + M, 1, value);
  Pack<T, PER> y;
  for (int j = 0; j < PER; ++j) {
    const T sig = static_cast<T>(1.f / (1.f + expf(-gate[j])));
    const T silu = static_cast<T>(gate[j] * static_cast<float>(sig));
    y.v[j] = static_cast<T>(static_cast<float>(silu) * value[j]);
  }
  *reinterpret_cast<Pack<T, PER>*>(out + row * M + col) = y;
"""


def _kernel():
    return cuda_kernels.kernel("imagegen_swiglu", ["x"], ["out"], _KERNEL)


def swiglu(x: mx.array, start: int = 0) -> mx.array:
    """x [..., C] -> [..., (C - start) / 2]: silu(x[..., start : start + M]) * x[..., start + M :]. The fused kernel
    where it applies, else the reference."""
    width = x.shape[-1]
    m, per = (width - start) // 2, 16 // x.itemsize
    if cuda_kernels.available() and x.itemsize in (2, 4) and not (m % per or start % per or width % per):
        return swiglu_fused(x, start)
    return swiglu_reference(x, start)


def swiglu_reference(x: mx.array, start: int = 0) -> mx.array:
    """The plain-MLX definition (the spec the fused kernel is tested against)."""
    gate, value = mx.split(x[..., start:], 2, axis=-1)
    return nn.silu(gate) * value


def swiglu_fused(x: mx.array, start: int = 0) -> mx.array:
    """The CUDA kernel: packed loads of the gate and value halves (row-contiguous x; halves a multiple of 16 bytes)."""
    width = x.shape[-1]
    m, per = (width - start) // 2, 16 // x.itemsize
    return _kernel()(
        inputs=[x],
        template=[("T", x.dtype), ("PER", per), ("M", m), ("C", width), ("START", start)],
        grid=(x.size // width * m // per, 1, 1),
        threadgroup=(THREADS, 1, 1),
        output_shapes=[(*x.shape[:-1], m)],
        output_dtypes=[x.dtype],
    )[0]
