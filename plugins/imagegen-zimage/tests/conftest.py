"""Fixtures of the Z-Image tests: the tiny checkpoints (tiny.py), each built once per session. Tests may copy a
folder, never change it."""

from __future__ import annotations

from pathlib import Path

import pytest
from diffusers import ZImagePipeline

from imagegen.testing import sibling_module

tiny = sibling_module(__file__, "tiny")


@pytest.fixture(scope="session")
def tiny_zimage(tmp_path_factory) -> tuple[Path, ZImagePipeline]:
    """(folder, diffusers' pipeline) of a Z-Image Turbo."""
    folder = tmp_path_factory.mktemp("zimage")
    return folder, tiny.build(folder, tiny.SCHEDULER)


@pytest.fixture(scope="session")
def tiny_zimage_base(tmp_path_factory) -> tuple[Path, ZImagePipeline]:
    """(folder, diffusers' pipeline) of a Z-Image base (CFG)."""
    folder = tmp_path_factory.mktemp("zimage-base")
    return folder, tiny.build(folder, tiny.BASE_SCHEDULER)
