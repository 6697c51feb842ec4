"""FLUX.2 VAE decode, imagegen vs diffusers' AutoencoderKLFlux2 on the same random weights, in one run: time and
peak memory above the weights at 1024x1024 and 2048x2048, imagegen's variants (CUDA group norm on/off, how layers
are synchronized, conv strips), and the decoded images' difference.

    python3 benchmarks/bench_vae.py [--sizes 1024,2048] [--out vae.jsonl]
    python3 benchmarks/bench_vae.py --tiny              # tiny VAE on the CPU: proves the code paths

Goals (issue 22, goal 1): 1024 px <= 30 ms at no more memory than diffusers; 2048 px <= 170 ms."""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np
from common import Recorder, errors, free_memory, need, round_floats, start_run, time_torch
from families import FLUX2_VAE, FLUX2_VAE_TINY, _randomize_norms

from imagegen.nn.pacing import Pacer

GOAL_MS = {1024: 30.0, 2048: 170.0}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default=None, help="image sides (default 1024,2048; tiny 32,64)")
    p.add_argument("--impls", default="imagegen,diffusers")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--workdir", type=Path, default=Path("/tmp/imagegen-bench"))
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--sweep", action="store_true", help="also every layer pacing x conv-strip size")
    p.add_argument("--only", default=None, help="comma-separated imagegen variant names: just these")
    args = p.parse_args(argv)
    args.sizes = [int(s) for s in (args.sizes or ("32,64" if args.tiny else "1024,2048")).split(",")]
    args.impls = {s.strip() for s in args.impls.split(",")}
    return args


def write_vae(folder: Path, tiny: bool) -> None:
    """Random AutoencoderKLFlux2 weights (norms randomized too), saved in the diffusers layout."""
    torch = need("torch")
    from diffusers import AutoencoderKLFlux2

    torch.manual_seed(0)
    vae = AutoencoderKLFlux2(**(FLUX2_VAE_TINY if tiny else FLUX2_VAE)).eval()
    _randomize_norms(vae)
    vae.to(torch.bfloat16).save_pretrained(folder, safe_serialization=True)


def latents(size: int, channels: int) -> np.ndarray:
    return np.random.default_rng(0).standard_normal((1, channels, size // 8, size // 8)).astype(np.float32)


def imagegen_variants(size: int, tiny: bool, sweep: bool = False) -> list[tuple[str, dict[str, Any]]]:
    """(name, settings) of imagegen's decode: the default, then one change at a time."""
    variants = [
        ("imagegen", {}),
        ("imagegen-portable-group-norm", {"fused": False}),
        ("imagegen-paced", {"pacing": (1, 1)}),
        ("imagegen-one-graph", {"pacing": (0, 0)}),
    ]
    if size >= 2048 or tiny:
        variants.append(("imagegen-no-conv-strips", {"workspace": 1 << 50}))
    if sweep:  # every pacing with three conv-strip sizes: which one meets the time goal within diffusers' memory
        variants += [
            (f"imagegen-pacing-{every}-{ahead}-strips-{name}", {"pacing": (every, ahead), "workspace": bytes_})
            for every, ahead in ((1, 0), (1, 1), (2, 0), (2, 1), (3, 0), (4, 0))
            for name, bytes_ in (("2gb", 1 << 31), ("4gb", 1 << 32), ("none", 1 << 50))
        ]
        # small stages one layer ahead, large ones waiting (vae_blocks.AHEAD_BELOW_BYTES): at 1024 px the stages
        # take 17 (mid, first up), 67, 268 and 537 MB inputs, at 2048 px four times those
        variants += [(f"imagegen-ahead-below-{mb}mb", {"ahead_below": mb << 20}) for mb in (32, 96, 300, 600)]
        # the pacing before: a waiting layer's graph built only after the previous layer finished
        variants.append(("imagegen-build-after-wait", {"pacer": BuildAfterWait}))
    return variants


class BuildAfterWait(Pacer):
    """imagegen.nn.pacing.Pacer as it was: with ahead 0 each layer is evaluated (and waited for) as soon as its
    graph is built, so the GPU idles while the host builds the next layer's graph."""

    def __call__(self, *arrays: mx.array) -> None:
        if self.every and not self.ahead:
            self.count += 1
            if self.count % self.every == 0:
                mx.eval(*arrays)
            return
        super().__call__(*arrays)


def run_imagegen(args: argparse.Namespace, folder: Path, recorder: Recorder, outputs: dict[int, np.ndarray]) -> None:
    from imagegen_flux2.vae import AutoencoderKLFlux2

    from imagegen.cli.bench import time_mlx
    from imagegen.nn import cuda_kernels
    from imagegen.nn import vae_blocks as blocks

    vae = AutoencoderKLFlux2.from_folder(folder, "bfloat16")
    mx.eval(vae.parameters())
    weights_gb = mx.get_active_memory() / 1e9
    channels = vae.config.latent_channels
    knobs = ("LAYER_PACING", "CONV_WORKSPACE_BYTES", "AHEAD_BELOW_BYTES")
    defaults = (cuda_kernels.ENABLED, *(getattr(blocks, k) for k in knobs))
    pacer = blocks.Pacer
    for size in args.sizes:
        z = mx.array(latents(size, channels)).transpose(0, 2, 3, 1).astype(mx.bfloat16)
        for name, settings in imagegen_variants(size, args.tiny, args.sweep):
            if args.only and name not in args.only.split(","):
                continue
            cuda_kernels.ENABLED = settings.get("fused", defaults[0])
            blocks.LAYER_PACING = settings.get("pacing", defaults[1])
            blocks.CONV_WORKSPACE_BYTES = settings.get("workspace", defaults[2])
            blocks.AHEAD_BELOW_BYTES = settings.get("ahead_below", defaults[3])
            blocks.Pacer = settings.get("pacer", pacer)
            try:
                t = time_mlx(lambda z=z: vae.decode(z), args.warmup, args.repeats)
                record = {
                    "section": "vae",
                    "impl": name,
                    "size": f"{size}x{size}",
                    **t.record(),
                    "above_weights_gb": round(t.peak_gb - weights_gb, 3),
                }
                if name == "imagegen":
                    outputs[size] = np.array(vae.decode(z).astype(mx.float32)).transpose(0, 3, 1, 2)
                recorder.emit(record)
            except Exception as e:  # one variant failing (memory) must not end the section
                recorder.emit(
                    {"section": "vae", "impl": name, "size": f"{size}x{size}", "error": f"{type(e).__name__}: {e}"}
                )
            finally:
                cuda_kernels.ENABLED = defaults[0]
                for knob, value in zip(knobs, defaults[1:]):
                    setattr(blocks, knob, value)
                blocks.Pacer = pacer
                free_memory()


def run_diffusers(
    args: argparse.Namespace,
    folder: Path,
    recorder: Recorder,
    outputs: dict[int, np.ndarray],
    results: dict[tuple[str, int], dict[str, Any]],
) -> None:
    torch = need("torch")
    from diffusers import AutoencoderKLFlux2

    device = "cpu" if args.tiny else "cuda"
    vae = AutoencoderKLFlux2.from_pretrained(folder, torch_dtype=torch.bfloat16).to(device).eval()
    cuda = device == "cuda"
    weights_gb = torch.cuda.memory_allocated() / 1e9 if cuda else 0.0
    for size in args.sizes:
        z = torch.from_numpy(latents(size, vae.config.latent_channels)).to(device, torch.bfloat16)
        try:
            t = time_torch(lambda z=z: vae.decode(z, return_dict=False)[0], args.warmup, args.repeats)
            record = {
                "section": "vae",
                "impl": "diffusers",
                "size": f"{size}x{size}",
                **t.record(),
                "above_weights_gb": round(t.peak_gb - weights_gb, 3) if t.peak_gb is not None else None,
            }
            results[("diffusers", size)] = recorder.emit(record)
            if size in outputs:
                with torch.no_grad():
                    want = vae.decode(z, return_dict=False)[0].float().cpu().numpy()
                recorder.emit(
                    {
                        "section": "vae",
                        "impl": "imagegen-vs-diffusers",
                        "size": f"{size}x{size}",
                        **round_floats(errors(outputs[size], want)),
                    }
                )
        except Exception as e:
            recorder.emit(
                {"section": "vae", "impl": "diffusers", "size": f"{size}x{size}", "error": f"{type(e).__name__}: {e}"}
            )
        free_memory()


def goals(records: list[dict[str, Any]], sizes: list[int]) -> list[dict[str, Any]]:
    """Goal lines: imagegen's default decode against the issue's times and diffusers' memory."""
    found = {(r.get("impl"), r.get("size")): r for r in records if r.get("section") == "vae" and "ms" in r}
    lines = []
    for size in sizes:
        ours, theirs = found.get(("imagegen", f"{size}x{size}")), found.get(("diffusers", f"{size}x{size}"))
        if ours is None:
            continue
        line = {
            "section": "goal",
            "goal": f"VAE decode {size}x{size}",
            "ms": ours["ms"],
            "goal_ms": GOAL_MS.get(size),
            "above_weights_gb": ours["above_weights_gb"],
        }
        if theirs is not None:
            line.update(
                diffusers_ms=theirs["ms"],
                diffusers_above_weights_gb=theirs["above_weights_gb"],
                vs_diffusers=round(ours["ms"] / theirs["ms"], 3),
            )
        met = size not in GOAL_MS or ours["ms"] <= GOAL_MS[size]
        if size == 1024 and theirs is not None and theirs["above_weights_gb"] is not None:
            met = met and ours["above_weights_gb"] <= theirs["above_weights_gb"]
        lines.append({**line, "met": met})
    return lines


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    recorder = start_run(args)
    folder = args.workdir / "flux2-vae"
    shutil.rmtree(folder, ignore_errors=True)
    start = time.perf_counter()
    write_vae(folder, args.tiny)
    recorder.emit({"section": "vae", "what": "setup", "s": round(time.perf_counter() - start, 1)})
    outputs: dict[int, np.ndarray] = {}
    results: dict[tuple[str, int], dict[str, Any]] = {}
    try:
        if "imagegen" in args.impls:
            run_imagegen(args, folder, recorder, outputs)
        if "diffusers" in args.impls:
            run_diffusers(args, folder, recorder, outputs, results)
        for line in goals(recorder.records, args.sizes):
            recorder.emit(line)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
