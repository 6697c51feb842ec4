"""What the hand-written CUDA kernels (mx.fast.cuda_kernel) share: when they run, and packed memory access.

They run on an MLX CUDA GPU unless IMAGEGEN_FUSED_KERNELS=0; everywhere else (CPU, Metal) the plain MLX ops they
replace run, with the same results up to float rounding order."""

from __future__ import annotations

import os
from collections.abc import Sequence
from functools import cache, lru_cache
from typing import Any

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


def kernel(name: str, inputs: Sequence[str], outputs: Sequence[str], source: str, row_contiguous: bool = True) -> Any:
    """mx.fast.cuda_kernel with the packed-access header above, built once (MLX compiles it at its first launch)."""
    return _kernel(name, tuple(inputs), tuple(outputs), source, row_contiguous)


@cache
def _kernel(name: str, inputs: tuple[str, ...], outputs: tuple[str, ...], source: str, row_contiguous: bool) -> Any:
    return mx.fast.cuda_kernel(
        name=name,
        input_names=list(inputs),
        output_names=list(outputs),
        source=source,
        header=PACK_HEADER,
        ensure_row_contiguous=row_contiguous,
    )
