"""imagegen keeps MLX's compiled GPU kernels in a user cache folder across processes, unless told otherwise."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from imagegen import kernel_cache


@pytest.fixture
def env(monkeypatch, tmp_path):
    for name in ("MLX_PTX_CACHE_DIR", "CUDA_CACHE_MAXSIZE", "IMAGEGEN_KERNEL_CACHE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    return monkeypatch


def test_defaults_to_the_user_cache_folder(env, tmp_path):
    kernel_cache.use_kernel_cache()
    assert os.environ["MLX_PTX_CACHE_DIR"] == str(tmp_path / "xdg" / "imagegen" / "mlx-kernels")
    assert os.environ["CUDA_CACHE_MAXSIZE"] == str(4 << 30)


def test_the_users_settings_win(env, tmp_path):
    env.setenv("MLX_PTX_CACHE_DIR", "/elsewhere")
    env.setenv("CUDA_CACHE_MAXSIZE", "1000")
    kernel_cache.use_kernel_cache()
    assert (os.environ["MLX_PTX_CACHE_DIR"], os.environ["CUDA_CACHE_MAXSIZE"]) == ("/elsewhere", "1000")


@pytest.mark.parametrize("value, expected", [("~/kernels", Path("~/kernels").expanduser()), ("off", None)])
def test_imagegen_kernel_cache_names_the_folder_or_turns_it_off(env, value, expected):
    env.setenv("IMAGEGEN_KERNEL_CACHE", value)
    assert kernel_cache.kernel_cache_dir() == expected
    kernel_cache.use_kernel_cache()
    assert os.environ.get("MLX_PTX_CACHE_DIR") == (None if expected is None else str(expected))


def test_importing_imagegen_sets_it(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("MLX_PTX_CACHE_DIR", "IMAGEGEN_KERNEL_CACHE")}
    env["XDG_CACHE_HOME"] = str(tmp_path)
    code = "import sys, os, imagegen; print(os.environ['MLX_PTX_CACHE_DIR'])"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out.strip() == str(tmp_path / "imagegen" / "mlx-kernels")
