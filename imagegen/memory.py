"""Memory pre-flight: estimate a run's peak from the checkpoint headers and refuse what cannot fit."""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import mlx.core as mx

from .errors import ImagegenError, WeightsError
from .quantize import normalize_mode, scheme

BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}


class InsufficientMemoryError(ImagegenError):
    """The run would clearly not fit in memory; the message suggests what to change."""


def parameter_counts(folder: Path) -> tuple[int, int]:
    """(parameters in matrices, other parameters) of a component, read from safetensors headers only."""
    matrices = other = 0
    for f in sorted(Path(folder).glob("*.safetensors")):
        try:
            with open(f, "rb") as fh:
                (size,) = struct.unpack("<Q", fh.read(8))
                header = json.loads(fh.read(size))
        except (struct.error, ValueError, UnicodeDecodeError) as e:  # truncated or not safetensors
            raise WeightsError(f"Cannot read {f}: not a valid safetensors file ({type(e).__name__})") from None
        for name, meta in header.items():
            if name == "__metadata__":
                continue
            count = 1
            for d in meta["shape"]:
                count *= d
            if len(meta["shape"]) == 2:
                matrices += count
            else:
                other += count
    return matrices, other


def weight_bytes(folder: Path, dtype: str, quantize: str | None, quantized: bool) -> int:
    """Bytes of a component once loaded: matrices at the quantized width when `quantized`."""
    matrices, other = parameter_counts(folder)
    per = BYTES.get(dtype, 2)
    if quantize and quantized:
        s = scheme(normalize_mode(quantize))
        scales = 2 * per / s["group_size"] if s["group_size"] else 0  # (+ biases); fp8: one per row
        matrix_bytes = matrices * (s["bits"] / 8 + scales)
    else:
        matrix_bytes = matrices * per
    return int(matrix_bytes + other * per)


def available_memory() -> int:
    """Bytes a run may use: the GPU's memory (CUDA / Metal), else the system's available RAM."""
    if mx.default_device() == mx.gpu:
        info = mx.device_info()
        for key in ("max_recommended_working_set_size", "memory_size", "total_memory"):
            if info.get(key):
                return int(info[key])
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


def preflight(needed: int, model: str, force: bool = False, available: int | None = None) -> None:
    """Refuse a run whose estimate exceeds what is available (unless forced)."""
    available = available_memory() if available is None else available
    if force or needed <= available:
        return
    gib = 1024**3
    raise InsufficientMemoryError(
        f"'{model}' needs about {needed / gib:.1f} GiB but {available / gib:.1f} GiB is available: "
        "try --quantize 4, a smaller --size, or --tile (or --force to try anyway)."
    )


def pipeline_weight_bytes(root: Path, dtype: str, quantize: str | None) -> int:
    """A diffusers-layout folder's weights once loaded: text encoder and transformer (quantized when asked)
    plus the VAE (never quantized)."""
    root = Path(root)
    total = weight_bytes(root / "vae", dtype, None, quantized=False)
    for component in ("text_encoder", "transformer"):
        total += weight_bytes(root / component, dtype, quantize, quantized=True)
    return total
