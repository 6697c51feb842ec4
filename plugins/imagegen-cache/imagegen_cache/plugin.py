"""The `cache` option: step caching for every model whose transformer blocks run through imagegen.block_loop.

Values (a string; `imagegen run --cache VALUE`, `pipe.generate(..., cache=VALUE)`):
  first-block[:THRESHOLD]                     First-Block Cache (diffusers' FirstBlockCacheConfig), default 0.05
  mag[:THRESHOLD][,k=N][,retention=R],ratios=FILE
                                              MagCache (diffusers' MagCacheConfig) with the checkpoint's ratios
  mag:calibrate,ratios=FILE                   no skipping; measure the ratios and write them to FILE
  off                                         no caching (to override a value replayed by --from)
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import imagegen
from imagegen.block_loop import BlockLoopOption
from imagegen.errors import InvalidOptionError

from . import first_block, mag

HELP = (
    "Step caching: first-block[:THRESHOLD] or mag[:THRESHOLD],ratios=FILE (mag:calibrate,ratios=FILE measures "
    "them); off."
)
MAG_KEYS = {"k": int, "retention": float, "ratios": str}


def _number(text: str, what: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise InvalidOptionError(f"cache: {what} must be a number, got '{text}'.") from None
    if not value >= 0:
        raise InvalidOptionError(f"cache: {what} must be >= 0, got {text}.")
    return value


def _fields(text: str) -> dict[str, Any]:
    """The key=value fields after a MagCache value's first comma."""
    fields: dict[str, Any] = {}
    for item in text.split(",") if text else ():
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or key not in MAG_KEYS:
            raise InvalidOptionError(f"cache: unknown MagCache field '{item}' (fields: k=, retention=, ratios=).")
        try:
            fields[key] = MAG_KEYS[key](value.strip())
        except ValueError:
            raise InvalidOptionError(f"cache: {key} must be a {MAG_KEYS[key].__name__}, got '{value}'.") from None
    if fields.get("k", 1) < 0 or not 0 <= fields.get("retention", 0) <= 1:
        raise InvalidOptionError("cache: k must be >= 0 and retention within [0, 1].")
    return fields


def read_ratios(path: Path) -> list[float]:
    try:
        ratios = json.loads(path.read_text())
    except FileNotFoundError:
        raise InvalidOptionError(f"cache: MagCache ratios file not found: {path}") from None
    except (OSError, ValueError) as e:
        raise InvalidOptionError(f"cache: cannot read MagCache ratios from {path} ({type(e).__name__}).") from None
    if not isinstance(ratios, list) or not ratios or not all(isinstance(r, int | float) for r in ratios):
        raise InvalidOptionError(f"cache: {path} must hold a JSON list of numbers (the MagCache ratios).")
    return [float(r) for r in ratios]


def parse(value: Any) -> str | None:
    """Check a `cache` value; returns its normal form (recorded in the PNG metadata), None for off."""
    if not isinstance(value, str):
        raise InvalidOptionError(f"cache must be a string such as 'first-block:0.1', got {value!r}.")
    first, _, tail = value.strip().partition(",")
    method, _, argument = first.partition(":")
    method, argument = method.strip().lower(), argument.strip().lower()
    if method in ("off", "none", "") and not argument and not tail:
        return None
    if method == "first-block" and not tail:
        threshold = _number(argument, "the First-Block Cache threshold") if argument else first_block.DEFAULT_THRESHOLD
        return f"first-block:{threshold}"
    if method == "mag":
        fields = _fields(tail)
        if "ratios" not in fields:
            raise InvalidOptionError(
                "cache: MagCache needs the checkpoint's ratios: measure them once with "
                "--cache mag:calibrate,ratios=FILE, then pass mag:THRESHOLD,ratios=FILE."
            )
        path = Path(fields["ratios"]).expanduser().resolve()
        if argument == "calibrate":
            return f"mag:calibrate,ratios={path}"
        threshold = _number(argument, "the MagCache threshold") if argument else mag.DEFAULT_THRESHOLD
        read_ratios(path)
        k = fields.get("k", mag.DEFAULT_MAX_SKIP_STEPS)
        retention = fields.get("retention", mag.DEFAULT_RETENTION)
        return f"mag:{threshold},k={k},retention={retention},ratios={path}"
    raise InvalidOptionError(
        f"cache: cannot read '{value}' (first-block[:THRESHOLD], mag[:THRESHOLD],ratios=FILE, or off)."
    )


def start(value: str | None, request: imagegen.Request):
    """A fresh wrapper for one run of `request` from a parsed value."""
    if value is None:
        return None
    method, _, rest = value.partition(":")
    if method == "first-block":
        return first_block.FirstBlockCache(float(rest))
    head, *items = rest.split(",")
    fields = {k: v for k, _, v in (item.partition("=") for item in items)}
    path = Path(fields["ratios"])
    if head == "calibrate":
        return mag.MagCache(request.steps, calibrate=True, calibration_file=path)
    return mag.MagCache(request.steps, read_ratios(path), float(head), int(fields["k"]), float(fields["retention"]))


@imagegen.hookimpl
def register_block_loop_options(register):
    # kind "any": `parse` checks the text and turns "off" into None
    register(BlockLoopOption(imagegen.Option("cache", "any", HELP, convert=parse), start))
