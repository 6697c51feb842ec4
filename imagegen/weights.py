"""Safetensors in and out: read a component folder, sanitize, quantize, strict load, save.

Reading is lazy (mx.load maps tensors that load on first use), and the name -> array dict is
dropped before the parameters are evaluated, so peak memory stays near the final model size.
Tensors are read on several CPU streams at once (READ_STREAMS).
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from .config import read_json
from .errors import WeightsError, WeightsNotFoundError
from .quantize import QUANT_FILE, Predicate, apply_record, quantize_model

_random: ContextVar[bool | str] = ContextVar("imagegen_random_weights", default=False)

DTYPES = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}
MAX_LISTED = 6  # keys named per kind of problem; the rest are counted
# CPU streams reading a checkpoint's tensors (MLX runs each stream on its own thread). On CUDA, tensors loaded on the
# default stream are read and copied to the GPU one after another on the thread that evaluates the graph: 1.7 GB/s
# from the page cache on the H200 machine. Read on four CPU streams they land in unified memory, which the GPU then
# reads: 4.4 GB/s for Klein 4B's 16 GB (benchmarks/bench_load.py).
READ_STREAMS = 4


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
        index = read_json(indexes[0])
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict) or not all(isinstance(n, str) for n in weight_map.values()):
            raise WeightsError(
                f"{indexes[0]} is not a safetensors index: it needs a 'weight_map' object of tensor name -> file name."
            )
        names = sorted(set(weight_map.values()))
        outside = [n for n in names if Path(n).name != n or n in (".", "..")]
        if outside:  # a shard path like ../../x would read files outside the model
            raise WeightsError(f"{indexes[0]} names shard(s) outside {folder}: {', '.join(outside[:MAX_LISTED])}")
        files = [folder / n for n in names]
        missing = [str(f.name) for f in files if not f.is_file()]
        if missing:
            raise WeightsNotFoundError(f"{folder}: index names missing shard(s) {', '.join(missing)}")
        return files
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise WeightsNotFoundError(f"No *.safetensors in {folder}")
    return files


_streams = threading.local()  # MLX streams belong to the thread that made them: a pool per thread


def _load(f: Path) -> dict[str, mx.array]:
    """A file's tensors, lazily, the k-th read on this thread's CPU stream k % READ_STREAMS (one lazy mx.load per
    stream: each tensor's read is bound to the stream of the load that made it). As with MLX's default streams, an
    unevaluated tensor can only be evaluated on the thread that loaded it."""
    if not hasattr(_streams, "pool"):
        _streams.pool = [mx.new_stream(mx.cpu) for _ in range(READ_STREAMS)]
    loads = [mx.load(str(f), stream=s) for s in _streams.pool]
    return {name: loads[k % len(loads)][name] for k, name in enumerate(loads[0])}


def read_safetensors(folder: Path, sources: dict[str, Path] | None = None) -> dict[str, mx.array]:
    """Every tensor of a component folder (lazily mapped); `sources` gets each tensor's file (for errors)."""
    weights: dict[str, mx.array] = {}
    for f in safetensors_files(folder):
        try:
            tensors = _load(f)
        except Exception as e:  # corrupt or truncated file
            raise WeightsError(f"Cannot read {f}: {e}") from None
        weights.update(tensors)
        if sources is not None:
            sources.update(dict.fromkeys(tensors, f))
    return weights


def cast(weights: dict[str, mx.array], dtype: mx.Dtype) -> dict[str, mx.array]:
    """Cast floating tensors; quantized (integer) tensors and fp8 layers' float32 scales keep their type."""
    return {
        k: v.astype(dtype) if mx.issubdtype(v.dtype, mx.floating) and not k.endswith(".weight_scale") else v
        for k, v in weights.items()
    }


def fuse_projections(
    weights: dict[str, mx.array], prefixes: Iterable[str], fusions: dict[str, tuple[str, ...]]
) -> dict[str, mx.array]:
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


def check_weights(
    module: nn.Module, weights: dict[str, mx.array], where: str = "", sources: dict[str, Path] | None = None
) -> None:
    """Strict: missing keys, unexpected keys, shape mismatches and integer tensors where floats belong (or the
    reverse) are one error naming them (and, for a dtype, the file when `sources` knows it)."""
    expected = dict(tree_flatten(module.parameters()))
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected))
    common = sorted(set(expected) & set(weights))
    mismatched = [
        f"{k}: file {tuple(weights[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in common
        if tuple(weights[k].shape) != tuple(expected[k].shape)
    ]
    floating = [mx.issubdtype(weights[k].dtype, mx.floating) for k in common]
    sources = sources or {}
    wrong_type = [  # e.g. an int8 tensor where a float is expected: shapes fit, the image would be garbage
        f"{k} in {sources[k].name if k in sources else where}: {weights[k].dtype} vs model {expected[k].dtype}"
        for k, is_float in zip(common, floating)
        if is_float != mx.issubdtype(expected[k].dtype, mx.floating)
    ]
    problems = []
    for label, items in (
        ("missing", missing),
        ("unexpected", unexpected),
        ("wrong shape", mismatched),
        ("wrong dtype", wrong_type),
    ):
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
    defer: Callable[[str], bool] | None = None,
) -> dict[str, Any] | None:
    """Load a component folder into `module` (in place). Returns the quantization record, if any.

    Order: read -> module.sanitize (not for our own quantized saves) -> cast
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
    record = read_record(folder)
    sources: dict[str, Path] = {}
    weights = read_safetensors(folder, sources)
    if record is None:  # a checkpoint in the reference layout; our own saves are already MLX layout
        sanitize = getattr(module, "sanitize", None)
        if sanitize is not None:
            weights = sanitize(weights)
    weights = cast(weights, to_dtype(dtype))
    if record is not None:
        apply_record(module, record, weights)
    check_weights(module, weights, str(folder), sources)
    module.load_weights(list(weights.items()), strict=False)
    del weights
    if quantize is not None and record is None:
        record = quantize_model(module, quantize, predicate)
    elif quantize is not None and record is not None and record.get("quantization") != quantize:
        saved = record.get("quantization")
        raise WeightsError(f"{folder} is saved quantized as {saved}; cannot re-quantize to {quantize}")
    evaluate_finite(module, folder, defer)
    module.eval()
    return record


def read_record(folder: Path) -> dict[str, Any] | None:
    """A folder's quantization.json (our quantized saves), checked enough to use; None when there is none."""
    path = folder / QUANT_FILE
    if not path.exists() and not path.is_symlink():  # a broken link or a loop is an error, not absence
        return None
    record = read_json(path)
    if not isinstance(record, dict) or not all(k in record for k in ("mode", "bits", "group_size")):
        raise WeightsError(f"{path} is not an imagegen quantization record (needs mode, bits and group_size).")
    return record


def evaluate_finite(module: nn.Module, folder: Path, defer: Callable[[str], bool] | None = None) -> None:
    """Evaluate the parameters (all but the deferred ones) and, in the same pass, check they hold no NaN or Inf
    (a damaged file, or values too large for the dtype). A plain sum per tensor reads each one once while it is
    loaded (NaN and Inf survive a sum); only a sum that is not finite (or overflowed) gets the exact check."""
    params = [(k, v) for k, v in tree_flatten(module.parameters()) if defer is None or not defer(k)]
    checked = [(k, v) for k, v in params if mx.issubdtype(v.dtype, mx.floating)]
    sums = mx.stack([mx.sum(v) for _, v in checked]) if checked else mx.zeros((0,))
    mx.eval([v for _, v in params], sums)
    suspects = [checked[i] for i, ok in enumerate(mx.isfinite(sums).tolist()) if not ok]
    bad = [k for k, v in suspects if not mx.isfinite(v).all().item()]
    if bad:
        more = f" (+{len(bad) - MAX_LISTED} more)" if len(bad) > MAX_LISTED else ""
        raise WeightsError(
            f"Weights in {folder} hold NaN or Inf values (a damaged file, or too large for "
            f"{checked[0][1].dtype}): {', '.join(bad[:MAX_LISTED])}{more}"
        )


def load_model(
    model_class: Callable[[Any], nn.Module],
    config_class: Any,
    folder: str | Path,
    dtype: str | mx.Dtype = "bfloat16",
    quantize: str | None = None,
    predicate: Predicate | None = None,
    **kwargs: Any,
) -> nn.Module:
    """Build a model from `folder/config.json` (parsed by `config_class`) and load the folder's weights into it."""
    model = model_class(config_class.from_file(Path(folder) / "config.json"))
    load_module(model, folder, dtype, quantize, predicate, **kwargs)
    return model


def save_module(
    module: nn.Module,
    folder: str | Path,
    config: dict[str, Any] | None = None,
    record: dict[str, Any] | None = None,
    filename: str = "model.safetensors",
) -> Path:
    """Write a component folder: safetensors (+ config.json, + quantization.json when quantized)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    mx.save_safetensors(str(folder / filename), dict(tree_flatten(module.parameters())))
    if config is not None:
        (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    if record is not None:
        (folder / QUANT_FILE).write_text(json.dumps(record, indent=2, sort_keys=True))
    return folder
