"""FLUX.2 Klein 9B-KV editing in one run: imagegen's KV pipeline (reference K/V computed once, kept across
requests) vs imagegen's plain Klein 9B editing vs diffusers' Flux2KleinKVPipeline, with 1 and 2 reference images,
on Klein 9B built full size with random weights (the KV folder is the same weights saved under the KV pipeline's
class). One JSON line per measurement.

    python3 benchmarks/bench_kv.py [--size 1024] [--steps 4] [--out F]
    python3 benchmarks/bench_kv.py --tiny      # tiny random Klein on the CPU: proves the code paths

Step: the median of the steps after the first (diffusers' first step also runs the reference tokens). Request:
generate() end to end for a first request with new references and a second one with the same references.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from common import Recorder, ensure_imports, free_memory, header, round_floats
from families import FULL, TINY, family, torch_device

MODEL = "flux2-klein-9b"
PROMPT = "Turn the scene into a winter evening, snow on every roof, warm light in the windows."


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", type=int, default=None, help="image and reference side (default 1024; --tiny: 64)")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--work", type=Path, default=None)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    args.size = args.size or (64 if args.tiny else FULL.size)
    return args


def write_folders(args: argparse.Namespace, work: Path) -> tuple[Path, Path]:
    """The plain Klein 9B folder and a KV folder over the same component folders."""
    plain, kv = work / "klein-9b", work / "klein-9b-kv"
    family(MODEL, TINY if args.tiny else FULL).write_folder(plain, torch_device())
    kv.mkdir()
    for part in plain.iterdir():
        if part.name != "model_index.json":
            (kv / part.name).symlink_to(part)
    index = json.loads((plain / "model_index.json").read_text())
    index["_class_name"] = "Flux2KleinKVPipeline"
    index.pop("is_distilled", None)
    (kv / "model_index.json").write_text(json.dumps(index))
    return plain, kv


def references(size: int, count: int, seed: int = 0) -> list:
    from PIL import Image

    rng = np.random.default_rng([count, seed])
    return [Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)) for _ in range(count)]


def step_times(marks: list[float]) -> dict[str, float]:
    steps = np.diff(marks) * 1e3
    return {"first_step_ms": float(steps[0]), "step_ms": float(statistics.median(steps[1:]))}


def time_imagegen(args: argparse.Namespace, model: str, folder: Path, refs: int) -> dict[str, Any]:
    import imagegen

    pipe = imagegen.registry.get(model).pipeline(weights=folder)
    images = references(args.size, refs)
    options = dict(images=images, width=args.size, height=args.size, steps=args.steps, seed=1)
    for seed in (1, 2):  # warm-up with other pictures: kernels compile
        pipe.generate(PROMPT, **{**options, "images": references(args.size, refs, seed)})
    if hasattr(pipe, "reference_cache"):
        pipe.reference_cache.clear()
    free_memory()
    record: dict[str, Any] = {}
    for label in ("first_request", "second_request"):  # new references, then the same again
        marks: list[float] = []
        start = time.perf_counter()
        result = pipe.generate(
            PROMPT,
            on_step=lambda s, marks=marks: marks.append(time.perf_counter()) if s.stage != "decode" else None,
            **options,
        )
        record[f"{label}_ms"] = (time.perf_counter() - start) * 1e3
        record[f"{label}_encode_ms"] = result.timings["encode"] * 1e3
    runs = []
    for _ in range(args.repeats):
        marks = []
        pipe.generate(
            PROMPT,
            on_step=lambda s, marks=marks: marks.append(time.perf_counter()) if s.stage != "decode" else None,
            **options,
        )
        runs.append(step_times(marks))  # marks[0]: the end of encode
    record["first_step_ms"] = statistics.median(r["first_step_ms"] for r in runs)
    record["step_ms"] = statistics.median(r["step_ms"] for r in runs)
    del pipe
    free_memory()
    return record


def time_diffusers(args: argparse.Namespace, folder: Path, refs: int) -> dict[str, Any]:
    import torch
    from diffusers import Flux2KleinKVPipeline

    device = torch_device()
    pipe = Flux2KleinKVPipeline.from_pretrained(folder, torch_dtype=torch.bfloat16).to(device)
    pipe.set_progress_bar_config(disable=True)
    images = references(args.size, refs)

    def run() -> tuple[float, list[float], Any]:
        marks = [time.perf_counter()]

        def mark(_pipe, _i, _t, kwargs):
            if device == "cuda":
                torch.cuda.synchronize()
            marks.append(time.perf_counter())
            return kwargs

        with torch.no_grad():
            out = pipe(
                image=images,
                prompt=PROMPT,
                height=args.size,
                width=args.size,
                num_inference_steps=args.steps,
                generator=torch.Generator("cpu").manual_seed(1),
                callback_on_step_end=mark,
            )
        return (marks[-1] - marks[0]) * 1e3, marks[1:], out.images[0]

    for _ in range(2):
        run()
    runs = [run() for _ in range(args.repeats)]
    record = {
        "request_ms": statistics.median(r[0] for r in runs),
        **step_times(runs[-1][1]),
        "step_ms": statistics.median(step_times(r[1])["step_ms"] for r in runs),
    }
    pipe.to("cpu")  # its GPU memory goes back before the next pipeline loads
    pipe = None  # `run` closes over it: drop the reference so the model can be freed
    free_memory()
    return record


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    ensure_imports()
    recorder = Recorder(args.out)
    recorder.emit(header({k: str(v) for k, v in vars(args).items()}))
    work = args.work or Path(tempfile.mkdtemp(prefix="bench-kv-"))
    plain, kv = write_folders(args, work)
    free_memory()  # torch's cached blocks from writing the checkpoint
    for refs in (1, 2):
        ours = time_imagegen(args, "flux2-klein-9b-kv", kv, refs)
        editing = time_imagegen(args, MODEL, plain, refs)
        theirs = time_diffusers(args, kv, refs)
        recorder.emit(
            round_floats(
                {
                    "section": "kv",
                    "model": "flux2-klein-9b-kv",
                    "size": args.size,
                    "refs": refs,
                    "steps": args.steps,
                    "imagegen_kv": ours,
                    "imagegen_plain_editing": editing,
                    "diffusers_kv": theirs,
                    "step_vs_plain_editing": ours["step_ms"] / editing["step_ms"],
                    "step_vs_diffusers_kv": ours["step_ms"] / theirs["step_ms"],
                    "second_request_vs_first": ours["second_request_ms"] / ours["first_request_ms"],
                }
            )
        )
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
