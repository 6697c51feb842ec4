"""q, k, v for attention from fused projections: per-head RMS norm of q and k, interleaved-pair RoPE, and the
[B, L, H, D] layout that attention reads through transposed views.

Each source is a projection whose first 3 * H * D columns hold q, k and v ([3, H, D] per token), with its own q/k
norms; several sources (FLUX.2's text and image streams) are concatenated along the tokens. On CUDA one kernel reads
each head of q and k once and writes it normed and rotated: the plain MLX path copies the strided q/k slices, norms
them and rotates them in three passes. Elsewhere, or with IMAGEGEN_FUSED_KERNELS=0, the plain path runs
(imagegen.nn.cuda_kernels)."""

from __future__ import annotations

from collections.abc import Sequence
from functools import cache

import mlx.core as mx
import mlx.nn as nn

from ..rope import apply_rope_tables
from . import cuda_kernels

Source = tuple[mx.array, nn.RMSNorm, nn.RMSNorm]  # projection [B, L, >= 3 * H * D], norm of q, norm of k

THREADS = 256

# One warp per (token, head) row: each lane owns D / 32 consecutive channels (whole RoPE pairs); q's and k's sums of
# squares are reduced across the warp together. Arithmetic follows mx.fast.rms_norm (w * T(x * rsqrt(mean(x^2) +
# eps))) and apply_rope_tables (float32 rotation of the normed values, rounded once).
_KERNEL = """
  constexpr int PER = D / 32;
  const int lane = threadIdx.x & 31;
  const long row = (long(blockIdx.x) * blockDim.x + threadIdx.x) >> 5;
  const long first_len = {first_len};
  const long L = first_len + xb_shape[1];
  if (row >= xb_shape[0] * L * H) return;
  const long h = row % H, l = (row / H) % L, b = row / (H * L);
  const T* x;
  const T* wq;
  const T* wk;
  {select}
  const int d0 = lane * PER;
  x += h * D + d0;
  float v[2][PER], c[PER], s[PER];
  load_row<T, PER>(x, 1, v[0]);
  load_row<T, PER>(x + H * D, 1, v[1]);
  load_row<float, PER>(cos + l * D + d0, 1, c);
  load_row<float, PER>(sin + l * D + d0, 1, s);
  float ss[2] = {{0.f, 0.f}};
  for (int i = 0; i < PER; ++i) {{
    ss[0] += v[0][i] * v[0][i];
    ss[1] += v[1][i] * v[1][i];
  }}
  for (int o = 16; o > 0; o >>= 1) {{
    ss[0] += __shfl_xor_sync(0xffffffff, ss[0], o);
    ss[1] += __shfl_xor_sync(0xffffffff, ss[1], o);
  }}
  const long out = row * D + d0;
  for (int part = 0; part < 2; ++part) {{
    const float r = rsqrtf(ss[part] / D + {eps});
    const T* w = (part == 0 ? wq : wk) + d0;
    Pack<T, PER> y;
    for (int i = 0; i < PER; i += 2) {{
      const float a = static_cast<float>(w[i] * static_cast<T>(v[part][i] * r));
      const float z = static_cast<float>(w[i + 1] * static_cast<T>(v[part][i + 1] * r));
      y.v[i] = static_cast<T>(a * c[i] + z * s[i]);
      y.v[i + 1] = static_cast<T>(z * c[i + 1] + a * s[i + 1]);
    }}
    *reinterpret_cast<Pack<T, PER>*>((part == 0 ? q_out : k_out) + out) = y;
  }}
  {copy_v}
"""

_SELECT_ONE = "x = xb + (b * xb_shape[1] + l) * xb_shape[2]; wq = wqb; wk = wkb;"
_SELECT_TWO = """if (l < first_len) {
    x = xa + (b * xa_shape[1] + l) * xa_shape[2]; wq = wqa; wk = wka;
  } else {
    x = xb + (b * xb_shape[1] + l - first_len) * xb_shape[2]; wq = wqb; wk = wkb;
  }"""
_COPY_V = """float vv[PER];
  load_row<T, PER>(x + 2 * H * D, 1, vv);
  Pack<T, PER> y;
  for (int i = 0; i < PER; ++i) y.v[i] = static_cast<T>(vv[i]);
  *reinterpret_cast<Pack<T, PER>*>(v_out + out) = y;"""


@cache
def _kernel(sources: int, eps: float):
    two = sources == 2
    source = _KERNEL.format(
        first_len="xa_shape[1]" if two else "0",
        select=_SELECT_TWO if two else _SELECT_ONE,
        copy_v=_COPY_V if two else "",
        eps=f"{float(eps)!r}f",
    )
    inputs = (["xa", "xb", "wqa", "wka", "wqb", "wkb"] if two else ["xb", "wqb", "wkb"]) + ["cos", "sin"]
    outputs = ["q_out", "k_out", "v_out"] if two else ["q_out", "k_out"]
    return cuda_kernels.kernel(f"imagegen_qk_norm_rope_{sources}", inputs, outputs, source)


def _fused_ok(sources: Sequence[Source], head_dim: int, cos: mx.array) -> bool:
    if not (len(sources) <= 2 and cuda_kernels.available()):
        return False
    x = sources[0][0]
    same_eps = len({n.eps for _, nq, nk in sources for n in (nq, nk)}) == 1
    return (
        head_dim % 64 == 0
        and x.dtype in (mx.bfloat16, mx.float16, mx.float32)
        and same_eps
        and all(s[0].dtype == x.dtype and s[0].ndim == 3 for s in sources)
        and cos.size == sum(s[0].shape[1] for s in sources) * head_dim
    )


def _heads(x: mx.array, heads: int, head_dim: int) -> mx.array:
    """[B, L, >= 3HD] -> [B, L, 3, H, D] view of the q, k, v columns."""
    b, length, _ = x.shape
    return x[..., : 3 * heads * head_dim].reshape(b, length, 3, heads, head_dim)


def qk_norm_rope(
    sources: Sequence[Source], heads: int, head_dim: int, cos: mx.array, sin: mx.array
) -> tuple[mx.array, mx.array, mx.array]:
    """q, k, v [B, L, H, D] over the sources' tokens in order; cos, sin: rope_tables' full-width tables covering
    those tokens ([L, D] or any shape of that size, float32). v of a single source is a view of its projection.
    The fused kernel where it applies, else the reference."""
    if _fused_ok(sources, head_dim, cos):
        return qk_norm_rope_fused(sources, heads, head_dim, cos, sin)
    return qk_norm_rope_reference(sources, heads, head_dim, cos, sin)


def qk_norm_rope_fused(
    sources: Sequence[Source], heads: int, head_dim: int, cos: mx.array, sin: mx.array
) -> tuple[mx.array, mx.array, mx.array]:
    """The CUDA kernel: each head of q and k read once, RMS-normed and rotated (conditions: `_fused_ok`)."""
    length = sum(s[0].shape[1] for s in sources)
    b = sources[-1][0].shape[0]
    shape = (b, length, heads, head_dim)
    arrays = [s[0] for s in sources]
    for _, norm_q, norm_k in sources:
        arrays += [norm_q.weight.astype(arrays[0].dtype), norm_k.weight.astype(arrays[0].dtype)]
    arrays += [cos.reshape(length, head_dim).astype(mx.float32), sin.reshape(length, head_dim).astype(mx.float32)]
    n_out = 3 if len(sources) == 2 else 2
    outs = _kernel(len(sources), sources[0][1].eps)(
        inputs=arrays,
        template=[("T", arrays[0].dtype), ("H", heads), ("D", head_dim)],
        grid=(b * length * heads * 32, 1, 1),
        threadgroup=(THREADS, 1, 1),
        output_shapes=[shape] * n_out,
        output_dtypes=[arrays[0].dtype] * n_out,
    )
    if len(sources) == 1:
        return outs[0], outs[1], _heads(sources[0][0], heads, head_dim)[:, :, 2]
    return tuple(outs)


def qk_norm_rope_reference(
    sources: Sequence[Source], heads: int, head_dim: int, cos: mx.array, sin: mx.array
) -> tuple[mx.array, mx.array, mx.array]:
    """The plain-MLX definition (the spec the fused kernel is tested against): copy, norm and rotate."""
    parts = [_heads(x, heads, head_dim) for x, _, _ in sources]
    q = [norm_q(p[:, :, 0]) for p, (_, norm_q, _) in zip(parts, sources)]
    k = [norm_k(p[:, :, 1]) for p, (_, _, norm_k) in zip(parts, sources)]
    v = [p[:, :, 2] for p in parts]
    q, k, v = ((a[0] if len(a) == 1 else mx.concatenate(a, axis=1)) for a in (q, k, v))
    length = q.shape[1]
    cos, sin = cos.reshape(length, 1, head_dim), sin.reshape(length, 1, head_dim)
    return apply_rope_tables(q, cos, sin), apply_rope_tables(k, cos, sin), v
