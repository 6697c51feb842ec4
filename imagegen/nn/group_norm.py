"""Group norm of NHWC activations on CUDA in two passes over the tensor: statistics, then normalize + affine (+ SiLU).

The portable path (imagegen.nn.vae_blocks) makes each group one contiguous row for mx.fast.layer_norm: two transposing
copies and a norm kernel with one block per group (32 blocks for the whole GPU). H100, 1024x1024x128 bf16: 2.8 ms
per norm, 3x a 3x3 convolution of the same tensor, and the decoder runs 30 of them. Here:

1. statistics: blocks over chunks of pixels, each thread summing one pack of channels (16-byte loads) of a group,
   shifted by the group's first value so the float32 sums keep their precision; the partial sums of each chunk
   are added in a fixed order (no atomics: the same image every run).
2. per-group mean and variance -> per-channel scale and shift (tiny MLX ops on [B, C]).
3. one element-wise pass: x * scale + shift, SiLU, in packed loads and stores.

`input_bias`: the norm of x + input_bias (per channel), the bias of the convolution before it, which then never
makes its own pass over the tensor: the statistics subtract a per-channel offset anyway, and the apply pass's shift
absorbs input_bias * scale.

Three reads and one write of the tensor become one write and two reads. Elsewhere (CPU, Metal) the portable path
runs (imagegen.nn.cuda_kernels)."""

from __future__ import annotations

import math
from typing import Any

import mlx.core as mx

from . import cuda_kernels

THREADS = 256  # at most, per block; the statistics pass uses the largest multiple of its packs per row
BLOCKS = 1024  # statistics blocks per image: enough to fill every SM several times

# x [B, N, C]; shift [B, C] float32; out [B, chunks, C / P, 2] float32 (sum and sum of squares of x - shift).
# Threads of a block keep one pack of P channels each (THREADS, the block's size, is a multiple of C / P), stepping
# over the rows.
_STATS = """
  const int t = threadIdx.x;
  const long n = x_shape[1];
  const int c = x_shape[2];
  const int packs = c / P;
  const int step = THREADS / packs;
  const int pack = t % packs;
  const long b = blockIdx.y;
  const long rows = ((n + gridDim.x - 1) / gridDim.x + step - 1) / step * step;
  const long first = long(blockIdx.x) * rows;
  const long last = min(first + rows, n);
  float k[P];
  for (int j = 0; j < P; ++j) k[j] = shift[b * c + pack * P + j];
  const T* base = x + b * n * c + pack * P;
  float s1 = 0.f, s2 = 0.f;
  for (long row = first + t / packs; row < last; row += step) {
    float v[P];
    load_row<T, P>(base + row * c, 1, v);
    for (int j = 0; j < P; ++j) {
      const float d = v[j] - k[j];
      s1 += d;
      s2 += d * d;
    }
  }
  __shared__ float sums[2][THREADS];
  sums[0][t] = s1;
  sums[1][t] = s2;
  __syncthreads();
  if (t < packs) {
    float a = 0.f, q = 0.f;
    for (int i = t; i < THREADS; i += packs) {
      a += sums[0][i];
      q += sums[1][i];
    }
    float* o = out + ((b * gridDim.x + blockIdx.x) * packs + t) * 2;
    o[0] = a;
    o[1] = q;
  }
"""

# x [B, N, C]; scale, shift [B, C] float32; out [B, N, C]: x * scale + shift (then SiLU), P channels per thread.
_APPLY = """
  const long i = long(blockIdx.x) * blockDim.x + threadIdx.x;
  const long n = x_shape[1];
  const int c = x_shape[2];
  const int packs = c / P;
  if (i >= x_shape[0] * n * packs) return;
  const long row = i / packs;
  const int col = (i % packs) * P;
  const float* a = scale + (row / n) * c + col;
  const float* s = shift + (row / n) * c + col;
  float v[P];
  load_row<T, P>(x + row * c + col, 1, v);
  Pack<T, P> y;
  for (int j = 0; j < P; ++j) {
    float z = v[j] * a[j] + s[j];
    if (SILU) z = z / (1.f + expf(-z));
    y.v[j] = static_cast<T>(z);
  }
  *reinterpret_cast<Pack<T, P>*>(out + row * c + col) = y;
"""


def _stats_kernel():
    return cuda_kernels.kernel("imagegen_group_norm_stats", ["x", "shift"], ["out"], _STATS)


def _apply_kernel():
    return cuda_kernels.kernel("imagegen_group_norm_apply", ["x", "scale", "shift"], ["out"], _APPLY)


def _pack(x: mx.array, groups: int) -> int:
    """Channels per thread in the statistics pass: a 16-byte load, or fewer so a pack stays in one group."""
    return math.gcd(16 // x.itemsize, x.shape[-1] // groups)


def _stats_threads(x: mx.array, groups: int) -> int:
    """Threads per statistics block: whole rows of packs (96 packs, BFL's small decoder: 192 threads)."""
    packs = x.shape[-1] // _pack(x, groups)
    return THREADS // packs * packs


def supported(x: mx.array, groups: int) -> bool:
    """Whether the kernels run for x [B, H, W, C] now (a CUDA GPU, a float type, a row of packs fits a block)."""
    if not cuda_kernels.available() or x.ndim != 4 or x.dtype not in (mx.float32, mx.bfloat16, mx.float16):
        return False
    c = x.shape[-1]
    return c % groups == 0 and _stats_threads(x, groups) > 0 and c % (16 // x.itemsize) == 0


@mx.compile
def _scale_shift(
    sums: mx.array,
    first: mx.array,
    weight: mx.array,
    bias: mx.array,
    input_bias: mx.array | float,
    eps: mx.array,
    count: mx.array,
) -> tuple[mx.array, mx.array]:
    """Per-channel scale and shift [B, C] for x (whose norm is that of x + input_bias, float32 [C] or 0.0) from the
    summed statistics [B, G, 2] of x + input_bias - first."""
    groups, c = first.shape[1], weight.shape[0]
    m = sums[..., 0] / count
    var = mx.maximum(sums[..., 1] / count - m * m, 0.0)
    rstd = mx.repeat(mx.rsqrt(var + eps), c // groups, axis=1)
    mean = mx.repeat(first + m, c // groups, axis=1)
    scale = rstd * weight.astype(mx.float32)
    return scale, bias.astype(mx.float32) + (input_bias - mean) * scale


def group_norm(
    x: mx.array,
    weight: mx.array,
    bias: mx.array,
    groups: int,
    eps: float,
    silu: bool,
    split: Any = None,
    input_bias: mx.array | None = None,
) -> mx.array:
    """torch.nn.GroupNorm (then SiLU) of x [B, H, W, C] (plus `input_bias` [C], if given) on CUDA; check `supported`
    first. `split`: x is one band of a map's rows (an imagegen.nn.row_split.RowSplit), whose statistics are summed
    over every band."""
    b, h, w, c = x.shape
    rows = x.reshape(b, h * w, c)
    pack, threads = _pack(x, groups), _stats_threads(x, groups)
    blocks = min(BLOCKS, max(1, h * w // (threads // (c // pack))))
    first = x[:, 0, 0, :: c // groups].astype(mx.float32)  # each group's shift: one of its own values
    if input_bias is not None:
        input_bias = input_bias.astype(mx.float32)
        first = first + input_bias[:: c // groups]
    if split is not None:  # one shift for all bands: the mean of theirs
        first = split.sum(first) / split.size
    offsets = mx.repeat(first, c // groups, axis=1)
    if input_bias is not None:
        offsets = offsets - input_bias  # x - offsets = x + input_bias - first
    partial = _stats_kernel()(
        inputs=[rows, offsets],
        template=[("T", x.dtype), ("P", pack), ("THREADS", threads)],
        grid=(blocks * threads, b, 1),
        threadgroup=(threads, 1, 1),
        output_shapes=[(b, blocks, c // pack, 2)],
        output_dtypes=[mx.float32],
    )[0]
    sums = partial.reshape(b, blocks, groups, c // groups // pack, 2).sum(axis=(1, 3))
    height = h
    if split is not None:
        sums, height = split.sum(sums), split.total_rows(x)
    scale, shift = _scale_shift(
        sums,
        first,
        weight,
        bias,
        0.0 if input_bias is None else input_bias,  # a constant of the compiled function: no array, no kernel
        mx.array(eps, mx.float32),
        mx.array(height * w * (c // groups), mx.float32),
    )
    per = 16 // x.itemsize
    out = _apply_kernel()(
        inputs=[rows, scale, shift],
        template=[("T", x.dtype), ("P", per), ("SILU", silu)],
        grid=(b * h * w * c // per, 1, 1),
        threadgroup=(THREADS, 1, 1),
        output_shapes=[(b, h * w, c)],
        output_dtypes=[x.dtype],
    )[0]
    return out.reshape(b, h, w, c)
