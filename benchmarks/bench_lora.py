"""LoRA cost on the GPU: a FLUX.2 Klein 4B transformer step at 1024x1024 (random weights, the pipeline's paced and
compiled blocks) bare vs with one rank-32 LoRA on every block projection, in bf16 (merged into the weights) and on
8-bit weights (a low-rank side path), and the time to switch to another adapter between two requests.

Goals (issue 20): LoRA step <= 1.05x the bare step in bf16, <= 1.10x on 8-bit weights; a switch < 1 s.
Prints one JSON line per measurement; `--quick` runs a tiny config on the CPU (a smoke test, numbers meaningless).

    python benchmarks/bench_lora.py [--quick] [--out benchmarks/results/lora.jsonl]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import mlx.core as mx
import numpy as np
from common import Recorder, ensure_imports, header
from families import FULL, KLEIN_4B, KLEIN_TINY, TINY, Flux2

GOALS = {"bf16": 1.05, "8": 1.10}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny config on the CPU (smoke test)")
    p.add_argument("--rank", type=int, default=32, help="LoRA rank")
    p.add_argument("--pace", type=int, default=1, help="blocks per host wait, as the pipelines run (0: one graph)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 2; quick 1)")
    p.add_argument("--repeats", type=int, default=None, help="timed steps, median reported (default 5; quick 1)")
    p.add_argument("--out", type=Path, default=None, help="also write the JSON lines to this file")
    return p.parse_args(argv)


def write_lora(transformer, folder: Path, rank: int, seed: int) -> Path:
    """A rank-`rank` LoRA in diffusers' PEFT layout on every projection of every block (the usual target set)."""
    from imagegen_flux2.lora import lora_targets

    rng = np.random.default_rng(seed)
    tensors = {}
    for name, parts in lora_targets(transformer)["diffusers"].items():
        if not name.startswith(("transformer_blocks.", "single_transformer_blocks.")) or name.endswith(
            ("to_qkv", "to_added_qkv")
        ):
            continue
        out = sum(p.rows[1] - p.rows[0] if p.rows else _shape(transformer, p.path)[0] for p in parts[:1])
        inp = parts[-1].cols[1] if parts[-1].cols else _shape(transformer, parts[0].path)[1]
        tensors[f"transformer.{name}.lora_A.weight"] = mx.array(rng.standard_normal((rank, inp), np.float32) * 0.01)
        tensors[f"transformer.{name}.lora_B.weight"] = mx.array(rng.standard_normal((out, rank), np.float32) * 0.01)
    path = folder / f"rank{rank}-{seed}.safetensors"
    mx.save_safetensors(str(path), {k: v.astype(mx.bfloat16) for k, v in tensors.items()})
    return path


def _shape(transformer, path: str) -> tuple[int, int]:
    from imagegen.lora.apply import layer_shape, module_at

    return layer_shape(module_at(transformer, path)[2])


def transformer_for(config: dict, quantize: str | None):
    from imagegen_flux2.config import Flux2TransformerConfig
    from imagegen_flux2.transformer import Flux2Transformer, quant_predicate

    from imagegen.weights import load_module, random_weights

    model = Flux2Transformer(Flux2TransformerConfig.from_dict(config))
    with random_weights():
        load_module(model, "unused", "bfloat16", quantize, quant_predicate)
    return model


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    ensure_imports()

    scale, config = (TINY, KLEIN_TINY) if args.quick else (FULL, KLEIN_4B)
    warmup = args.warmup if args.warmup is not None else (1 if args.quick else 2)
    repeats = args.repeats if args.repeats is not None else (1 if args.quick else 5)
    recorder = Recorder(args.out)
    recorder.emit(header({**vars(args), "out": str(args.out)}))
    family = Flux2("flux2-klein-4b", scale)
    family.transformer_config = config
    inputs = family.step_inputs(scale.size)
    folder = Path(tempfile.mkdtemp(prefix="imagegen-bench-lora-"))

    for quantize in (None, "8"):
        measure(recorder, family, config, inputs, folder, quantize, args, warmup, repeats)
        mx.clear_cache()


def measure(
    recorder,
    family,
    config: dict,
    inputs: dict,
    folder: Path,
    quantize: str | None,
    args: argparse.Namespace,
    warmup: int,
    repeats: int,
) -> None:
    """Bare step, step with one LoRA, and a switch to another LoRA, on weights in bf16 or quantized."""
    from imagegen_flux2.lora import lora_targets

    from imagegen.cli.bench import time_mlx
    from imagegen.lora import LoraManager, LoraSpec

    label = quantize or "bf16"
    transformer = transformer_for(config, quantize)
    manager = LoraManager("flux2-klein-4b", {"transformer": (transformer, lora_targets(transformer))}, mx.bfloat16)
    first, second = (write_lora(transformer, folder, args.rank, seed) for seed in (1, 2))

    def forward():  # the pipeline's forward: blocks compiled again whenever adapters change (weights_changed)
        transformer.compiled_blocks.clear()
        return family.imagegen_step(transformer, inputs, compiled=True, pace=args.pace)

    bare = time_mlx(forward(), warmup, repeats)
    recorder.emit({"model": "flux2-klein-4b", "weights": label, "lora": None, **bare.record()})
    manager.use([LoraSpec(str(first))])
    with_lora = time_mlx(forward(), warmup, repeats)
    ratio = with_lora.ms / bare.ms
    recorder.emit(
        {
            "model": "flux2-klein-4b",
            "weights": label,
            "lora": f"rank {args.rank}",
            **with_lora.record(),
            "ratio": round(ratio, 4),
            "goal": GOALS[label],
            "met": ratio <= GOALS[label],
        }
    )
    start = time.perf_counter()  # a request naming another adapter: patch, rebuild compiled blocks, first step
    manager.use([LoraSpec(str(second))])
    step = forward()
    mx.synchronize()
    switch = time.perf_counter() - start
    first_step = time_mlx(step, 0, 1).ms
    recorder.emit(
        {
            "model": "flux2-klein-4b",
            "weights": label,
            "switch_s": round(switch, 4),
            "first_step_after_switch_ms": round(first_step, 3),
            "step_ms": round(with_lora.ms, 3),
            "goal_s": 1.0,
            "met": switch + max(first_step - with_lora.ms, 0) / 1e3 < 1.0,
        }
    )


if __name__ == "__main__":
    main()
