"""Shared fixtures: the example third-party plugin registered in-process, a clean registry."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HELLO = ROOT / "examples" / "imagegen-hello"


@pytest.fixture
def hello_plugin():
    """The example plugin registered in-process (as if pip-installed), removed afterwards."""
    sys.path.insert(0, str(HELLO))
    import imagegen_hello.plugin as module

    from imagegen import plugins

    plugins.register_plugin(module, "hello", "imagegen-hello", "0.1.0")
    yield module
    plugins.unregister_plugin("hello")
    sys.path.remove(str(HELLO))


@pytest.fixture
def fresh_plugins(monkeypatch):
    """Reload plugins from entry points after the test changed the environment."""
    from imagegen import plugins

    plugins.reset()
    yield plugins
    monkeypatch.undo()
    plugins.reset()
