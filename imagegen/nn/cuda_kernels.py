"""What the hand-written CUDA kernels (mx.fast.cuda_kernel) share: when they run, and packed memory access.

They run on an MLX CUDA GPU unless IMAGEGEN_FUSED_KERNELS=0; everywhere else (CPU, Metal) the plain MLX ops they
replace run, with the same results up to float rounding order."""

from __future__ import annotations

import os
from functools import lru_cache

import mlx.core as mx

ENABLED = os.environ.get("IMAGEGEN_FUSED_KERNELS", "1") != "0"


@lru_cache(maxsize=1)
def _cuda() -> bool:
    return hasattr(mx, "cuda") and mx.cuda.is_available()


def available() -> bool:
    """Whether the kernels run now: enabled, and MLX's default device is a CUDA GPU."""
    return ENABLED and mx.default_device() == mx.gpu and _cuda()


# N consecutive values in one memory transaction when contiguous and aligned (else one by one).
PACK_HEADER = """
template <typename T, int N>
struct alignas(sizeof(T) * N) Pack { T v[N]; };

template <typename T, int N>
__device__ inline void load_row(const T* p, long stride, float* out) {
  if (stride == 1 && reinterpret_cast<unsigned long>(p) % sizeof(Pack<T, N>) == 0) {
    const Pack<T, N> pack = *reinterpret_cast<const Pack<T, N>*>(p);
    for (int i = 0; i < N; ++i) out[i] = static_cast<float>(pack.v[i]);
  } else {
    for (int i = 0; i < N; ++i) out[i] = static_cast<float>(p[i * stride]);
  }
}
"""
