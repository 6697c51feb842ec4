"""What the hand-written CUDA kernels share: when they run, how they are built and launched, packed memory access.

They run on an MLX CUDA GPU unless IMAGEGEN_FUSED_KERNELS=0 (or NVRTC cannot be found); everywhere else (CPU,
Metal) the plain MLX ops they replace run, with the same results up to float rounding order.

A kernel is written as the body of a CUDA function, as for mx.fast.cuda_kernel: its inputs and outputs by name,
`<input>_shape[i]` and `<input>_ndim` for an input's shape, and compile-time template values. Each instantiation
is compiled once per machine by imagegen.nn.nvrtc and launched with mx.fast.precompiled_cuda_kernel; shapes are
run-time arguments, so a new image size compiles nothing. Inputs are made row-contiguous first (MLX copies a view
that is not), which is why a kernel needs no strides."""

from __future__ import annotations

import os
import re
import warnings
from collections.abc import Sequence
from functools import cache, lru_cache
from typing import Any

import mlx.core as mx

from . import nvrtc

ENABLED = os.environ.get("IMAGEGEN_FUSED_KERNELS", "1") != "0"

CUDA_TYPES = {
    mx.float32: "float",
    mx.float16: "__half",
    mx.bfloat16: "__nv_bfloat16",
    mx.uint32: "unsigned int",
    mx.int32: "int",
    mx.uint8: "unsigned char",
}


@lru_cache(maxsize=1)
def _cuda() -> bool:
    return hasattr(mx, "cuda") and mx.cuda.is_available()


@lru_cache(maxsize=1)
def _compiler() -> bool:
    try:
        nvrtc.library(), nvrtc.include_dirs()
        return True
    except nvrtc.NvrtcError as e:
        warnings.warn(f"imagegen's fused CUDA kernels are off: {e}", stacklevel=3)
        return False


def available() -> bool:
    """Whether the kernels run now: enabled, MLX's default device is a CUDA GPU, and NVRTC is there."""
    return ENABLED and mx.default_device() == mx.gpu and _cuda() and _compiler()


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


def _constant(name: str, value: Any) -> str:
    if isinstance(value, bool):
        return f"  constexpr bool {name} = {'true' if value else 'false'};"
    if isinstance(value, int):
        return f"  constexpr long {name} = {value}L;" if abs(value) >= 2**31 else f"  constexpr int {name} = {value};"
    return f"  using {name} = {CUDA_TYPES[value]};"


class Kernel:
    """One kernel body (module docstring); call it as mx.fast.cuda_kernel's kernels are called."""

    def __init__(
        self, name: str, inputs: Sequence[str], outputs: Sequence[str], source: str, headers: Sequence[str] = ()
    ):
        self.name, self.inputs, self.outputs, self.body = name, tuple(inputs), tuple(outputs), source
        self.headers = (*nvrtc.HEADERS, *headers)  # headers: more of CUDA's, beside the bf16 / fp16 ones
        self.shaped = tuple(n for n in self.inputs if re.search(rf"\b{n}_(shape|ndim)\b", source))
        if re.search(r"\b\w+_strides\b", source):
            raise ValueError(f"kernel {name}: inputs are row-contiguous, derive strides from <input>_shape")
        self._built: dict[tuple, bytes] = {}

    def source(self, inputs: Sequence[mx.array], template: Sequence[tuple[str, Any]], output_dtypes: Sequence) -> str:
        """The complete CUDA source of one instantiation: the body with its signature, shapes and template values."""
        params = [f"const {CUDA_TYPES[x.dtype]}* {n}" for n, x in zip(self.inputs, inputs)]
        params += [f"{CUDA_TYPES[d]}* {n}" for n, d in zip(self.outputs, output_dtypes)]
        prologue = []
        for n, x in zip(self.inputs, inputs):
            if n in self.shaped:
                params += [f"int {n}_shape_{i}" for i in range(x.ndim)]
                dims = ", ".join(f"{n}_shape_{i}" for i in range(x.ndim))
                prologue += [
                    f"  const long {n}_shape[{max(x.ndim, 1)}] = {{{dims}}};",
                    f"  constexpr int {n}_ndim = {x.ndim};",
                ]
        prologue += [_constant(k, v) for k, v in template]
        includes = "".join(f"#include <{h}>\n" for h in self.headers)
        signature = ",\n    ".join(params)
        return (
            f'{includes}{PACK_HEADER}\nextern "C" __global__ void {self.name}(\n    {signature}) {{\n'
            + "\n".join(prologue)
            + f"\n{self.body}\n}}\n"
        )

    def __call__(
        self,
        *,
        inputs: Sequence[mx.array],
        template: Sequence[tuple[str, Any]],
        grid: tuple[int, int, int],
        threadgroup: tuple[int, int, int],
        output_shapes: Sequence[Sequence[int]],
        output_dtypes: Sequence[mx.Dtype],
    ) -> list[mx.array]:
        key = (tuple((x.dtype, x.ndim) for x in inputs), tuple(template), tuple(output_dtypes))
        cubin = self._built.get(key)
        if cubin is None:
            cubin = self._built[key] = nvrtc.compile_cubin(self.source(inputs, template, output_dtypes), self.name)
        scalars = [d for n, x in zip(self.inputs, inputs) if n in self.shaped for d in x.shape]
        return mx.fast.precompiled_cuda_kernel(
            name=self.name,
            compiled_source=cubin,
            inputs=list(inputs),
            output_shapes=[tuple(s) for s in output_shapes],
            output_dtypes=list(output_dtypes),
            scalars=scalars,
            grid=grid,
            threadgroup=threadgroup,
            ensure_row_contiguous=True,
        )


def kernel(
    name: str, inputs: Sequence[str], outputs: Sequence[str], source: str, headers: Sequence[str] = ()
) -> Kernel:
    """The Kernel for a body, built once per process (instantiations compile on first launch)."""
    return _kernel(name, tuple(inputs), tuple(outputs), source, tuple(headers))


@cache
def _kernel(
    name: str, inputs: tuple[str, ...], outputs: tuple[str, ...], source: str, headers: tuple[str, ...]
) -> Kernel:
    return Kernel(name, inputs, outputs, source, headers)
