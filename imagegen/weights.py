"""Safetensors in and out: read a component folder, sanitize, quantize, strict load, save.

Reading is lazy (mx.load maps tensors that load on first use), and the name -> array dict is
dropped before the parameters are evaluated, so peak memory stays near the final model size.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from .errors import WeightsError, WeightsNotFoundError
from .quantize import QUANT_FILE, Predicate, apply_record, quantize_model

_random: ContextVar[bool | str] = ContextVar("imagegen_random_weights", default=False)

DTYPES = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}
MAX_LISTED = 6  # keys named per kind of problem; the rest are counted


def to_dtype(name: str | mx.Dtype) -> mx.Dtype:
    if isinstance(name, mx.Dtype):
        return name
    try:
        return DTYPES[str(name).replace("torch.", "")]
    except KeyError:
        raise WeightsError(f"Unknown dtype '{name}': use one of {', '.join(DTYPES)}") from None


def safetensors_files(folder: Path) -> list[Path]:
    """The weight files of a component: those an index names, else every *.safetensors."""
    folder = Path(folder)
    if not folder.is_dir():
        raise WeightsNotFoundError(f"Missing component folder {folder}")
    indexes = sorted(folder.glob("*.safetensors.index.json"))
    if indexes:
        try:
            names = sorted(set(json.loads(indexes[0].read_text())["weight_map"].values()))
        except (json.JSONDecodeError, KeyError) as e:
            raise WeightsError(f"{indexes[0]} is not a valid safetensors index ({e})") from None
        files = [folder / n for n in names]
        missing = [str(f.name) for f in files if not f.is_file()]
        if missing:
            raise WeightsNotFoundError(f"{folder}: index names missing shard(s) {', '.join(missing)}")
        return files
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise WeightsNotFoundError(f"No *.safetensors in {folder}")
    return files


def read_safetensors(folder: Path) -> dict[str, mx.array]:
    """Every tensor of a component folder (lazily mapped)."""
    weights: dict[str, mx.array] = {}
    for f in safetensors_files(folder):
        try:
            weights.update(mx.load(str(f)))
        except Exception as e:  # corrupt or truncated file
            raise WeightsError(f"Cannot read {f}: {e}") from None
    return weights


def cast(weights: dict[str, mx.array], dtype: mx.Dtype) -> dict[str, mx.array]:
    """Cast floating tensors; quantized (integer) tensors keep their type."""
    return {k: v.astype(dtype) if mx.issubdtype(v.dtype, mx.floating) else v for k, v in weights.items()}


def fuse_projections(weights: dict[str, mx.array], prefixes: Iterable[str],
                     fusions: dict[str, tuple[str, ...]]) -> dict[str, mx.array]:
    """Under each prefix, replace the weights of projections that read the same input (fusions: fused name ->
    part names) by one weight concatenated along the output axis: one matmul instead of several. Checkpoints that
    are already fused pass through unchanged. Returns a new dict."""
    weights = dict(weights)
    for prefix in prefixes:
        for fused, parts in fusions.items():
            keys = [f"{prefix}{p}.weight" for p in parts]
            if all(k in weights for k in keys):
                weights[f"{prefix}{fused}.weight"] = mx.concatenate([weights.pop(k) for k in keys])
    return weights


def check_weights(module: nn.Module, weights: dict[str, mx.array], where: str = "") -> None:
    """Strict: missing keys, unexpected keys and shape mismatches are one error naming them."""
    expected = dict(tree_flatten(module.parameters()))
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected))
    mismatched = [
        f"{k}: file {tuple(weights[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in sorted(set(expected) & set(weights))
        if tuple(weights[k].shape) != tuple(expected[k].shape)
    ]
    problems = []
    for label, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", mismatched)):
        if items:
            more = f" (+{len(items) - MAX_LISTED} more)" if len(items) > MAX_LISTED else ""
            problems.append(f"{len(items)} {label}: {', '.join(items[:MAX_LISTED])}{more}")
    if problems:
        name = type(module).__name__
        raise WeightsError(f"Weights in {where or 'the checkpoint'} do not fit {name}: " + "; ".join(problems))


@contextmanager
def random_weights(lazy: bool = False) -> Iterator[None]:
    """Inside it, load_module keeps each module's random initialisation instead of reading safetensors (configs
    and tokenizers are still read): benchmarks of full-size models without downloading their weights. `lazy`: never
    evaluate them either (layer names and shapes only, no memory: `imagegen lora inspect`)."""
    token = _random.set("lazy" if lazy else True)
    try:
        yield
    finally:
        _random.reset(token)


def using_random_weights() -> bool:
    return bool(_random.get())


def load_module(
    module: nn.Module,
    folder: str | Path,
    dtype: str | mx.Dtype = "bfloat16",
    quantize: str | None = None,
    predicate: Predicate | None = None,
    sanitize: Callable[[dict[str, mx.array]], dict[str, mx.array]] | None = None,
    defer: Callable[[str], bool] | None = None,
) -> dict[str, Any] | None:
    """Load a component folder into `module` (in place). Returns the quantization record, if any.

    Order: read -> sanitize (module.sanitize unless given; not for our own quantized saves) -> cast
    -> rebuild saved quantization -> strict check -> assign -> quantize on load (if asked) -> evaluate.
    Parameters whose name `defer` accepts are not evaluated: they stay on disk until first used."""
    folder = Path(folder)
    if _random.get():
        module.set_dtype(to_dtype(dtype))
        record = quantize_model(module, quantize, predicate) if quantize is not None else None
        if _random.get() != "lazy":
            mx.eval(module.parameters())
        module.eval()
        return record
    weights = read_safetensors(folder)
    record_file = folder / QUANT_FILE
    record = json.loads(record_file.read_text()) if record_file.is_file() else None
    if record is None:  # a checkpoint in the reference layout; our own saves are already MLX layout
        sanitize = sanitize or getattr(module, "sanitize", None)
        if sanitize is not None:
            weights = sanitize(weights)
    weights = cast(weights, to_dtype(dtype))
    if record is not None:
        apply_record(module, record, weights)
    check_weights(module, weights, str(folder))
    module.load_weights(list(weights.items()), strict=False)
    del weights
    if quantize is not None and record is None:
        record = quantize_model(module, quantize, predicate)
    elif quantize is not None and record is not None and record.get("quantization") != quantize:
        saved = record.get("quantization")
        raise WeightsError(f"{folder} is saved quantized as {saved}; cannot re-quantize to {quantize}")
    mx.eval([v for k, v in tree_flatten(module.parameters()) if defer is None or not defer(k)])
    module.eval()
    return record


def load_model(model_class: Callable[[Any], nn.Module], config_class: Any, folder: str | Path,
               dtype: str | mx.Dtype = "bfloat16", quantize: str | None = None, predicate: Predicate | None = None,
               **kwargs: Any) -> nn.Module:
    """Build a model from `folder/config.json` (parsed by `config_class`) and load the folder's weights into it."""
    model = model_class(config_class.from_file(Path(folder) / "config.json"))
    load_module(model, folder, dtype, quantize, predicate, **kwargs)
    return model


def save_module(module: nn.Module, folder: str | Path, config: dict[str, Any] | None = None,
                record: dict[str, Any] | None = None, filename: str = "model.safetensors") -> Path:
    """Write a component folder: safetensors (+ config.json, + quantization.json when quantized)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    mx.save_safetensors(str(folder / filename), dict(tree_flatten(module.parameters())))
    if config is not None:
        (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    if record is not None:
        (folder / QUANT_FILE).write_text(json.dumps(record, indent=2, sort_keys=True))
    return folder
