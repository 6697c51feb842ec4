"""Quantization through one door: mlx.nn.quantize with a family predicate, recorded and re-applied.

Modes: affine integers ("2".."8" bits, group size 64 unless given as "4@32"), and the microscaling
float formats "mxfp8", "mxfp4" and "nvfp4" (E4M3 scales). A saved model carries quantization.json;
loading it rebuilds the same layers without re-quantizing. The layers multiply many tokens by their dequantized
weight (imagegen.nn.quantized_linear): memory of the quantized model at the speed of the dense one.

"fp8" is the one mode that is faster than bf16, not only smaller: E4M3 weights and activations with per-channel /
per-token scales, multiplied on the FP8 tensor cores of CUDA GPUs from compute capability 8.9
(imagegen.nn.fp8_linear; emulated, slowly, elsewhere). It replaces Linears only, through its own door.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from .errors import InvalidOptionError

QUANT_FILE = "quantization.json"
AFFINE_BITS = (2, 3, 4, 5, 6, 8)
FLOAT_MODES = {"mxfp8": (32, 8), "mxfp4": (32, 4), "nvfp4": (16, 4)}  # mode -> (group size, bits)
FP8 = "fp8"
FP8_ALIASES = ("fp8", "e4m3", "float8", "fp8_e4m3", "w8a8")
ALL_MODES = tuple(str(b) for b in AFFINE_BITS) + tuple(FLOAT_MODES) + (FP8,)

Predicate = Callable[[str, nn.Module], bool]


def normalize_mode(mode: str | int) -> str:
    """'4', 4, 'int4', 'q4' -> '4'; '4@32' keeps its group size; float modes lower-cased."""
    text = str(mode).strip().lower()
    for prefix in ("int", "q", "affine"):
        if text.startswith(prefix) and text[len(prefix) :][:1].isdigit():
            text = text[len(prefix) :]
    if text in FP8_ALIASES:
        return FP8
    bits, _, group = text.partition("@")
    if bits in FLOAT_MODES and not group:
        return bits
    if bits.isdigit() and int(bits) in AFFINE_BITS and (not group or group in ("32", "64", "128")):
        return bits if group in ("", "64") else text  # 64 is the default group size: "4@64" is "4"
    raise InvalidOptionError(
        f"Unknown quantization '{mode}': use one of {', '.join(ALL_MODES)} (affine may add @32/@64/@128)."
    )


def scheme(mode: str) -> dict[str, Any]:
    """The mx.quantize arguments of a normalized mode (fp8: one scale per output channel, group size 0)."""
    if mode == FP8:
        return {"mode": FP8, "bits": 8, "group_size": 0}
    if mode in FLOAT_MODES:
        group_size, bits = FLOAT_MODES[mode]
        return {"mode": mode, "bits": bits, "group_size": group_size}
    bits, _, group = mode.partition("@")
    return {"mode": "affine", "bits": int(bits), "group_size": int(group or 64)}


def check_supported(mode: str) -> None:
    """Refuse, with a clear message, a mode the installed MLX or this device cannot run."""
    if mode == FP8:  # plain MLX ops wherever the FP8 GEMM is not there
        return
    s = scheme(mode)
    try:
        layer = nn.QuantizedLinear(256, 64, bias=False, group_size=s["group_size"], bits=s["bits"], mode=s["mode"])
        mx.eval(layer(mx.zeros((1, 256))))
    except Exception as e:  # MLX raises ValueError / RuntimeError for unsupported combinations
        raise InvalidOptionError(
            f"Quantization '{mode}' is not supported by MLX {mx.__version__} on {mx.default_device()}: {e}"
        ) from None


def _quantizable(module: nn.Module, group_size: int) -> bool:
    weight = getattr(module, "weight", None)
    return hasattr(module, "to_quantized") and weight is not None and weight.shape[-1] % group_size == 0


def quantize_model(model: nn.Module, mode: str, predicate: Predicate | None = None) -> dict[str, Any]:
    """Quantize in place the layers the family predicate picks; returns the record to save."""
    mode = normalize_mode(mode)
    check_supported(mode)
    s = scheme(mode)
    if mode == FP8:
        from .nn import fp8_linear  # imagegen.nn imports weights, which imports us

        fp8_linear.quantize_linears(model, lambda path, module: predicate is None or predicate(path, module))
        return {"quantization": mode, **s}

    def pick(path: str, module: nn.Module) -> bool:
        return _quantizable(module, s["group_size"]) and (predicate is None or predicate(path, module))

    nn.quantize(model, group_size=s["group_size"], bits=s["bits"], mode=s["mode"], class_predicate=pick)
    _dense_for_many_tokens(model)
    return {"quantization": mode, **s}


def apply_record(model: nn.Module, record: dict[str, Any], weights: dict[str, mx.array]) -> None:
    """Rebuild quantized layers of a saved model: exactly those whose `.scales` the file holds."""
    s = {k: record[k] for k in ("mode", "bits", "group_size")}
    if s["mode"] == FP8:
        from .nn import fp8_linear

        fp8_linear.rebuild_linears(model, weights)
        return

    def pick(path: str, module: nn.Module) -> bool:
        return f"{path}.scales" in weights and hasattr(module, "to_quantized")

    nn.quantize(model, class_predicate=pick, **s)
    _dense_for_many_tokens(model)


def _dense_for_many_tokens(model: nn.Module) -> None:
    from .nn.quantized_linear import dequantize_for_many_tokens  # imagegen.nn imports weights, which imports us

    dequantize_for_many_tokens(model)


def keep_high_precision(*names: str) -> Predicate:
    """A predicate quantizing everything except modules whose path contains any of `names`."""
    return lambda path, module: not any(n in path for n in names)
