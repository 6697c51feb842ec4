"""Compiled functions kept by a stable key until the weights they captured change.

`mx.compile` captures a module's weights as constants, so a compiled function is valid until the weights change
(LoRA adapters replace layers): callers `clear()` then. Keys are values (a block's place, a step's shapes), never
`id()`s, which Python reuses once an object is freed.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import Any

import mlx.core as mx


class CompileCache:
    """`cache(key, fn)`: `mx.compile(fn)` built on the first call with `key`, the same function after."""

    def __init__(self) -> None:
        self._functions: dict[Hashable, Callable[..., Any]] = {}

    def __call__(self, key: Hashable, fn: Callable[..., Any]) -> Callable[..., Any]:
        compiled = self._functions.get(key)
        if compiled is None:
            compiled = self._functions[key] = mx.compile(fn)
        return compiled

    def __len__(self) -> int:
        return len(self._functions)

    def clear(self) -> None:
        """Forget every compiled function (their captured weights are stale)."""
        self._functions.clear()
