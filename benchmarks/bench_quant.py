"""Where a quantized linear should switch from MLX's quantized matmul to dequantize + dense GEMM: both paths (and
the dense bf16 GEMM for scale) at Klein 4B's layer shapes, for a sweep of token counts, per quantization mode.

    python3 benchmarks/bench_quant.py [--modes 8,4,mxfp8,mxfp4,nvfp4] [--out quant.jsonl]
    python3 benchmarks/bench_quant.py --tiny            # CPU, small shapes: proves the code paths

One JSON line per (mode, shape, tokens) with `quantized_ms`, `dequantized_ms` (imagegen's dense path), `dense_ms`
(a bf16 weight), and a last line per mode with the smallest token count from which the dense path is faster at
every larger count (`crossover_tokens`): the value for IMAGEGEN_DEQUANTIZE_TOKENS. Section `dequantize`: MLX's
mx.dequantize against imagegen's affine kernel (imagegen.nn.affine_dequantize) per layer shape, in GB/s moved.
Section `fp8`: imagegen's FP8 layer (row quantizer + cuBLASLt's FP8 GEMM, imagegen.nn.fp8_linear) against the
bf16 layer and, where PyTorch sees the GPU, torch._scaled_mm with the same row-wise scales, in ms and TFLOP/s.

    python3 benchmarks/bench_quant.py --sections fp8"""

from __future__ import annotations

import argparse
import os
import sys
import time
from functools import partial
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from common import start_run

TOKENS = (16, 64, 128, 256, 512, 1024, 4608)
SHAPES = ((3072, 3072), (3072, 9216), (9216, 3072))  # (in, out): attention projections, the MLP's in and out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--modes", default="8,4,mxfp8,mxfp4,nvfp4")
    p.add_argument("--sections", default="dequantize,matmul", help="comma list of dequantize, matmul, fp8")
    p.add_argument("--tokens", default=None, help=f"comma list (default {','.join(map(str, TOKENS))}; tiny 8,32)")
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--tiny", action="store_true", help="CPU, 128-wide layers")
    args = p.parse_args(argv)
    args.modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    args.sections = {s.strip() for s in args.sections.split(",") if s.strip()}
    args.tokens = [int(t) for t in (args.tokens or ("8,32" if args.tiny else ",".join(map(str, TOKENS)))).split(",")]
    return args


def median_ms(repeats: int, fn, *args) -> float:
    for _ in range(3):
        mx.eval(fn(*args))
    mx.synchronize()
    runs = []
    for _ in range(repeats):
        start = time.perf_counter()
        mx.eval(fn(*args))
        mx.synchronize()
        runs.append((time.perf_counter() - start) * 1e3)
    return sorted(runs)[len(runs) // 2]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    recorder = start_run(args)
    from imagegen import quantize
    from imagegen.nn.quantized_linear import dense_weight

    def through_dense(layer: nn.QuantizedLinear, x: mx.array) -> mx.array:  # imagegen's path for many tokens
        return mx.addmm(layer.bias, x, dense_weight(layer, x.dtype).T)

    shapes = ((128, 128),) if args.tiny else SHAPES
    repeats = 2 if args.tiny else args.repeats
    if "dequantize" in args.sections:
        dequantize_section(recorder, shapes, repeats)
    if "fp8" in args.sections:
        fp8_section(recorder, shapes, args.tokens, repeats)
    for mode in args.modes if "matmul" in args.sections else ():
        s = quantize.scheme(quantize.normalize_mode(mode))
        faster: dict[int, bool] = {}
        for d_in, d_out in shapes:
            linear = nn.Linear(d_in, d_out)
            linear.set_dtype(mx.bfloat16)
            layer = nn.QuantizedLinear.from_linear(linear, s["group_size"], s["bits"], mode=s["mode"])
            mx.eval(linear.parameters(), layer.parameters())
            for tokens in args.tokens:
                x = mx.random.normal((tokens, d_in)).astype(mx.bfloat16)
                quantized = median_ms(repeats, nn.QuantizedLinear.__call__, layer, x)
                dequantized = median_ms(repeats, through_dense, layer, x)
                dense = median_ms(repeats, linear, x)
                faster[tokens] = faster.get(tokens, True) and dequantized <= quantized
                recorder.emit(
                    {
                        "section": "quant-matmul",
                        "mode": mode,
                        "shape": f"{tokens}x{d_in}x{d_out}",
                        "tokens": tokens,
                        "quantized_ms": round(quantized, 4),
                        "dequantized_ms": round(dequantized, 4),
                        "dense_ms": round(dense, 4),
                        "dequantized_vs_dense": round(dequantized / dense, 3),
                        "quantized_vs_dense": round(quantized / dense, 3),
                    }
                )
        counts = sorted(faster)
        crossover = next((t for i, t in enumerate(counts) if all(faster[u] for u in counts[i:])), None)
        recorder.emit(
            {
                "section": "quant-crossover",
                "mode": mode,
                "crossover_tokens": crossover,
                "current_threshold": int(os.environ.get("IMAGEGEN_DEQUANTIZE_TOKENS", "256")),
            }
        )
    return 0


CHAIN = 20  # fp8 section: calls per timed evaluation, so a call's time is the GPU's, not one evaluation's overhead


def chained(fn, *args):
    return lambda: [fn(*args) for _ in range(CHAIN)]


def torch_ms(repeats: int, fn) -> float:
    """Median ms of one fn() call, timed over CHAIN calls per synchronization."""
    import torch

    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    runs = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(CHAIN):
            fn()
        torch.cuda.synchronize()
        runs.append((time.perf_counter() - start) * 1e3 / CHAIN)
    return sorted(runs)[len(runs) // 2]


def scaled_mm(x8: mx.array, xs: mx.array, w8: mx.array, ws: mx.array):
    """torch._scaled_mm on the same bytes and row-wise scales, or None without a CUDA PyTorch."""
    try:
        import numpy as np
        import torch
    except ImportError:
        return None
    if not torch.cuda.is_available():
        return None
    a = torch.from_numpy(np.array(x8)).cuda().view(torch.float8_e4m3fn)
    b = torch.from_numpy(np.array(w8)).cuda().view(torch.float8_e4m3fn).t()
    sa = torch.from_numpy(np.array(xs)).cuda()[:, None]
    sb = torch.from_numpy(np.array(ws)).cuda()[None, :]
    return lambda: torch._scaled_mm(a, b, scale_a=sa, scale_b=sb, out_dtype=torch.bfloat16)


def fp8_section(recorder, shapes, tokens_list, repeats: int) -> None:
    from imagegen.nn import fp8_linear

    for d_in, d_out in shapes:
        linear = nn.Linear(d_in, d_out)
        linear.set_dtype(mx.bfloat16)
        layer = fp8_linear.Fp8Linear.from_linear(linear)
        mx.eval(linear.parameters(), layer.parameters())
        for tokens in tokens_list:
            x = mx.random.normal((tokens, d_in)).astype(mx.bfloat16)
            fast = layer._fast(x)
            flops = 2 * tokens * d_in * d_out / 1e9
            fp8 = median_ms(repeats, chained(layer, x)) / CHAIN
            dense = median_ms(repeats, chained(linear, x)) / CHAIN
            row = {
                "section": "fp8",
                "shape": f"{tokens}x{d_in}x{d_out}",
                "tokens": tokens,
                "cublaslt": fast,
                "fp8_ms": round(fp8, 4),
                "bf16_ms": round(dense, 4),
                "fp8_vs_bf16": round(fp8 / dense, 3),
                "fp8_tflops": round(flops / fp8, 1),
                "bf16_tflops": round(flops / dense, 1),
            }
            if fast:
                quantize_ms = median_ms(repeats, chained(fp8_linear.quantize_rows_fused, x, d_out)) / CHAIN
                x8, xs = fp8_linear.quantize_rows(x)
                buffer = mx.zeros((tokens, d_out), mx.bfloat16)
                gemm_ms = median_ms(repeats, chained(fp8_linear._extension().fp8_matmul, x8, layer.weight, buffer))
                row |= {"quantize_rows_ms": round(quantize_ms, 4), "gemm_ms": round(gemm_ms / CHAIN, 4)}
                torch_fn = scaled_mm(x8, xs, layer.weight, layer.weight_scale)
                if torch_fn is not None:
                    t = torch_ms(repeats, torch_fn)
                    row |= {"torch_scaled_mm_ms": round(t, 4), "torch_scaled_mm_tflops": round(flops / t, 1)}
            recorder.emit(row)


def dequantize_section(recorder, shapes, repeats: int) -> None:
    """MLX's affine dequantize vs imagegen's kernel (the one quantized layers run on CUDA) per shape and bit width."""
    from imagegen.nn import affine_dequantize

    for bits in (8, 4):
        for d_in, d_out in shapes:
            w, scales, biases = mx.quantize(mx.random.normal((d_out, d_in)).astype(mx.bfloat16), 64, bits)
            mx.eval(w, scales, biases)
            mlx_ms = median_ms(repeats, partial(mx.dequantize, group_size=64, bits=bits), w, scales, biases)
            ours_ms = median_ms(repeats, affine_dequantize.dequantize, w, scales, biases, 64, bits)
            moved = (w.nbytes + scales.nbytes + biases.nbytes + d_in * d_out * 2) / 1e9  # read codes, write bf16
            recorder.emit(
                {
                    "section": "dequantize",
                    "bits": bits,
                    "shape": f"{d_out}x{d_in}",
                    "mlx_ms": round(mlx_ms, 4),
                    "imagegen_ms": round(ours_ms, 4),
                    "speedup": round(mlx_ms / ours_ms, 2),
                    "mlx_gb_s": round(moved / mlx_ms * 1e3),
                    "imagegen_gb_s": round(moved / ours_ms * 1e3),
                    "fused": affine_dequantize.cuda_kernels.available(),
                }
            )


if __name__ == "__main__":
    sys.exit(main())
