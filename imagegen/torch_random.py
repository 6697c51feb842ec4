"""torch's CPU random generator in numpy: `torch.Generator("cpu").manual_seed(S)` and `torch.randn`.

Follows ATen (core/MT19937RNGEngine.h, core/TransformationHelper.h, core/DistributionsHelper.h,
native/cpu/DistributionTemplates.h) bit for bit, so a seed gives the noise diffusers draws; torch stays
a test-only dependency. Written against torch 2.13 on x86-64 (AVX2 and AVX512
capability: avx_mathfun's log/sincos with GCC's fused multiply-adds). torch's DEFAULT kernel (ARM, macOS)
calls the C library instead and differs from this in the last bit of about 1% of the values.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

BLOCK = 16  # torch fills tensors of >= 16 elements with Box-Muller over 16-element chunks
TWO_PI = 2.0 * math.pi
F32 = np.float32
LOG_POLY = [
    F32(c)
    for c in (
        7.0376836292e-2,
        -1.1514610310e-1,
        1.1676998740e-1,
        -1.2420140846e-1,
        1.4249322787e-1,
        -1.6668057665e-1,
        2.0000714765e-1,
        -2.4999993993e-1,
        3.3333331174e-1,
    )
]  # cephes logf, as avx_mathfun.h writes them


def _mt19937_state(seed: int) -> np.ndarray:
    """MT19937 `init_genrand` with the low 32 bits of the seed, as torch's `mt19937(seed)` does."""
    key = np.empty(624, dtype=np.uint32)
    value = seed & 0xFFFFFFFF
    key[0] = value
    for i in range(1, 624):
        value = (1812433253 * (value ^ (value >> 30)) + i) & 0xFFFFFFFF
        key[i] = value
    return key


def _bfloat16(x: np.ndarray) -> np.ndarray:
    """Round float32 to the nearest bfloat16 (ties to even), kept as float32, as c10::BFloat16 does."""
    bits = np.asarray(x, dtype=np.float32).view(np.uint32)
    rounded = (bits + (0x7FFF + ((bits >> 16) & 1))) & 0xFFFF0000
    return np.where(np.isnan(x), np.float32(np.nan), rounded.view(np.float32)).astype(np.float32)


class TorchGenerator:
    """The state of one `torch.Generator("cpu")`: the MT19937 engine and torch's cached normal sample."""

    def __init__(self, seed: int):
        self.seed = int(seed)
        self._engine = np.random.MT19937()
        # pos=624 makes the next draw twist first, as torch's freshly seeded engine (left_=1) does.
        self._engine.state = {
            "bit_generator": "MT19937",
            "state": {"key": _mt19937_state(self.seed % 2**64), "pos": 624},
        }
        self._next_double_normal: float | None = None

    def random32(self, count: int) -> np.ndarray:
        """The next `count` 32-bit outputs of the engine (torch's `generator->random()`)."""
        return self._engine.random_raw(count).astype(np.uint32)

    def _random64(self) -> int:
        high, low = (int(v) for v in self.random32(2))
        return (high << 32) | low

    def _uniform(self, count: int) -> np.ndarray:
        """`uniform_real_distribution<float>(0, 1)`: the low 24 bits of a 32-bit draw over 2**24."""
        return (self.random32(count) & np.uint32((1 << 24) - 1)).astype(np.float32) * F32(2.0**-24)

    def _normal_double(self) -> float:
        """`normal_distribution<double>`: Box-Muller in double, the sine half cached for the next call."""
        if self._next_double_normal is not None:
            value, self._next_double_normal = self._next_double_normal, None
            return value
        u1 = (self._random64() & ((1 << 53) - 1)) * 2.0**-53
        u2 = (self._random64() & ((1 << 53) - 1)) * 2.0**-53
        radius = math.sqrt(-2.0 * math.log1p(-u2))
        theta = TWO_PI * u1
        self._next_double_normal = radius * math.sin(theta)
        return radius * math.cos(theta)

    def randn(self, shape: Sequence[int], dtype: str = "float32") -> np.ndarray:
        """`torch.randn(shape, generator=self, dtype=dtype)`, returned as float32 holding the dtype's values."""
        if dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"torch noise supports float32, bfloat16 and float16, not {dtype}")
        size = math.prod(shape)
        if size < BLOCK:
            # Small tensors take one double-precision normal per element, rounded to the dtype.
            values = np.array([self._normal_double() for _ in range(size)], dtype=np.float64).astype(np.float32)
        else:
            values = self._fill_float32(size, reduced=dtype != "float32")
        if dtype == "bfloat16":
            values = _bfloat16(values)
        elif dtype == "float16":
            values = values.astype(np.float16).astype(np.float32)  # c10::Half rounds to nearest even, as numpy
        return values.reshape(shape)

    def _fill_float32(self, size: int, reduced: bool) -> np.ndarray:
        """`normal_fill_AVX2`: uniforms first, Box-Muller per 16, a ragged tail redrawn as a last 16.

        float32 draws a uniform for every element (the tail's are discarded); bfloat16 and float16 go through
        the same float32 math but draw uniforms for the whole chunks only, then round.
        """
        whole = size - size % BLOCK
        data = np.zeros(size, np.float32)
        data[: whole if reduced else size] = self._uniform(whole if reduced else size)
        data[:whole] = _box_muller_16(data[:whole].reshape(-1, BLOCK)).reshape(-1)
        if size % BLOCK:
            data[size - BLOCK :] = _box_muller_16(self._uniform(BLOCK).reshape(1, BLOCK)).reshape(-1)
        return data


def _fma(a: np.ndarray, b: np.ndarray, c: np.ndarray) -> np.ndarray:
    """float32 fused multiply-add, rounded once: the exact product in float64, a sum rounded to odd."""
    product = np.asarray(a, np.float32).astype(np.float64) * np.asarray(b, np.float32).astype(np.float64)
    addend = np.asarray(c, np.float32).astype(np.float64)
    total = product + addend
    back = total - product
    error = (product - (total - back)) + (addend - back)
    # Round to odd, then to float32: a double rounding that equals one correct rounding (53 >= 24 + 2 bits).
    to_odd = (error != 0) & ((total.view(np.uint64) & 1) == 0)
    total = np.where(to_odd, np.nextafter(total, np.where(error > 0, np.inf, -np.inf)), total)
    return total.astype(np.float32)


def _log(x: np.ndarray) -> np.ndarray:
    """`log256_ps` of avx_mathfun.h (cephes logf), with the multiply-adds GCC fuses in torch's build."""
    bits = x.view(np.int32)
    exponent = ((bits >> 23) - 0x7F).astype(np.float32) + F32(1)
    x = ((bits & ~0x7F800000) | F32(0.5).view(np.int32)).view(np.float32)
    below = x < F32(0.707106781186547524)
    exponent = exponent - np.where(below, F32(1), F32(0))
    x = (x - F32(1)) + np.where(below, x, F32(0))
    z = x * x
    y = np.full_like(x, LOG_POLY[0])
    for coefficient in LOG_POLY[1:]:
        y = _fma(y, x, coefficient)
    y = _fma(y * x, z, exponent * F32(-2.12194440e-4))
    y = y - z * F32(0.5)
    return (x + y) + exponent * F32(0.693359375)


def _sincos(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """`sincos256_ps` of avx_mathfun.h (cephes sinf/cosf) for x >= 0, with GCC's fused multiply-adds."""
    octant = (np.trunc(x * F32(1.27323954473516)).astype(np.int32) + 1) & ~1
    y = octant.astype(np.float32)
    for part in (-0.78515625, -2.4187564849853515625e-4, -3.77489497744594108e-8):  # x - y * pi/4, in 3 parts
        x = _fma(y, F32(part), x)
    z = x * x
    cos_poly = _fma(
        _fma(np.full_like(x, F32(2.443315711809948e-5)), z, F32(-1.388731625493765e-3)), z, F32(4.166664568298827e-2)
    )
    cos_poly = _fma(cos_poly * z, z, -(z * F32(0.5))) + F32(1)
    sin_poly = _fma(_fma(np.full_like(x, F32(-1.9515295891e-4)), z, F32(8.3321608736e-3)), z, F32(-1.6666654611e-1))
    sin_poly = _fma(sin_poly * z, x, x)
    swap = (octant & 2) != 0
    sin = np.where(swap, cos_poly, sin_poly)
    cos = np.where(swap, sin_poly, cos_poly)
    sin = np.where((octant & 4) != 0, -sin, sin)
    cos = np.where((~(octant - 2) & 4) != 0, -cos, cos)
    return sin, cos


def _box_muller_16(chunks: np.ndarray) -> np.ndarray:
    """`normal_fill_16_AVX2` on rows of 16 uniforms: u1 from the first 8, u2 from the last 8."""
    radius = np.sqrt(F32(-2.0) * _log(F32(1.0) - chunks[:, :8]))
    sin, cos = _sincos(F32(TWO_PI) * chunks[:, 8:])
    return np.concatenate([radius * cos, radius * sin], axis=1)


def randn_tensor(
    shape: Sequence[int], generator: TorchGenerator | Sequence[TorchGenerator], dtype: str = "float32"
) -> np.ndarray:
    """diffusers' `randn_tensor` on the CPU: one draw of the whole shape, or one per batch item for a list."""
    if isinstance(generator, TorchGenerator):
        return generator.randn(shape, dtype)
    if len(generator) != shape[0]:
        raise ValueError(f"{len(generator)} generators for a batch of {shape[0]}")
    return np.concatenate([g.randn((1, *shape[1:]), dtype) for g in generator], axis=0)
