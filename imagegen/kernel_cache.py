"""GPU kernels compiled once per machine, not once per process.

MLX's CUDA backend compiles many kernels with NVRTC on first use (the fused element-wise graphs of mx.compile,
quantized matmuls, gathers, ...) and keeps the device code on disk, by default under the system temp folder
(/tmp/mlx/<version>/ptx): gone after a reboot or a temp cleaner, and then every new process pays the compilation
again (Klein 9B: seconds). imagegen points that cache (MLX_PTX_CACHE_DIR, read by MLX on its first compilation) at
a user cache folder that lasts, and lets CUDA's own JIT cache (CUDA_CACHE_MAXSIZE, read when CUDA starts) grow
to its maximum, so a module that ships as PTX is not translated again either. Both are defaults only: a variable
the user set wins. IMAGEGEN_KERNEL_CACHE names another folder, or "off" to leave MLX's default.
"""

from __future__ import annotations

import os
from pathlib import Path

CUDA_CACHE_BYTES = 4 << 30  # CUDA's largest allowed JIT cache; its default (256 MiB) can evict kernels


def kernel_cache_dir() -> Path | None:
    """Where MLX's compiled kernels go: IMAGEGEN_KERNEL_CACHE, else $XDG_CACHE_HOME (~/.cache)/imagegen/mlx-kernels;
    None when turned off."""
    chosen = os.environ.get("IMAGEGEN_KERNEL_CACHE")
    if chosen is not None:
        return None if chosen.strip().lower() in ("", "0", "off", "none") else Path(chosen).expanduser()
    try:
        base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    except RuntimeError:  # no home folder: MLX's default stays
        return None
    return Path(base) / "imagegen" / "mlx-kernels"


def use_kernel_cache() -> None:
    """Set the defaults (module docstring) before MLX starts CUDA: importing this module does (imagegen's first
    import)."""
    folder = kernel_cache_dir()
    if folder is not None:
        os.environ.setdefault("MLX_PTX_CACHE_DIR", str(folder))
    os.environ.setdefault("CUDA_CACHE_MAXSIZE", str(CUDA_CACHE_BYTES))


use_kernel_cache()
