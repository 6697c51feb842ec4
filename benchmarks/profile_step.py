"""Where a FLUX.2 Klein step's time goes on the GPU: per-kernel times (recorded through torch.profiler's CUPTI
tracer, which sees every CUDA kernel of the process, MLX's included), and the step with imagegen's CUDA kernels on
and off (imagegen.nn.cuda_kernels: attention inputs, SwiGLU), random weights, bf16, 1024x1024.

    python3 benchmarks/profile_step.py [flux2-klein-4b|flux2-klein-9b] [--no-kernels] [--quantize fp8]   # JSON lines"""

from __future__ import annotations

import argparse
import json
import re
from collections import defaultdict

import mlx.core as mx
import numpy as np
from families import FULL, Flux2
from imagegen_flux2.config import Flux2TransformerConfig
from imagegen_flux2.transformer import Flux2Transformer

from imagegen.cli.bench import evaluate, time_mlx
from imagegen.nn import cuda_kernels

# Kernel families by name (cuBLAS / CUTLASS GEMMs, cuDNN attention, MLX's own kernels).
GROUPS = [
    ("gemm", r"gemm|cutlass|sm90_xmma|nvjet|cublas"),
    ("attention", r"sdpa|fmha|flash|cudnn|attn"),
    ("imagegen_kernels", r"imagegen_"),
    ("norm", r"norm"),
    ("copy", r"copy|concat|gather|scatter"),
    ("compiled", r"compiled|fused"),
    ("other", r"."),
]


def group(name: str) -> str:
    return next(g for g, pattern in GROUPS if re.search(pattern, name, re.IGNORECASE))


def kernel_events(fn, calls: int) -> list[tuple[str, float]]:
    """(name, GPU microseconds) of every CUDA kernel that `calls` evaluated calls of fn ran (after one untimed)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    evaluate(fn())
    mx.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            evaluate(fn())
        mx.synchronize()
        torch.cuda.synchronize()
    return [(e.name, e.time_range.elapsed_us()) for e in prof.events() if e.device_type.name == "CUDA"]


def kernel_times(fn, steps: int = 3) -> dict[str, float]:
    """GPU microseconds per kernel name over `steps` calls of fn, divided by steps."""
    totals: dict[str, float] = defaultdict(float)
    for name, us in kernel_events(fn, steps):
        totals[name] += us / steps
    return dict(totals)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model", nargs="?", default="flux2-klein-4b", help="a FLUX.2 Klein model id")
    p.add_argument("--no-kernels", action="store_true", help="timings only, no per-kernel profile")
    p.add_argument("--quantize", default=None, help="quantize the transformer first (e.g. fp8)")
    args = p.parse_args()
    model_id, mode = args.model, args.quantize
    fam = Flux2(model_id, FULL)
    transformer = Flux2Transformer(Flux2TransformerConfig(**fam.transformer_config))
    transformer.set_dtype(mx.bfloat16)
    if mode:  # the layers the pipeline would quantize
        from imagegen_flux2.transformer import quant_predicate

        from imagegen.quantize import quantize_model

        quantize_model(transformer, mode, quant_predicate)
    mx.eval(transformer.parameters())
    inputs = fam.step_inputs(FULL.size)
    flops = fam.flops(FULL.size, FULL.text_len)
    outputs = {}
    for fused in (True, False):
        cuda_kernels.ENABLED = fused
        for pace in (1, 0):
            fn = fam.imagegen_step(transformer, inputs, True, pace)
            t = time_mlx(fn, 2, 7)
            outputs[fused] = np.array(fn().astype(mx.float32))
            print(
                json.dumps(
                    {
                        "model": model_id,
                        "quantize": mode,
                        "fused_kernels": fused,
                        "pace": pace,
                        "ms": round(t.ms, 2),
                        "runs_ms": [round(r, 2) for r in t.runs],
                        "peak_gb": round(t.peak_gb, 3),
                        "tflops": round(flops / t.ms / 1e9, 1),
                    }
                ),
                flush=True,
            )
        if args.no_kernels:
            continue
        try:
            times = kernel_times(fam.imagegen_step(transformer, inputs, True, 1))
        except Exception as e:  # noqa: BLE001 - no CUPTI: the timings above still stand
            print(json.dumps({"kernels": "unavailable", "error": f"{type(e).__name__}: {e}"[:300]}), flush=True)
            continue
        groups: dict[str, float] = defaultdict(float)
        for name, us in times.items():
            groups[group(name)] += us
        top = sorted(times.items(), key=lambda kv: -kv[1])[:25]
        by_group = {g: round(v / 1e3, 2) for g, v in sorted(groups.items(), key=lambda kv: -kv[1])}
        print(
            json.dumps(
                {
                    "model": model_id,
                    "quantize": mode,
                    "fused_kernels": fused,
                    "by_group_ms": by_group,
                    "gpu_ms_per_step": round(sum(times.values()) / 1e3, 2),
                    "top_kernels_ms": [[n[:120], round(v / 1e3, 3)] for n, v in top],
                }
            ),
            flush=True,
        )
    a, b = outputs[True], outputs[False]
    print(
        json.dumps(
            {
                "model": model_id,
                "fused_vs_plain_max_rel": float(np.abs(a - b).max() / np.abs(b).max()),
                "mean_abs": float(np.abs(a - b).mean()),
            }
        ),
        flush=True,
    )
    cuda_kernels.ENABLED = True


if __name__ == "__main__":
    main()
