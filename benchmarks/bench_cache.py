"""Step caching and the FLUX.2 small decoder on this device: speed-up and image difference, as JSON lines.

cache: for each model (random full-size weights in the diffusers layout, 1024x1024, 50 steps with CFG, one seed), the
uncached run, First-Block Cache at three thresholds (by default the quartiles of the changes it measures without
skipping: random weights change more from step to step than trained ones, so real-weight thresholds would skip
nothing) and MagCache at each --mag threshold (with ratios calibrated on this checkpoint by a `mag:calibrate` run):
denoise time, speed-up over uncached, steps skipped per CFG half, PSNR and SSIM against the uncached image.
decode: FLUX.2 VAE decode of a 1024x1024 image with the standard decoder and BFL's small decoder (random weights of
each config), imagegen and diffusers, and the ratios between them.

    python benchmarks/bench_cache.py --models flux2-klein-base-4b     # one model per call fits the 10-minute limit
    python benchmarks/bench_cache.py --models zimage
    python benchmarks/bench_cache.py --sections decode
    python benchmarks/bench_cache.py --quick                          # tiny configs on the CPU (smoke run)
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from functools import partial
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np
from common import (
    Budget,
    Recorder,
    Runner,
    ensure_imports,
    free_memory,
    header,
    image_difference,
    need,
    ssim,
    time_torch,
)
from families import FLUX2_VAE, FLUX2_VAE_TINY, FULL, TINY, family, torch_device

PROMPT = "a red fox sitting in fresh snow at dawn, telephoto, soft golden light, detailed fur"
# imagegen model -> the benchmarks/families.py checkpoint it runs on (the base models share the distilled ones'
# architecture; only Klein's model_index.json says which kind it is), and its CFG scale (diffusers' defaults)
MODELS = {"flux2-klein-base-4b": ("flux2-klein-4b", 4.0), "zimage": ("zimage-turbo", 5.0)}
SMALL_DECODER_CHANNELS = [96, 192, 384, 384]  # black-forest-labs/FLUX.2-small-decoder's decoder_block_out_channels
SECTIONS = ("cache", "decode")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default=",".join(MODELS), help=f"comma list of {', '.join(MODELS)}")
    p.add_argument("--sections", default=",".join(SECTIONS), help=f"comma list of {', '.join(SECTIONS)}")
    p.add_argument(
        "--fbc",
        default="auto",
        help="First-Block Cache thresholds; auto: the quartiles of the first "
        "block's step-to-step changes in an uncached run (random weights change more than trained ones)",
    )
    p.add_argument("--mag", default="0.06,0.12,0.24", help="MagCache thresholds")
    p.add_argument("--steps", type=int, default=None, help="denoising steps (default 50; quick 6)")
    p.add_argument("--repeats", type=int, default=None, help="timed decodes, median reported (default 5; quick 1)")
    p.add_argument("--budget-s", type=float, default=570.0, help="skip what would not finish in this many seconds")
    p.add_argument("--workdir", type=Path, default=Path("/tmp/imagegen-bench-cache"), help="random checkpoints")
    p.add_argument("--out", type=Path, default=None, help="also write the JSON lines to this file")
    p.add_argument("--quick", action="store_true", help="tiny configs on the CPU (a smoke run, not a measurement)")
    args = p.parse_args(argv)
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    args.sections = {s.strip() for s in args.sections.split(",") if s.strip()}
    args.fbc = None if args.fbc == "auto" else [float(t) for t in args.fbc.split(",") if t.strip()]
    args.mag = [float(t) for t in args.mag.split(",") if t.strip()]
    unknown = (set(args.models) - set(MODELS)) | (args.sections - set(SECTIONS))
    if unknown:
        p.error(f"unknown: {', '.join(sorted(unknown))}")
    args.steps = args.steps or (6 if args.quick else 50)
    args.repeats = args.repeats or (1 if args.quick else 5)
    return args


def recording_wrappers() -> list[Any]:
    """Every cache wrapper a run starts, so its skip record can be read after generate()."""
    from imagegen_cache import plugin

    started: list[Any] = []
    start = plugin.start

    def recorded(value, request):
        started.append(start(value, request))
        return started[-1]

    plugin.start = recorded
    return started


def cache_section(model: str, args: argparse.Namespace) -> Any:
    def body():
        need("torch"), need("diffusers"), need("imagegen_cache")
        from imagegen import registry

        scale = TINY if args.quick else FULL
        folder = args.workdir / model
        shutil.rmtree(folder, ignore_errors=True)
        start = time.perf_counter()
        fam_id, guidance = MODELS[model]
        family(fam_id, scale).write_folder(folder, torch_device())
        index = folder / "model_index.json"
        if model.startswith("flux2"):  # the base model: CFG, no step distillation
            index.write_text(json.dumps({**json.loads(index.read_text()), "is_distilled": False}))
        yield {"what": "checkpoint", "s": round(time.perf_counter() - start, 1)}

        pipe = registry.get(model).pipeline(weights=folder, dtype="float32" if args.quick else "bfloat16")
        started = recording_wrappers()
        options = dict(width=scale.size, height=scale.size, steps=args.steps, seed=0, guidance=guidance)
        pipe.generate(PROMPT, **{**options, "steps": 2})  # compiles the kernels

        def run(cache: str | None) -> tuple[Any, float, dict[str, int]]:
            """The image, the denoise seconds and, per cache context (cond, uncond), how many steps skipped."""
            started.clear()
            result = pipe.generate(PROMPT, **options, **({"cache": cache} if cache else {}))
            skipped = {name: len(steps) for name, steps in started[0].skipped().items()} if started else {}
            return result.images[0], result.timings["denoise"], skipped

        ratios = args.workdir / f"{model}-mag-ratios.json"
        run(f"mag:calibrate,ratios={ratios}")  # computes every step; also warms up every 50-step code path
        yield {"what": "mag ratios", "ratios": [round(r, 4) for r in json.loads(ratios.read_text())]}
        plain, plain_s, _ = run(None)
        fields = {"size": f"{scale.size}x{scale.size}", "steps": args.steps, "guidance": guidance}
        yield {**fields, "cache": "off", "denoise_s": round(plain_s, 3)}
        thresholds = args.fbc
        if thresholds is None:  # threshold 0 never skips; the run records each step's change
            run("first-block:0")
            changes = started[0].states["cond"].changes
            thresholds = [float(f"{q:.3g}") for q in np.quantile(changes, [0.25, 0.5, 0.75])]
            yield {"what": "first-block changes", "changes": [round(c, 4) for c in changes], "thresholds": thresholds}
        caches = [f"first-block:{t}" for t in thresholds] + [f"mag:{t},ratios={ratios}" for t in args.mag]
        for cache in caches:
            image, seconds, skipped = run(cache)
            difference = image_difference(image, plain)
            yield {
                **fields,
                "cache": cache.split(",ratios=")[0],
                "denoise_s": round(seconds, 3),
                "speedup": round(plain_s / seconds, 3),
                "steps_skipped": skipped,
                "psnr_db": round(difference["psnr_db"], 2),
                "ssim": round(ssim(image, plain), 4),
            }
        shutil.rmtree(folder, ignore_errors=True)

    return body


def decode_section(args: argparse.Namespace) -> Any:
    def body():
        from imagegen_flux2.vae import AutoencoderKLFlux2, Flux2VAEConfig

        from imagegen.cli.bench import time_mlx

        base = FLUX2_VAE_TINY if args.quick else FLUX2_VAE
        small = [c // 2 for c in base["block_out_channels"]] if args.quick else SMALL_DECODER_CHANNELS
        size = 64 if args.quick else 1024
        z = np.random.default_rng(0).standard_normal((1, base["latent_channels"], size // 8, size // 8))
        times: dict[str, float] = {}
        for name, decoder in (("standard", None), ("small", small)):
            vae = AutoencoderKLFlux2(Flux2VAEConfig.from_dict({**base, "decoder_block_out_channels": decoder}))
            vae.set_dtype(mx.float32 if args.quick else mx.bfloat16)
            mx.eval(vae.parameters())
            latents = mx.array(z.astype(np.float32)).transpose(0, 2, 3, 1).astype(vae.dtype)
            t = time_mlx(partial(vae.decode, latents), 2, args.repeats)
            times[f"imagegen-{name}"] = t.ms
            yield {
                "impl": "imagegen",
                "decoder": name,
                "channels": decoder or base["block_out_channels"],
                "size": f"{size}x{size}",
                **t.record(),
            }
            free_memory()
        torch = need("torch")
        from diffusers import AutoencoderKLFlux2 as Reference

        device = torch_device()
        for name, decoder in (("standard", None), ("small", small)):
            vae = Reference(**{**base, "decoder_block_out_channels": decoder}).eval()
            vae = vae.to(device, torch.float32 if args.quick else torch.bfloat16)
            latents = torch.from_numpy(z.astype(np.float32)).to(device, vae.dtype)
            t = time_torch(partial(vae.decode, latents), 2, args.repeats)
            times[f"diffusers-{name}"] = t.ms
            yield {"impl": "diffusers", "decoder": name, "size": f"{size}x{size}", **t.record()}
            free_memory()
        yield {
            "impl": "ratios",
            "small_over_standard_imagegen": round(times["imagegen-small"] / times["imagegen-standard"], 3),
            "small_over_standard_diffusers": round(times["diffusers-small"] / times["diffusers-standard"], 3),
            "imagegen_over_diffusers_small": round(times["imagegen-small"] / times["diffusers-small"], 3),
        }

    return body


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.quick:
        mx.set_default_device(mx.cpu)
    ensure_imports()
    recorder = Recorder(args.out)
    recorder.emit(header({k: sorted(v) if isinstance(v, set) else v for k, v in vars(args).items()}))
    runner = Runner(recorder, Budget(args.budget_s), args.sections)
    for model in args.models:
        runner.run("cache", model, "imagegen", cache_section(model, args), estimate_s=1 if args.quick else 240)
    runner.run("decode", "flux2-vae", "imagegen+diffusers", decode_section(args), estimate_s=1 if args.quick else 60)
    recorder.emit({"section": "done", "error_count": sum(1 for r in recorder.records if "error" in r)})
    return 0


if __name__ == "__main__":
    sys.exit(main())
