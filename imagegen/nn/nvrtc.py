"""CUDA C++ source to device code with NVRTC, once per machine.

imagegen's hand-written kernels (imagegen.nn.cuda_kernels) are compiled here rather than by mx.fast.cuda_kernel:
that one compiles each template instantiation once per process, with MLX's device headers (the CUDA C++ standard
library among them: 1.7 s per kernel on the H200 machine's CPU), and the first image of every new Klein 9B process
spent about 12 s there. Our kernels need cuda_bf16.h / cuda_fp16.h alone (0.05 s to compile), and the device code
is kept on disk beside MLX's own compiled kernels (imagegen.kernel_cache), so a later process only reads a file.

NVRTC is the compiler library MLX's CUDA backend ships and has already loaded; its headers come from the same
NVIDIA packages (or CUDA_HOME / CUDA_PATH / /usr/local/cuda). The compiler and the headers are found on first use.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import sys
import threading
from functools import cache
from pathlib import Path

import mlx.core as mx

from ..kernel_cache import kernel_cache_dir

HEADERS = ("cuda_bf16.h", "cuda_fp16.h")
ELF = b"\x7fELF"  # how every cubin starts
_LIBRARY_NAMES = ("libnvrtc.so.13", "libnvrtc.so.12", "libnvrtc.so", "nvrtc64_130_0.dll", "nvrtc64_120_0.dll")
_lock = threading.Lock()
_compiled: dict[str, bytes] = {}  # this process: cache key -> device code


class NvrtcError(RuntimeError):
    """NVRTC is missing, or a kernel did not compile (the message has NVRTC's log)."""


def _package_dirs() -> list[Path]:
    """Folders that may hold the NVIDIA pip packages (site-packages/nvidia/<name>)."""
    return [Path(p) / "nvidia" for p in sys.path if p and (Path(p) / "nvidia").is_dir()]


def _cuda_homes() -> list[Path]:
    homes = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    return [Path(h) for h in homes if h]


@cache
def library() -> ctypes.CDLL:
    """libnvrtc: the copy MLX loaded (found by its name), else one in the NVIDIA packages or the CUDA toolkit."""
    candidates: list[str] = list(_LIBRARY_NAMES)
    for root in _package_dirs():
        candidates += [
            str(p) for sub in ("cu13", "cuda_nvrtc", "cu12") for p in sorted((root / sub / "lib").glob("libnvrtc.so*"))
        ]
    for home in _cuda_homes():
        candidates += [str(p) for p in sorted((home / "lib64").glob("libnvrtc.so*"))]
    for name in candidates:
        if "builtins" in name:
            continue
        try:
            return ctypes.CDLL(name)
        except OSError:
            continue
    raise NvrtcError(
        "NVRTC (libnvrtc) not found: install MLX's CUDA extra (pip install 'mlx[cuda13]') or set CUDA_HOME"
    )


@cache
def include_dirs() -> tuple[str, ...]:
    """Folders holding cuda_bf16.h: the NVIDIA runtime packages', else the CUDA toolkit's."""
    folders = [root / sub / "include" for root in _package_dirs() for sub in ("cu13", "cuda_runtime", "cu12")]
    folders += [home / "include" for home in _cuda_homes()]
    found = tuple(dict.fromkeys(str(f) for f in folders if (f / HEADERS[0]).is_file()))
    if not found:
        raise NvrtcError("CUDA headers (cuda_bf16.h) not found: install nvidia-cuda-runtime or set CUDA_HOME")
    return found


@cache
def version() -> str:
    major, minor = ctypes.c_int(), ctypes.c_int()
    _check(library().nvrtcVersion(ctypes.byref(major), ctypes.byref(minor)), "nvrtcVersion")
    return f"{major.value}.{minor.value}"


def device_arch() -> str:
    """The default GPU's architecture as NVRTC names it: sm_90a on an H100/H200 (the 'a' features, as MLX
    compiles its own kernels from compute capability 9 on)."""
    info = mx.device_info(mx.gpu)
    major, minor = int(info["compute_capability_major"]), int(info["compute_capability_minor"])
    return f"sm_{major}{minor}{'a' if major >= 9 else ''}"


def _check(result: int, what: str) -> None:
    if result != 0:
        raise NvrtcError(f"{what} failed (NVRTC error {result})")


def _nvrtc_compile(source: str, name: str, arch: str) -> bytes:
    lib = library()
    program = ctypes.c_void_p()
    _check(lib.nvrtcCreateProgram(ctypes.byref(program), source.encode(), f"{name}.cu".encode(), 0, None, None), name)
    try:
        options = [f"--gpu-architecture={arch}", "--std=c++17", *(f"--include-path={d}" for d in include_dirs())]
        argv = (ctypes.c_char_p * len(options))(*(o.encode() for o in options))
        if lib.nvrtcCompileProgram(program, len(options), argv) != 0:
            size = ctypes.c_size_t()
            lib.nvrtcGetProgramLogSize(program, ctypes.byref(size))
            log = ctypes.create_string_buffer(size.value)
            lib.nvrtcGetProgramLog(program, log)
            raise NvrtcError(f"kernel {name} did not compile for {arch}:\n{log.value.decode(errors='replace')}")
        size = ctypes.c_size_t()
        _check(lib.nvrtcGetCUBINSize(program, ctypes.byref(size)), "nvrtcGetCUBINSize")
        cubin = ctypes.create_string_buffer(size.value)
        _check(lib.nvrtcGetCUBIN(program, cubin), "nvrtcGetCUBIN")
        return cubin.raw
    finally:
        lib.nvrtcDestroyProgram(ctypes.byref(program))


def cache_folder() -> Path | None:
    """Where compiled kernels are kept: a folder inside MLX's kernel cache (None when that cache is off)."""
    folder = kernel_cache_dir()
    return None if folder is None else folder / "imagegen"


def compile_cubin(source: str, name: str, arch: str | None = None) -> bytes:
    """Device code (a cubin) for `source` on `arch` (default: this GPU's): from this process's memory, the disk
    cache, or NVRTC (then saved; written to a temporary name and renamed, so concurrent processes never read half
    a file)."""
    arch = arch or device_arch()
    key = hashlib.sha256(f"{version()}\n{arch}\n{source}".encode()).hexdigest()[:32]
    with _lock:
        if key in _compiled:
            return _compiled[key]
        folder = cache_folder()
        path = None if folder is None else folder / f"{name}-{arch}-{key}.cubin"
        try:
            cubin = path.read_bytes() if path is not None else None
        except OSError:
            cubin = None
        if not cubin or not cubin.startswith(ELF):  # missing, or not device code (a damaged file): compile again
            cubin = _nvrtc_compile(source, name, arch)
            if path is not None:
                _save(path, cubin)
        _compiled[key] = cubin
        return cubin


def _save(path: Path, data: bytes) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_suffix(f".{os.getpid()}.tmp")
        temporary.write_bytes(data)
        os.replace(temporary, path)
    except OSError:  # a read-only or full cache: the kernel still runs, compiled again next process
        pass
