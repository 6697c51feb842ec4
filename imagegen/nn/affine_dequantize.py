"""Affine 4- and 8-bit weights back to floats: w = scale * q + bias per group of columns, as mx.dequantize computes.

On CUDA one thread turns 16 packed values into 16 outputs with one vector load and two 16-byte stores; MLX's own
kernel reads one byte and writes one or two values per thread, well below the memory bandwidth, and the dense path of
quantized layers (imagegen.nn.quantized_linear) runs it on every layer of every step. Elsewhere (CPU, Metal, other
bit widths) mx.dequantize runs. Both compute scale * q + bias in float32 and round once to the scales' dtype, so
they agree to the bit (bf16; float32 up to a fused multiply-add)."""

from __future__ import annotations

import mlx.core as mx

from . import cuda_kernels

THREADS = 256
PER = 16  # values per thread: 16 bytes of 8-bit or 8 bytes of 4-bit codes; every supported group size is a multiple

_KERNEL = """
  const long i = long(blockIdx.x) * blockDim.x + threadIdx.x;
  long words = 1;
  for (int d = 0; d < w_ndim; ++d) words *= w_shape[d];
  if (i >= words * 32 / BITS / PER) return;
  constexpr int WORDS = PER * BITS / 32;
  const Pack<unsigned int, WORDS> codes = *reinterpret_cast<const Pack<unsigned int, WORDS>*>(w + i * WORDS);
  const long group = i * PER / GROUP;
  const float scale = static_cast<float>(scales[group]);
  const float bias = static_cast<float>(biases[group]);
  Pack<T, PER> values;
  for (int j = 0; j < PER; ++j) {
    const unsigned int q = (codes.v[j * BITS / 32] >> ((j * BITS) % 32)) & ((1u << BITS) - 1u);
    values.v[j] = static_cast<T>(scale * static_cast<float>(q) + bias);  // one rounding, in float as MLX's kernel
  }
  *reinterpret_cast<Pack<T, PER>*>(out + i * PER) = values;
"""


def _kernel():
    return cuda_kernels.kernel("imagegen_affine_dequantize", ["w", "scales", "biases"], ["out"], _KERNEL)


def dequantize(
    w: mx.array, scales: mx.array, biases: mx.array, group_size: int, bits: int, dtype: mx.Dtype | None = None
) -> mx.array:
    """mx.dequantize(mode="affine"): the kernel where it applies (CUDA, 4 or 8 bits, the scales' dtype), else MLX's."""
    if cuda_kernels.available() and bits in (4, 8) and dtype in (None, scales.dtype) and scales.itemsize in (2, 4):
        return dequantize_fused(w, scales, biases, group_size, bits)
    return mx.dequantize(w, scales, biases, group_size=group_size, bits=bits, dtype=dtype)


def dequantize_fused(w: mx.array, scales: mx.array, biases: mx.array, group_size: int, bits: int) -> mx.array:
    """The CUDA kernel: w [..., in * bits / 32] uint32 -> [..., in] in the scales' dtype."""
    shape = (*w.shape[:-1], w.shape[-1] * 32 // bits)
    count = w.size * 32 // bits // PER
    return _kernel()(
        inputs=[w, scales, biases],
        template=[("T", scales.dtype), ("BITS", bits), ("GROUP", group_size), ("PER", PER)],
        grid=(count, 1, 1),
        threadgroup=(THREADS, 1, 1),
        output_shapes=[shape],
        output_dtypes=[scales.dtype],
    )[0]
