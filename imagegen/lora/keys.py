"""Reading an adapter's keys in any layout: wrappers and component prefixes, adapter-type suffixes, dotted or
underscored (kohya, LyCORIS) layer names, looked up in the family's tables. Every key ends up mapped, ignored (with
the reason) or unknown, and the file's layout is described from what its keys show."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import mlx.core as mx

from .file import AdapterFile
from .targets import Part, Targets

# (prefix, component, label): longest first. Names after "_" prefixes (kohya, LyCORIS) are underscored.
PREFIXES = (
    ("model.diffusion_model.", "transformer", "ComfyUI (model.diffusion_model.)"),
    ("diffusion_model.", "transformer", "ai-toolkit / ComfyUI (diffusion_model.)"),
    ("transformer.", "transformer", "diffusers / PEFT (transformer.)"),
    ("lora_transformer_", "transformer", "kohya (lora_transformer_)"),
    ("lora_unet_", "transformer", "kohya / musubi (lora_unet_)"),
    ("lycoris_", "transformer", "LyCORIS (lycoris_)"),
    ("text_encoder.", "text_encoder", "diffusers / PEFT text encoder (text_encoder.)"),
    ("lora_te1_", "text_encoder", "kohya text encoder (lora_te1_)"),
    ("lora_te_", "text_encoder", "kohya text encoder (lora_te_)"),
)
WRAPPER = "base_model.model."  # PEFT's save_pretrained wrapper (fal's Klein LoRAs)
BARE = "bare module names (DiffSynth / ModelScope / SimpleTuner)"

# suffix pattern -> (adapter kind or None for shared keys, canonical suffix); PEFT may insert an adapter name
# (".lora_A.default.weight").
_NAME = r"(?:\.(?!weight$)[\w-]+)?"
SUFFIXES = (
    (rf"\.lora_A{_NAME}\.weight$", "lora", "down"),
    (rf"\.lora_B{_NAME}\.weight$", "lora", "up"),
    (r"\.lora_down\.weight$", "lora", "down"),
    (r"\.lora_up\.weight$", "lora", "up"),
    (r"\.lora\.down\.weight$", "lora", "down"),
    (r"\.lora\.up\.weight$", "lora", "up"),
    (r"\.alpha$", None, "alpha"),
    (r"\.(lokr_w[12](?:_[ab])?)$", "lokr", None),
    (r"\.(hada_w[12]_[ab])$", "loha", None),
    (r"\.diff$", "full", "diff"),
)
UNSUPPORTED = (  # suffix pattern -> why it is refused
    (rf"\.lora_B{_NAME}\.bias$|\.diff_b$", "bias deltas are not supported"),
    (r"\.dora_scale$", "DoRA magnitudes are not supported (diffusers drops them too)"),
    (r"\.lora_mid\.weight$|\.(hada|lokr)_t[12]$", "Tucker (convolution) factors: no convolution is adapted"),
    (r"\.oft_\w+$|\.on_input$|\.[ab][12]\.weight$|\.[wb]_norm$", "OFT / IA3 / GLoRA / norm adapters are not supported"),
)
_SUFFIXES = tuple((re.compile(p), kind, name) for p, kind, name in SUFFIXES)
_UNSUPPORTED = tuple((re.compile(p), why) for p, why in UNSUPPORTED)


@dataclass
class Layer:
    """One adapted source layer: its tensors by canonical suffix, the parts it becomes."""

    component: str
    name: str  # the source name, dotted
    kind: str  # "lora", "lokr", "loha", "full"
    tensors: dict[str, mx.array]
    parts: tuple[Part, ...]
    keys: list[str] = field(default_factory=list)
    preferred: bool = True  # named in the component's first (reference) naming style


@dataclass
class KeyReport:
    key: str
    status: str  # "mapped", "ignored", "unknown"
    detail: str  # the target(s), or the reason


@dataclass
class ParsedAdapter:
    file: AdapterFile
    layout: str
    layers: list[Layer]
    report: list[KeyReport]

    @property
    def unknown(self) -> list[KeyReport]:
        return [r for r in self.report if r.status == "unknown"]


def _split_prefix(key: str) -> tuple[str, str, str]:
    """(rest, component, prefix label); the rest keeps its suffix."""
    for prefix, component, label in PREFIXES:
        if key.startswith(prefix):
            return key[len(prefix) :], component, label
    return key, "transformer", BARE


def _split_suffix(rest: str) -> tuple[str, str | None, str] | None:
    """(layer name, kind, canonical suffix) or None when no adapter suffix matches."""
    for pattern, kind, name in _SUFFIXES:
        m = pattern.search(rest)
        if m:
            return rest[: m.start()], kind, name or m.group(1)
    return None


def parse_keys(file: AdapterFile, tables: dict[str, dict[str, Targets]], model_id: str) -> ParsedAdapter:
    """Group the file's keys into layers and look each layer up in `tables` (component -> naming style -> Targets).
    Keys nothing matches are reported unknown with the reason."""
    lookup: dict[str, dict[str, tuple[str, str]]] = {}  # component -> any spelling -> (dotted name, style)
    for component, styles in tables.items():
        names = lookup.setdefault(component, {})
        for style, targets in styles.items():
            for name in targets:
                names.setdefault(name, (name, style))
                names.setdefault(name.replace(".", "_"), (name, style))
    groups: dict[tuple[str, str], dict] = {}
    report: list[KeyReport] = []
    seen: set[str] = set()
    for key in sorted(file.tensors):
        rest = key.removeprefix(WRAPPER)
        if rest != key:
            seen.add("PEFT-wrapped (base_model.model.)")
        rest, component, label = _split_prefix(rest)
        why = next((w for p, w in _UNSUPPORTED if p.search(rest)), None)
        split = None if why else _split_suffix(rest)
        if split is None:
            report.append(KeyReport(key, "unknown", why or "not an adapter tensor (no LoRA/LoKr/LoHa suffix)"))
            continue
        name, kind, suffix = split
        if ".default" in key and kind == "lora" and re.search(r"\.lora_[AB]\.", key):
            seen.add("PEFT adapter names (.default)")
        names = lookup.get(component, {})
        found = names.get(name) or names.get(name.replace(".", "_"))  # also "attention.to.q" (Anime-Z)
        if found is None:
            where = "the text encoder" if component == "text_encoder" else model_id
            report.append(KeyReport(key, "unknown", f"no layer '{name}' in {where}"))
            continue
        dotted, style = found
        seen.add(label)
        seen.add(f"{style} names")
        group = groups.setdefault((component, dotted), {"kinds": set(), "tensors": {}, "keys": [], "style": style})
        if kind is not None:
            group["kinds"].add(kind)
        group["tensors"][suffix] = file.tensors[key]
        group["keys"].append(key)
    layers = []
    for (component, name), group in groups.items():
        kinds = group["kinds"]
        if len(kinds) != 1:
            reason = "only an alpha, no weights" if not kinds else f"mixes adapter types {sorted(kinds)}"
            report += [KeyReport(k, "unknown", f"layer '{name}' {reason}") for k in group["keys"]]
            continue
        kind = kinds.pop()
        parts = tables[component][group["style"]][name]
        preferred = group["style"] == next(iter(tables[component]))
        layers.append(Layer(component, name, kind, group["tensors"], parts, group["keys"], preferred))
    layers, redundant = _drop_redundant(layers)
    for layer in layers:
        targets = ", ".join(_describe(p) for p in layer.parts)
        report += [KeyReport(k, "mapped", f"{layer.component}: {targets}") for k in layer.keys]
    for layer, why in redundant:
        report += [KeyReport(k, "ignored", why) for k in layer.keys]
    kinds = sorted({layer.kind for layer in layers})
    seen.update({"lora": "LoRA", "lokr": "LoKr", "loha": "LoHa", "full": "full difference"}[k] for k in kinds)
    if any("alpha" in layer.tensors for layer in layers):
        seen.add("alpha")
    report.sort(key=lambda r: r.key)
    return ParsedAdapter(file, ", ".join(sorted(seen)) or "unrecognised", layers, report)


def _drop_redundant(layers: list[Layer]) -> tuple[list[Layer], list[tuple[Layer, str]]]:
    """Some exports hold one layer twice: fused q/k/v beside the split ones, `out` beside `to_out.0` (Anime-Z).
    Keep the finer-grained copy (else the one in the reference naming), as diffusers does; the other is ignored,
    with the reason."""
    by_path: dict[tuple[str, str], list[Layer]] = {}
    for layer in layers:
        for part in layer.parts:
            by_path.setdefault((layer.component, part.path), []).append(layer)
    dropped: dict[int, str] = {}
    for group in by_path.values():
        whole = [layer for layer in group if layer.parts == (Part(layer.parts[0].path),)]
        pieces = [layer for layer in group if layer not in whole]
        keep = pieces or sorted(whole, key=lambda layer: not layer.preferred)[:1]
        for layer in whole:
            if layer not in keep and id(layer) not in dropped:
                names = ", ".join(sorted(other.name for other in keep))
                dropped[id(layer)] = f"redundant: the file also adapts the same weights as {names}"
    kept = [layer for layer in layers if id(layer) not in dropped]
    return kept, [(layer, dropped[id(layer)]) for layer in layers if id(layer) in dropped]


def _describe(part: Part) -> str:
    extra = []
    if part.rows:
        extra.append(f"rows {part.rows[0]}:{part.rows[1]}")
    if part.cols:
        extra.append(f"input columns {part.cols[0]}:{part.cols[1]}")
    if part.swap_halves:
        extra.append("halves swapped")
    return part.path + (f" ({', '.join(extra)})" if extra else "")
