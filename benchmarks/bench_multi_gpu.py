"""One image over several GPUs (imagegen.distributed, `imagegen run --gpus N`): step and end-to-end time on 1 vs N
GPUs, and the image difference between the two, for FLUX.2 Klein built full size with random weights. One JSON
line per measurement.

    python3 benchmarks/bench_multi_gpu.py [--models flux2-klein-9b,flux2-klein-4b] [--sizes 2048,1024] [--gpus 2]
    python3 benchmarks/bench_multi_gpu.py --tiny      # tiny random Klein, local CPU processes: proves the code path

Each configuration runs in fresh processes (the N ranks started by imagegen.distributed.launch, as `--gpus N`
does): two warm-up images (kernel compilation), then `--repeats` timed ones; a step is the denoise time over the
steps. The same seed and latents on 1 and N GPUs: the images are compared (PSNR, goal >= 40 dB).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from common import REPO, Recorder, ensure_imports, header, image_difference, round_floats
from families import FULL, TINY, family, torch_device

GOALS = {2048: {"step": 1.6, "total": 1.5}}  # speed-up goals of the issue, per image side


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="flux2-klein-9b,flux2-klein-4b")
    p.add_argument("--sizes", default=None, help="image sides (default 2048,1024; --tiny: 32)")
    p.add_argument("--gpus", type=int, default=2)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--work", type=Path, default=None)
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--rank-run", type=Path, default=None, help=argparse.SUPPRESS)  # internal: one rank's work
    args = p.parse_args(argv)
    args.sizes = [int(s) for s in (args.sizes or ("32" if args.tiny else "2048,1024")).split(",")]
    return args


def rank_run(args: argparse.Namespace) -> None:
    """In each rank: load, warm up, time; rank 0 writes the timings and the last image."""
    ensure_imports()
    import imagegen

    job = json.loads(args.rank_run.read_text())
    pipe = imagegen.registry.get(job["model"]).pipeline(weights=job["weights"])
    spread = pipe.transformer.sequence_parallel
    options = dict(width=job["size"], height=job["size"], steps=job["steps"], seed=7)
    for _ in range(2):
        pipe.generate("A lighthouse on a cliff at dusk", **options)
    runs = [pipe.generate("A lighthouse on a cliff at dusk", **options) for _ in range(job["repeats"])]
    if spread is None or spread.rank == 0:
        timings = {k: statistics.median(r.timings[k] for r in runs) for k in ("encode", "denoise", "decode", "total")}
        runs[-1].images[0].save(job["image"])
        Path(job["result"]).write_text(json.dumps(timings))


def measure(args: argparse.Namespace, model: str, weights: Path, size: int, gpus: int, work: Path) -> dict:
    from imagegen import distributed

    job = work / f"{model}-{size}-{gpus}.json"
    result, image = job.with_suffix(".result"), job.with_suffix(".png")
    job.write_text(json.dumps({"model": model, "weights": str(weights), "size": size, "steps": args.steps,
                               "repeats": args.repeats, "result": str(result), "image": str(image)}))
    command = [sys.executable, __file__, "--rank-run", str(job)]
    start = time.perf_counter()
    code = distributed.launch(command, gpus) if gpus > 1 else os.spawnv(os.P_WAIT, sys.executable, command)
    if code:
        raise RuntimeError(f"{model} {size}px on {gpus} GPU(s) failed with exit code {code}")
    timings = json.loads(result.read_text())
    return {**timings, "step": timings["denoise"] / args.steps, "wall_s": time.perf_counter() - start,
            "image": image}


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.rank_run is not None:
        return rank_run(args)
    ensure_imports()
    os.environ["NCCL_NVLS_ENABLE"] = "0"  # NVLink multicast off in every rank (shared hosts)
    paths = [str(REPO), str(REPO / "plugins" / "imagegen-flux2"), str(REPO / "plugins" / "imagegen-zimage")]
    os.environ["PYTHONPATH"] = os.pathsep.join([*paths, os.environ.get("PYTHONPATH", "")])
    recorder = Recorder(args.out)
    recorder.emit(header({k: str(v) for k, v in vars(args).items()}))
    work = args.work or Path(tempfile.mkdtemp(prefix="bench-multi-gpu-"))
    for model in args.models.split(","):
        weights = work / model
        if not (weights / "model_index.json").exists():
            family(model, TINY if args.tiny else FULL).write_folder(weights, torch_device())
        for size in args.sizes:
            one = measure(args, model, weights, size, 1, work)
            many = measure(args, model, weights, size, args.gpus, work)
            from PIL import Image

            difference = image_difference(Image.open(many.pop("image")), Image.open(one.pop("image")))
            record = {"section": "multi-gpu", "model": model, "size": size, "steps": args.steps, "gpus": args.gpus,
                      "one": one, "many": many, "speedup_step": one["step"] / many["step"],
                      "speedup_total": one["total"] / many["total"], **difference,
                      "image_goal_met": bool(difference["psnr_db"] >= 40)}
            goal = GOALS.get(size)
            if goal and not args.tiny:
                record["goal"] = goal
                record["goal_met"] = bool(record["speedup_step"] >= goal["step"]
                                          and record["speedup_total"] >= goal["total"])
            recorder.emit(round_floats(record))


if __name__ == "__main__":
    main()
