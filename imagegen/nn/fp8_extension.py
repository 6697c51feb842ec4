"""Build and load the FP8 GEMM extension (fp8_gemm.cpp): once per machine, with the host C++ compiler.

It is host code only (a cuBLASLt call inside an MLX primitive), so it needs no CUDA compiler: a C++17 compiler,
nanobind (`pip install nanobind`: MLX's Python bindings are nanobind's, and the extension shares them), and the
headers of MLX (shipped in its wheel), CUDA's runtime and cuBLAS (the NVIDIA pip packages MLX's CUDA build brings,
or CUDA_HOME). The shared library is kept in the kernel cache (imagegen.kernel_cache) under a name that changes
with the source, the MLX version and the Python ABI, so a later process only loads it.

A machine without a compiler can be handed a library built elsewhere for the same MLX and Python:

    python imagegen/nn/fp8_extension.py --out DIR     # prints the library's path; copy it into <kernel cache>/imagegen

This file imports nothing of imagegen's at the top, so it also runs as that script."""

from __future__ import annotations

import argparse
import hashlib
import importlib.machinery
import importlib.metadata
import importlib.util
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import threading
from pathlib import Path

SOURCE = Path(__file__).with_name("fp8_gemm.cpp")
MODULE = "_imagegen_fp8"
FLAGS = (
    "-O2",
    "-std=c++20",
    "-shared",
    "-fPIC",
    "-fvisibility=hidden",
    "-DNDEBUG",
    "-DNB_COMPACT_ASSERTIONS",
    "-DNB_DOMAIN=mlx",  # MLX's bindings live in nanobind's "mlx" domain: its array type is found there
)
_lock = threading.Lock()


class ExtensionUnavailable(RuntimeError):
    """The extension could not be built or loaded here (the message says what is missing)."""


def _package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise ExtensionUnavailable(f"the Python package '{name}' is not installed (pip install {name})")
    return Path(next(iter(spec.submodule_search_locations)))


def _nvidia_dirs(sub: str) -> list[Path]:
    """include/ or lib/ folders of the NVIDIA pip packages (site-packages/nvidia/{cu13,cuda_runtime,cublas,...})."""
    roots = [Path(p) / "nvidia" for p in sys.path if p and (Path(p) / "nvidia").is_dir()]
    homes = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    found = [d / sub for root in roots for d in sorted(root.iterdir()) if (d / sub).is_dir()]
    found += [Path(h) / ("lib64" if sub == "lib" else sub) for h in homes if h]
    return [d for d in found if d.is_dir()]


def _folder_with(name: str, sub: str) -> Path:
    for folder in _nvidia_dirs(sub):
        if any(folder.glob(name)):
            return folder
    raise ExtensionUnavailable(f"{name} not found: install MLX's CUDA extra (pip install 'mlx[cuda13]'), or CUDA_HOME")


def library_name() -> str:
    """The file name for this source, MLX version and Python ABI."""
    mlx_version = importlib.metadata.version("mlx")
    suffix = importlib.machinery.EXTENSION_SUFFIXES[0]
    key = f"\n{mlx_version}\n{suffix}\n{' '.join(FLAGS)}"
    digest = hashlib.sha256(SOURCE.read_bytes() + key.encode()).hexdigest()[:16]
    return f"{MODULE}-{digest}{suffix}"


# MLX's CUDA headers include {fmt} for the error messages of inline templates the extension never instantiates;
# the wheel does not ship {fmt}, and a declaration is all those templates need to parse.
FMT_DECLARATION = """#pragma once
#include <string>
namespace fmt {
template <typename... Args>
std::string format(Args&&...) { return "MLX error"; }
}
"""


def _fmt_declaration(out_dir: Path) -> Path:
    folder = out_dir / "fmt-declaration"
    (folder / "fmt").mkdir(parents=True, exist_ok=True)
    (folder / "fmt" / "format.h").write_text(FMT_DECLARATION)
    return folder


def compile_extension(out_dir: Path) -> Path:
    """Compile fp8_gemm.cpp into out_dir (written under a temporary name, then renamed); returns its path."""
    chosen = os.environ.get("CXX")
    compiler = shutil.which(chosen) if chosen else shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")
    if compiler is None:
        raise ExtensionUnavailable(
            f"no C++ compiler found ({f'CXX={chosen} is not a program' if chosen else 'install g++ or set CXX'})"
        )
    mlx_dir, nanobind_dir = _package_dir("mlx"), _package_dir("nanobind")
    includes = [
        mlx_dir / "include",
        nanobind_dir / "include",
        nanobind_dir / "ext" / "robin_map" / "include",
        Path(sysconfig.get_paths()["include"]),
        _folder_with("cuda_runtime.h", "include"),
        _folder_with("cublasLt.h", "include"),
        mlx_dir / "include" / "cccl",  # nv/target for the CUDA headers, where the NVIDIA packages lack it
    ]
    cublas_lib = _folder_with("libcublasLt.so*", "lib")
    cublas_file = sorted(cublas_lib.glob("libcublasLt.so*"))[-1].name if sys.platform != "win32" else "cublasLt"
    out_dir.mkdir(parents=True, exist_ok=True)
    includes.append(_fmt_declaration(out_dir))
    target = out_dir / library_name()
    temporary = target.with_name(f"{target.name}.{os.getpid()}.tmp")
    command = [
        compiler,
        *FLAGS,
        *(f"-I{d}" for d in dict.fromkeys(map(str, includes))),
        str(SOURCE),
        str(nanobind_dir / "src" / "nb_combined.cpp"),
        f"-L{mlx_dir / 'lib'}",
        "-lmlx",
        f"-Wl,-rpath,{mlx_dir / 'lib'}",
        f"-L{cublas_lib}",
        f"-l:{cublas_file}",
        "-o",
        str(temporary),
    ]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        temporary.unlink(missing_ok=True)
        tail = "\n".join(result.stderr.strip().splitlines()[-20:])
        raise ExtensionUnavailable(f"compiling {SOURCE.name} failed:\n{tail}")
    os.replace(temporary, target)
    return target


def _load_from(path: Path):
    spec = importlib.util.spec_from_file_location(MODULE, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_loaded = None


def load():
    """The extension module: this process's, the cached library, or a fresh build (then cached). A cached library
    that does not load (a damaged file) is built again once."""
    global _loaded
    with _lock:
        if _loaded is None:
            import mlx.core  # noqa: F401  (registers MLX's array type with nanobind before the extension loads)

            from ..kernel_cache import kernel_cache_dir

            folder = kernel_cache_dir()
            folder = (folder / "imagegen") if folder is not None else Path(tempfile.gettempdir()) / "imagegen-fp8"
            path = folder / library_name()
            if path.is_file():
                try:
                    _loaded = _load_from(path)
                except ImportError:
                    pass
            if _loaded is None:
                print("imagegen: building the FP8 GEMM extension (once per machine, about 10 s)", file=sys.stderr)
                path = compile_extension(folder)
                try:
                    _loaded = _load_from(path)
                except ImportError as e:
                    raise ExtensionUnavailable(f"{path} does not load: {e}") from None
        return _loaded


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Build imagegen's FP8 GEMM extension into a folder.")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    try:
        print(compile_extension(args.out))
    except ExtensionUnavailable as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
