"""A pipeline's adapters: parse the `loras=` option, plan each file against the model (cached), and switch the
active set between requests without reloading anything.

The transformer belongs to one pipeline and is patched under the pipeline's lock; the Qwen3 text encoder is shared
between pipelines, so its patch travels with the request (a context variable the encoder reads inside its own lock)
and is gone when that request's prompts are encoded.
"""

from __future__ import annotations

import re
import threading
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from math import sqrt
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from ..errors import InvalidOptionError, LoraError
from ..options import find_saved_file
from .apply import Patcher, Terms, check_part, module_at
from .deltas import build_delta
from .file import AdapterFile, read_adapter
from .keys import ParsedAdapter, parse_keys
from .targets import Targets

MAX_LISTED = 5  # unknown keys named in an error; the rest are counted
PLANS_KEPT = 8


@dataclass(frozen=True)
class LoraSpec:
    """One adapter of a request: a file and its strength."""

    path: str
    scale: float = 1.0

    @property
    def name(self) -> str:
        return Path(self.path).name


def _is_pair(item: Any) -> bool:
    return (
        isinstance(item, tuple | list)
        and len(item) == 2
        and isinstance(item[0], str | Path)
        and isinstance(item[1], int | float)
        and not isinstance(item[1], bool)
    )


def lora_value(item: Any) -> LoraSpec:
    """One item of the `loras` option: "PATH[:SCALE]", a path, a (path, scale) pair, {"path" or "name", "scale"}
    or a LoraSpec. The file must be a readable adapter: a missing one fails before any weight loads."""
    if isinstance(item, dict):
        item = (item.get("path") or item.get("name"), item.get("scale", 1.0))
    if isinstance(item, LoraSpec):
        spec = item
    elif isinstance(item, str):
        spec = parse_cli_lora(item)
    elif isinstance(item, Path):
        spec = LoraSpec(str(item))
    elif _is_pair(item):
        spec = LoraSpec(str(item[0]), float(item[1]))
    else:
        raise InvalidOptionError(
            f'loras: each item must be a path, "PATH:SCALE" or a (path, scale) pair, got {item!r}.'
        )
    read_adapter(spec.path)
    return spec


def lora_metadata(specs: Sequence[LoraSpec]) -> list[dict[str, Any]]:
    """How PNG metadata records adapters: file name (never the path), content hash, scale."""
    return [{"name": s.name, "sha256": read_adapter(s.path).sha256, "scale": s.scale} for s in specs]


def lora_replay(saved: Sequence[dict[str, Any]], folders: Sequence[Path]) -> list[LoraSpec]:
    """The recorded adapters for `imagegen run --from`: each file found by name in `folders` with its recorded
    hash; a missing or changed file is an error that names it."""
    return [
        LoraSpec(str(find_saved_file(e["name"], e.get("sha256"), folders)), float(e.get("scale", 1.0))) for e in saved
    ]


def parse_cli_lora(text: str) -> LoraSpec:
    """PATH[:SCALE] as the command line writes it (a Windows drive letter is not a scale)."""
    m = re.fullmatch(r"(.+?):(-?\d+(?:\.\d*)?|-?\.\d+)", text)
    return LoraSpec(m.group(1), float(m.group(2))) if m else LoraSpec(text, 1.0)


def _peft_alpha(config: dict[str, Any], name: str, rank: int) -> float | None:
    """The alpha the file's PEFT metadata gives this layer (PEFT's pattern rule), as alpha / rank would use it."""
    if not config:
        return None
    alpha = config.get("lora_alpha")
    for pattern, value in (config.get("alpha_pattern") or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", name):
            alpha = value
    if alpha is None:
        return None
    return alpha * sqrt(rank) if config.get("use_rslora") else float(alpha)


@dataclass
class Plan:
    """One file against one model: the report of every key, and per component the deltas placed on layers."""

    parsed: ParsedAdapter
    terms: dict[str, Terms]

    @property
    def file(self) -> AdapterFile:
        return self.parsed.file


def plan_adapter(
    file: AdapterFile, components: dict[str, tuple[nn.Module, dict[str, Targets]]], model_id: str, partial: bool = False
) -> Plan:
    """Map every key of `file` onto the components' layers (component -> (module tree, naming style -> Targets)).
    Unknown keys are an error unless `partial`; a file that adapts nothing is always one."""
    parsed = parse_keys(file, {name: tables for name, (_, tables) in components.items()}, model_id)
    unknown = parsed.unknown
    if not parsed.layers:
        first = f" First key: {unknown[0].key} ({unknown[0].detail})." if unknown else ""
        raise LoraError(
            f"{file.name}: none of its {len(file.tensors)} keys matches a layer of {model_id} "
            f"(layout: {parsed.layout}).{first}"
        )
    if unknown and not partial:
        listed = ", ".join(f"{r.key} ({r.detail})" for r in unknown[:MAX_LISTED])
        more = f" and {len(unknown) - MAX_LISTED} more" if len(unknown) > MAX_LISTED else ""
        raise LoraError(
            f"{file.name}: {len(unknown)} of {len(file.tensors)} keys do not fit {model_id}: {listed}"
            f"{more}. Pass --lora-partial (partial=True) to apply the rest."
        )
    config = file.peft_config()
    terms: dict[str, Terms] = {}
    for layer in parsed.layers:
        where = f"{file.name}: layer '{layer.name}'"
        rank = layer.tensors["down"].shape[0] if layer.kind == "lora" and "down" in layer.tensors else 0
        delta = build_delta(layer.kind, layer.tensors, where, _peft_alpha(config, layer.name, rank))
        root = components[layer.component][0]
        for part in layer.parts:
            check_part(delta, part, module_at(root, part.path)[2], layer.name, file.name)
            terms.setdefault(layer.component, {}).setdefault(part.path, []).append((delta, part))
    return Plan(parsed, terms)


@dataclass(frozen=True, eq=False)
class TextPatch:
    """The text-encoder half of a request's adapters; `identity` keys the encoder's prompt cache."""

    identity: tuple
    adapters: tuple[tuple[Terms, float], ...]


_text_patch: ContextVar[TextPatch | None] = ContextVar("imagegen_text_patch", default=None)


@contextmanager
def text_adapters(patch: TextPatch | None) -> Iterator[None]:
    """Within it, the shared text encoder applies `patch` to the prompts this thread encodes (and only those)."""
    token = _text_patch.set(patch)
    try:
        yield
    finally:
        _text_patch.reset(token)


def current_text_patch() -> TextPatch | None:
    return _text_patch.get()


@contextmanager
def patched(model: nn.Module, patch: TextPatch | None, dtype: mx.Dtype) -> Iterator[None]:
    """The model with `patch` applied for the duration (the caller holds the model's lock)."""
    if patch is None:
        yield
        return
    patcher = Patcher(model, dtype)
    patcher.apply(patch.adapters)
    try:
        yield
    finally:
        patcher.restore()


class LoraManager:
    """The adapters of one pipeline. `use(specs)` makes exactly those active (returns True when the transformer's
    layers changed, so compiled graphs holding the old weights must be rebuilt) and returns the text patch."""

    def __init__(
        self, model_id: str, components: dict[str, tuple[nn.Module, dict[str, Targets]]], dtype: mx.Dtype = mx.float32
    ):
        self.model_id, self.components = model_id, components
        self.patcher = Patcher(components["transformer"][0], dtype)
        self.active: tuple = ()
        self._plans: OrderedDict[tuple, Plan] = OrderedDict()
        self._lock = threading.Lock()  # requests are planned on callers' threads (the server's), outside the run lock

    def plan(self, spec: LoraSpec, partial: bool = False) -> Plan:
        file = read_adapter(spec.path)
        key = (file.sha256, partial)
        with self._lock:
            if key not in self._plans:
                self._plans[key] = plan_adapter(file, self.components, self.model_id, partial)
                while len(self._plans) > PLANS_KEPT:
                    self._plans.popitem(last=False)
            self._plans.move_to_end(key)
            return self._plans[key]

    def use(self, specs: Sequence[LoraSpec], partial: bool = False) -> tuple[bool, TextPatch | None]:
        plans = [(self.plan(s, partial), s.scale) for s in specs]
        chosen = [(p, scale) for p, scale in plans if "transformer" in p.terms and scale != 0]
        key = tuple((p.file.sha256, scale) for p, scale in chosen)
        changed = key != self.active
        if changed:
            self.patcher.apply([(p.terms["transformer"], scale) for p, scale in chosen])
            self.active = key
        text = [(p, scale) for p, scale in plans if "text_encoder" in p.terms and scale != 0]
        patch = None
        if text:
            identity = tuple((p.file.sha256, scale) for p, scale in text)
            patch = TextPatch(identity, tuple((p.terms["text_encoder"], scale) for p, scale in text))
        return changed, patch
