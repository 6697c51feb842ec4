"""Nearest 2x upsampling followed by a 3x3 conv, computed on the small input: the VAE decoders' Upsample2D.

Output pixel (2i + a, 2j + b) of the upsampled map sees input rows i - 1 + a and i + a (columns likewise), so each
of the four output phases (a, b) is a 2x2 conv of the input whose taps are sums of the 3x3 kernel's rows and
columns: for a = 0 [w0, w1 + w2], for a = 1 [w0 + w1, w2]. One 2x2 conv with the four phases' kernels as 4x the
output channels does 16 multiply-adds per input pixel and channel pair instead of 36, and never writes the 4x
larger upsampled map; a copy then puts each phase where it lands and adds the bias.

That copy: on CUDA one kernel with packed loads and stores (MLX's strided 6-d copy took 1.3 ms at 1024x1024x256 on
an H200, the kernel a fraction of it); elsewhere the strided view plus bias that it replaces."""

from __future__ import annotations

import mlx.core as mx

from . import cuda_kernels

THREADS = 256
_TAPS = mx.array([[[1, 0, 0], [0, 1, 1]], [[1, 1, 0], [0, 0, 1]]], dtype=mx.float32)  # [phase, 2x2 tap, 3x3 row]

# z [B, h + 1, w + 1, (a, b, C)]; bias [C]; out [B, 2h, 2w, C]. Each thread: PER channels of one output pixel.
_KERNEL = """
  const long h1 = z_shape[1], w1 = z_shape[2];
  const int c = z_shape[3] / 4;
  const int packs = c / PER;
  const long oh = 2 * (h1 - 1), ow = 2 * (w1 - 1);
  const long i = long(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= z_shape[0] * oh * ow * packs) return;
  const int col = (i % packs) * PER;
  const long pixel = i / packs;
  const long x = pixel % ow, y = (pixel / ow) % oh, b = pixel / (ow * oh);
  const int a = y & 1, e = x & 1;
  const T* src = z + ((b * h1 + y / 2 + a) * w1 + x / 2 + e) * 4 * c + (2 * a + e) * c + col;
  float v[PER], s[PER];
  load_row<T, PER>(src, 1, v);
  load_row<T, PER>(bias + col, 1, s);
  Pack<T, PER> y_out;
  for (int j = 0; j < PER; ++j) y_out.v[j] = static_cast<T>(v[j] + s[j]);
  *reinterpret_cast<Pack<T, PER>*>(out + i * PER) = y_out;
"""


def phase_weights(weight: mx.array) -> mx.array:
    """A 3x3 conv weight [O, 3, 3, I] -> the four phases' 2x2 kernels [(a, b, O), 2, 2, I] (summed in float32)."""
    o, _, _, i = weight.shape
    w = mx.einsum("aud,bve,odei->abouvi", _TAPS, _TAPS, weight.astype(mx.float32))
    return w.reshape(4 * o, 2, 2, i).astype(weight.dtype)


def interleave(z: mx.array, bias: mx.array) -> mx.array:
    """z [B, h + 1, w + 1, 4C], the 2x2 conv's output (phase (a, b) of output pixel (i, j) at z[i + a, j + b]) ->
    [B, 2h, 2w, C] + bias. The kernel where it applies, else the reference."""
    per = 16 // z.itemsize
    c = z.shape[-1] // 4
    if cuda_kernels.available() and z.itemsize in (2, 4) and bias.dtype == z.dtype and c % per == 0:
        return interleave_fused(z, bias)
    return interleave_reference(z, bias)


def interleave_reference(z: mx.array, bias: mx.array) -> mx.array:
    """A strided view of z that puts each phase where it lands ([B, i, a, j, b, C]); the bias add writes it."""
    b, h1, w1, c4 = z.shape
    c, row = c4 // 4, w1 * c4
    view = mx.as_strided(z, (b, h1 - 1, 2, w1 - 1, 2, c), (h1 * row, row, row + 2 * c, c4, c4 + c, 1))
    return (view + bias).reshape(b, 2 * (h1 - 1), 2 * (w1 - 1), c)


def interleave_fused(z: mx.array, bias: mx.array) -> mx.array:
    """The CUDA kernel (z row-contiguous, C a multiple of 16 bytes, bias in z's dtype)."""
    b, h1, w1, c4 = z.shape
    per = 16 // z.itemsize
    shape = (b, 2 * (h1 - 1), 2 * (w1 - 1), c4 // 4)
    return cuda_kernels.kernel("imagegen_phase_interleave", ["z", "bias"], ["out"], _KERNEL)(
        inputs=[z, bias],
        template=[("T", z.dtype), ("PER", per)],
        grid=(b * shape[1] * shape[2] * shape[3] // per, 1, 1),
        threadgroup=(THREADS, 1, 1),
        output_shapes=[shape],
        output_dtypes=[z.dtype],
    )[0]
