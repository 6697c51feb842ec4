"""Fixtures of the FLUX.2 tests: the tiny Klein checkpoints (tiny.py), each built once per session. Tests may copy a
folder, never change it."""

from __future__ import annotations

from pathlib import Path

import pytest
from diffusers import Flux2KleinPipeline

from imagegen.testing import sibling_module

tiny = sibling_module(__file__, "tiny")


@pytest.fixture(scope="session")
def tiny_klein(tmp_path_factory) -> tuple[Path, Flux2KleinPipeline]:
    """(folder, diffusers' pipeline) of a step-distilled Klein."""
    folder = tmp_path_factory.mktemp("klein")
    return folder, tiny.build(folder, distilled=True)


@pytest.fixture(scope="session")
def tiny_klein_base(tmp_path_factory) -> tuple[Path, Flux2KleinPipeline]:
    """(folder, diffusers' pipeline) of a base Klein (CFG)."""
    folder = tmp_path_factory.mktemp("klein_base")
    return folder, tiny.build(folder, distilled=False)
