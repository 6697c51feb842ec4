"""Where a pipeline's end-to-end time goes: each stage (prompt encode, the denoise loop, the VAE decode, the images
made host-ready) timed on the wall clock and on the GPU (every CUDA kernel, through torch.profiler's CUPTI tracer
as in profile_step.py). A stage whose wall time is far above its kernels' time waits on the host (graph building,
launches, synchronisation), not on the GPU.

    python3 benchmarks/profile_pipeline.py FOLDER [--model flux2-klein-4b] [--size 1024] [--out x.jsonl]

FOLDER: a diffusers-layout checkpoint of the model (bench_generate.py --keep leaves one, random weights)."""

from __future__ import annotations

import argparse
from collections import defaultdict
from pathlib import Path
from typing import Any
from unittest.mock import patch

import mlx.core as mx
from common import Recorder, ensure_imports, header
from profile_step import group, kernel_events

from imagegen.cli.bench import clear_prompt_cache, evaluate, time_mlx

PROMPT = "a red fox sitting in fresh snow at dawn, telephoto, soft golden light, detailed fur"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("folder", type=Path)
    p.add_argument("--model", default="flux2-klein-4b")
    p.add_argument("--size", type=int, default=1024)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", type=Path, default=None)
    return p.parse_args(argv)


def kernels(fn) -> dict[str, Any]:
    """GPU time of one evaluated call of fn, by kernel group, with the kernel count."""
    events = kernel_events(fn, 1)
    totals: dict[str, float] = defaultdict(float)
    groups: dict[str, float] = defaultdict(float)
    for name, us in events:
        totals[name] += us
        groups[group(name)] += us
    top = sorted(totals.items(), key=lambda kv: -kv[1])[:12]
    return {
        "gpu_ms": round(sum(totals.values()) / 1e3, 3),
        "kernels": len(events),
        "by_group_ms": {g: round(v / 1e3, 3) for g, v in sorted(groups.items(), key=lambda kv: -kv[1])},
        "top_ms": [[n[:100], round(v / 1e3, 3)] for n, v in top],
    }


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    ensure_imports()
    from imagegen import registry
    from imagegen.image import to_pil
    from imagegen.text import qwen3

    recorder = Recorder(args.out)
    recorder.emit(header({**vars(args), "folder": str(args.folder), "out": str(args.out)}))
    pipe = registry.get(args.model).pipeline(weights=args.folder, dtype="bfloat16")
    size, r = args.size, args.repeats
    request = pipe.request(PROMPT, width=size, height=size, seed=0)
    for _ in range(2):  # warm: kernels built, blocks traced
        pipe.generate(request)

    def encode():
        clear_prompt_cache(pipe)
        return pipe.encode(request)

    conditioning = evaluate(encode())

    def denoise():
        latents = None
        for latents in pipe.denoise_steps(request, conditioning, pipe.prepare_latents(request)):
            mx.eval(latents)
        return latents

    latents = denoise()
    vae_latents = pipe.vae_latents(request, latents).astype(pipe.vae.dtype)
    image = evaluate(pipe.vae.decode_latents(vae_latents))

    def host_images():  # the decoded image's bytes to PIL
        return to_pil(image)

    def generate():  # the whole run, the prompt encoded again
        clear_prompt_cache(pipe)
        return pipe.generate(request).images

    lengths = iter(range(1, 1000))

    def encode_new_length():  # a prompt of a length not seen before (a server's usual case): new attention shapes
        clear_prompt_cache(pipe)
        return pipe.encode(pipe.request(PROMPT + " and" * next(lengths), width=size, height=size, seed=0))

    def plain_boolean_mask(q, k, v, mask=None, scale=None):  # imagegen.nn.attention before: MLX expands the mask
        return mx.fast.scaled_dot_product_attention(q, k, v, scale=q.shape[-1] ** -0.5, mask=mask)

    def encode_boolean_mask():
        with patch.object(qwen3, "attention", plain_boolean_mask):
            return encode()

    stages = {
        "encode": encode,
        "denoise": denoise,
        "vae_decode": lambda: pipe.vae.decode_latents(vae_latents),
        "host_images": host_images,
        "pipeline_decode": lambda: pipe.decode(request, latents),
        "generate": generate,
        "encode_new_length": encode_new_length,
        "encode_boolean_mask": encode_boolean_mask,
    }
    for name, fn in stages.items():
        record = {"section": "stage", "model": args.model, "size": size, "stage": name, **time_mlx(fn, 1, r).record()}
        try:
            record.update(kernels(fn))
        except Exception as e:  # noqa: BLE001 - no CUDA or no CUPTI: the wall times still stand
            record["kernels"] = f"unavailable: {type(e).__name__}: {e}"[:200]
        recorder.emit(record)
    clear_prompt_cache(pipe)
    timings = pipe.generate(request).timings
    recorder.emit({"section": "generate_timings", "ms": {k: round(v * 1e3, 2) for k, v in timings.items()}})


if __name__ == "__main__":
    main()
