"""Quantized weights at dense speed: with many tokens, dequantize the layer's weight and run the dense GEMM.

MLX's quantized matmul reads fewer bytes but runs 2-4x below the dense GEMM rate once there are thousands of rows
(H100, 4096x3072x3072: affine 4-bit 124, 8-bit 148, mxfp8 110, nvfp4 96 TFLOP/s vs 420 dense). Dequantizing costs
one pass over the weight (a few microseconds per layer), so from a few dozen tokens on, dequantize + dense GEMM wins
and the memory saving stays: the dense copy is a temporary of the one layer, freed once its GEMM has run (the paced
blocks bound how many layers are in flight). Few tokens (a text prompt, a tiny image) keep the quantized kernel,
which moves fewer bytes where bandwidth is what counts."""

from __future__ import annotations

import os

import mlx.core as mx
import mlx.nn as nn

from . import affine_dequantize

# Rows (tokens x batch) from which a layer dequantizes; 0 turns the dense path off. benchmarks/bench_quant.py
# measures where the two paths cross per mode.
DEQUANTIZE_TOKENS = int(os.environ.get("IMAGEGEN_DEQUANTIZE_TOKENS", "256"))


def dense_weight(layer: nn.QuantizedLinear, dtype: mx.Dtype | None, after: mx.array | None = None) -> mx.array:
    """The layer's weight [out, in] dequantized into `dtype` (the same values quantized_matmul multiplies by).

    `after`: an array the dequantization waits for. A dequantization depends on weights alone, so MLX may schedule
    every layer's at the start of an evaluation and hold all the dense copies at once (a 4-bit model then peaks
    near its bf16 size); waiting for the layer's input keeps one dense weight alive at a time."""
    weight = layer["weight"] if after is None else mx.depends(layer["weight"], after)
    if layer.mode == "affine":  # a faster kernel on CUDA
        return affine_dequantize.dequantize(
            weight, layer["scales"], layer["biases"], layer.group_size, layer.bits, dtype
        )
    return mx.dequantize(
        weight,
        layer["scales"],
        layer.get("biases"),
        group_size=layer.group_size,
        bits=layer.bits,
        mode=layer.mode,
        dtype=dtype,
    )


class QuantizedLinear(nn.QuantizedLinear):
    """mlx.nn.QuantizedLinear that multiplies many rows by its dequantized weight (module docstring)."""

    def __call__(self, x: mx.array) -> mx.array:
        rows = x.size // x.shape[-1] if x.ndim else 0
        if not DEQUANTIZE_TOKENS or rows < DEQUANTIZE_TOKENS:
            return super().__call__(x)
        # affine: the scales' dtype, promoted with x's in the GEMM as quantized_matmul does (float modes' scales
        # are bytes: x's dtype)
        weight = dense_weight(self, None if self.mode == "affine" else x.dtype, after=x)
        return mx.addmm(self["bias"], x, weight.T) if "bias" in self else x @ weight.T


def dequantize_for_many_tokens(model: nn.Module) -> None:
    """Give every mlx.nn.QuantizedLinear of `model` the dense path for many tokens, in place (same parameters,
    same keys: only the class changes)."""
    for _, module in model.named_modules():
        if type(module) is nn.QuantizedLinear:
            module.__class__ = QuantizedLinear
