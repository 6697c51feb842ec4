"""Resident pipelines: loaded on first use, kept warm for keep-alive, least recently used unloaded
first when a new model would not fit the memory budget (Ollama's keep_alive / scheduler behaviour)."""

from __future__ import annotations

import gc
import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from .. import hub, ranks
from ..errors import ImagegenError
from ..pipeline import Pipeline
from ..registry import ModelSpec

# Peak activation bytes per output pixel when a model gives no estimate_memory: about what a
# 1024x1024 VAE decode holds at bfloat16 (a few 128-channel full-resolution feature maps).
ACTIVATION_BYTES_PER_PIXEL = 1024

Key = tuple[str, str | None]  # (model id, quantize mode)
log = logging.getLogger("imagegen.server")


class OverBudgetError(ImagegenError):
    """A model that cannot fit the memory budget the server was given, even with nothing else loaded."""


def pipeline_bytes(pipe: Pipeline) -> int:
    """Bytes of the parameters of the modules a pipeline holds (as attributes, lists or dicts)."""
    modules: list[nn.Module] = []
    for value in vars(pipe).values():
        if isinstance(value, nn.Module):  # before the dict test: an mlx Module is a dict
            modules.append(value)
        elif isinstance(value, dict | list | tuple):
            items = value.values() if isinstance(value, dict) else value
            modules.extend(v for v in items if isinstance(v, nn.Module))
    return sum(a.nbytes for m in modules for _, a in tree_flatten(m.parameters()))


@dataclass
class Resident:
    key: Key
    pipeline: Pipeline
    bytes: int
    last_used: float
    busy: int = 0


class Residency:
    """The loaded pipelines. Loading, use and unloading all happen on the device worker's thread;
    other threads only read (sizes, snapshots)."""

    def __init__(
        self,
        keep_alive: float | None,
        budget: int,
        clock: Callable[[], float] = time.monotonic,
        strict: bool = False,
        components: dict[str, str] | None = None,
    ):
        """`strict`: the budget was set by the user (--max-memory), so a model over it is refused rather
        than loaded anyway. `components`: parts loaded from elsewhere (serve --controlnet) for the models that
        take them (ModelSpec.components)."""
        self.keep_alive, self.budget, self.clock, self.strict = keep_alive, budget, clock, strict
        self.components = components or {}
        self.loads = self.unloads = 0
        self._residents: dict[Key, Resident] = {}  # insertion order = least recently used first
        self._lock = threading.RLock()

    def unload_all(self) -> None:
        with self._lock:
            for key in list(self._residents):
                self._drop(key)

    # ---- memory --------------------------------------------------------------------------
    def used(self) -> int:
        with self._lock:
            return sum(r.bytes for r in self._residents.values())

    def estimate(self, spec: ModelSpec, quantize: str | None, width: int, height: int, batch: int = 1) -> int:
        """Peak bytes of one run: the model's own estimate, else its weights on disk plus activations."""
        weights = hub.weights_present(spec)
        if spec.estimate_memory is not None:
            try:
                return int(spec.estimate_memory(spec, weights, spec.default_dtype, quantize, width, height, batch))
            except Exception as e:  # a plugin's broken estimate must not fail the request: use ours
                log.warning("estimate_memory of %s failed (%s: %s)", spec.id, type(e).__name__, e)
        with self._lock:
            resident = self._residents.get((spec.id, quantize))
        size = resident.bytes if resident else hub.folder_size(weights) if weights else 0
        return size + width * height * batch * ACTIVATION_BYTES_PER_PIXEL

    def check_fits(self, spec: ModelSpec, quantize: str | None = None) -> None:
        """OverBudgetError when one run of the model at its default size needs more than the budget."""
        needed = self.estimate(spec, quantize, *spec.default_size)
        if self.strict and needed > self.budget:
            raise OverBudgetError(
                f"The server's memory budget (--max-memory) is {_gib(self.budget)}, less than '{spec.id}' needs "
                f"to run ({_gib(needed)} estimated{f', quantized {quantize}' if quantize else ''})."
            )

    def fit_batch(self, spec: ModelSpec, quantize: str | None, width: int, height: int, n: int, limit: int) -> int:
        """How many images one pipeline call may hold: the most (<= n, <= limit) that fit the budget."""
        others = self.used() - self._bytes_of((spec.id, quantize))
        for batch in range(max(1, min(n, limit)), 1, -1):
            if others + self.estimate(spec, quantize, width, height, batch) <= self.budget:
                return batch
        return 1

    def _bytes_of(self, key: Key) -> int:
        with self._lock:
            resident = self._residents.get(key)
            return resident.bytes if resident else 0

    # ---- use -----------------------------------------------------------------------------
    @contextmanager
    def use(
        self, spec: ModelSpec, quantize: str | None = None, on_load: Callable[[str], None] | None = None
    ) -> Iterator[Pipeline]:
        """The model's pipeline, loading it (and unloading the LRU if memory is short) if needed."""
        key = (spec.id, quantize)
        resident = self._checkout(key)
        if resident is None:
            if on_load is not None:
                on_load(spec.id)
            resident = self._load(spec, quantize)
        try:
            yield resident.pipeline
        finally:
            with self._lock:
                resident.busy -= 1
                resident.last_used = self.clock()
                if self.keep_alive == 0 and not resident.busy:
                    self._drop(key)

    def _checkout(self, key: Key) -> Resident | None:
        with self._lock:
            resident = self._residents.pop(key, None)
            if resident is not None:
                self._residents[key] = resident  # most recently used goes last
                resident.busy += 1
                resident.last_used = self.clock()
            return resident

    def _load(self, spec: ModelSpec, quantize: str | None) -> Resident:
        self.check_fits(spec, quantize)
        width, height = spec.default_size
        self.make_room(self.estimate(spec, quantize, width, height), keep=(spec.id, quantize))
        parts = {name: source for name, source in self.components.items() if name in spec.components}
        pipe = ranks.load(spec, quantize=quantize, **parts)  # on every rank under `serve --gpus N`
        size = pipeline_bytes(pipe)
        if not size and pipe.weights:
            size = hub.folder_size(pipe.weights)
        resident = Resident((spec.id, quantize), pipe, size, self.clock(), busy=1)
        with self._lock:
            self._residents[resident.key] = resident
            self.loads += 1
        return resident

    def make_room(self, needed: int, keep: Key | None = None) -> list[Key]:
        """Unload idle models, least recently used first, until `needed` more bytes fit the budget."""
        unloaded: list[Key] = []
        with self._lock:
            for key, resident in list(self._residents.items()):
                if self.used() + needed <= self.budget:
                    break
                if key != keep and not resident.busy:
                    self._drop(key)
                    unloaded.append(key)
        return unloaded

    def expire(self) -> list[Key]:
        """Unload every idle model whose keep-alive has run out."""
        if self.keep_alive is None:
            return []
        now = self.clock()
        with self._lock:
            stale = [k for k, r in self._residents.items() if not r.busy and now - r.last_used >= self.keep_alive]
            for key in stale:
                self._drop(key)
        return stale

    def _drop(self, key: Key) -> None:
        self._residents.pop(key, None)
        self.unloads += 1
        gc.collect()  # the pipeline's arrays go now, so the allocator can hand their memory back
        mx.clear_cache()

    # ---- reporting -----------------------------------------------------------------------
    def is_loaded(self, model: str) -> bool:
        with self._lock:
            return any(k[0] == model for k in self._residents)

    def snapshot(self) -> list[dict[str, Any]]:
        now = self.clock()
        with self._lock:
            return [
                {
                    "model": r.key[0],
                    "quantize": r.key[1],
                    "memory_bytes": r.bytes,
                    "busy": bool(r.busy),
                    "idle_seconds": round(now - r.last_used, 3),
                    "expires_in": None
                    if self.keep_alive is None or r.busy
                    else round(max(0.0, self.keep_alive - (now - r.last_used)), 3),
                }
                for r in self._residents.values()
            ]


def _gib(size: int) -> str:
    return f"{size / 1024**3:.2f} GB" if size >= 1024**3 else f"{size / 1024**2:.1f} MB"
