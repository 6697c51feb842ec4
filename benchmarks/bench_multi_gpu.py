"""One image over several GPUs (imagegen.distributed, `imagegen run --gpus N`, `serve --gpus N`): step, VAE decode
and end-to-end time on 1 vs N GPUs, and the image difference between the two, for FLUX.2 Klein built full size with
random weights. One JSON line per measurement.

    python3 benchmarks/bench_multi_gpu.py [--models flux2-klein-9b,flux2-klein-4b] [--sizes 2048,1024] [--gpus 2]
                                          [--sections generate,serve] [--serve-model flux2-klein-4b]
    python3 benchmarks/bench_multi_gpu.py --tiny      # tiny random Klein, local CPU processes: proves the code path

generate: each configuration runs in fresh processes (the N ranks started by imagegen.distributed.launch, as
`--gpus N` does): two warm-up images (kernel compilation), then `--repeats` timed ones; a step is the denoise time
over the steps, `decode` the VAE decode (on N GPUs split in bands of rows, imagegen.nn.row_split: equal to the
unsplit decode within float rounding, tests/test_distributed.py). The same seed and latents on 1 and N GPUs: the
images are compared (PSNR, goal >= 40 dB).
serve: `imagegen serve` and `serve --gpus N` (rank 0 serves, the others mirror it: imagegen.ranks) each answer
two warm-up requests, then `--repeats` sequential ones for one image of the first size (2048x2048 by default) of
`--serve-model`; the client's median latency and the two servers' images are compared.
Every process on CUDA runs with NCCL_NVLS_ENABLE=0 (NVLink multicast off), which the launcher also sets per rank.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_ray import free_port, wait_ready
from common import REPO, Recorder, ensure_imports, header, image_difference, round_floats
from families import FULL, TINY, family, torch_device

GOALS = {2048: {"step": 1.6, "total": 1.5}}  # speed-up goals of the issue, per image side
SECTIONS = ("generate", "serve")
PROMPT = "A lighthouse on a cliff at dusk"


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
    p.add_argument("--sections", default=",".join(SECTIONS), help=f"comma list of {', '.join(SECTIONS)}")
    p.add_argument("--serve-model", default="flux2-klein-4b")
    p.add_argument("--rank-run", type=Path, default=None, help=argparse.SUPPRESS)  # internal: one rank's work
    p.add_argument("--serve-child", type=int, default=None, help=argparse.SUPPRESS)  # internal: a server on PORT
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
        pipe.generate(PROMPT, **options)
    runs = [pipe.generate(PROMPT, **options) for _ in range(job["repeats"])]
    if spread is None or spread.rank == 0:
        timings = {k: statistics.median(r.timings[k] for r in runs) for k in ("encode", "denoise", "decode", "total")}
        runs[-1].images[0].save(job["image"])
        Path(job["result"]).write_text(json.dumps(timings))


def measure(args: argparse.Namespace, model: str, weights: Path, size: int, gpus: int, work: Path) -> dict:
    from imagegen import distributed

    job = work / f"{model}-{size}-{gpus}.json"
    result, image = job.with_suffix(".result"), job.with_suffix(".png")
    job.write_text(
        json.dumps(
            {
                "model": model,
                "weights": str(weights),
                "size": size,
                "steps": args.steps,
                "repeats": args.repeats,
                "result": str(result),
                "image": str(image),
            }
        )
    )
    command = [sys.executable, __file__, "--rank-run", str(job)]
    start = time.perf_counter()
    code = distributed.launch(command, gpus) if gpus > 1 else os.spawnv(os.P_WAIT, sys.executable, command)
    if code:
        raise RuntimeError(f"{model} {size}px on {gpus} GPU(s) failed with exit code {code}")
    timings = json.loads(result.read_text())
    return {**timings, "step": timings["denoise"] / args.steps, "wall_s": time.perf_counter() - start, "image": image}


# ---- serve --------------------------------------------------------------------------------------------
def serve_child(args: argparse.Namespace) -> None:
    """A server on --serve-child PORT over --gpus ranks, as `imagegen serve [--gpus N]` runs one (through this
    script, so that the in-tree plugins register without an install)."""
    ensure_imports()
    from imagegen import distributed, ranks
    from imagegen.server import run_server

    if args.gpus > 1 and distributed.WORLD_ENV not in os.environ:
        sys.exit(distributed.launch([sys.executable, __file__, *sys.argv[1:]], args.gpus))
    if args.gpus > 1 and ranks.rank() != 0:
        return ranks.follow()
    with ranks.lead(args.gpus) if args.gpus > 1 else contextlib.nullcontext():
        run_server(port=args.serve_child, models=[args.serve_model], keep_alive="forever", log_level="warning")


def time_serve(args: argparse.Namespace, size: int, gpus: int, work: Path) -> dict:
    """Start a server on `gpus` GPUs, time sequential requests from a client, stop it (SIGTERM, as a user)."""
    import urllib.request  # the standard library's client: the GPU machine need not carry another one

    port = free_port()
    command = [
        sys.executable,
        __file__,
        "--serve-child",
        str(port),
        "--gpus",
        str(gpus),
        "--serve-model",
        args.serve_model,
    ]
    server = subprocess.Popen(command)
    body = {"model": args.serve_model, "prompt": PROMPT, "size": f"{size}x{size}", "seed": 7, "steps": args.steps}
    try:
        url = f"http://127.0.0.1:{port}"
        wait_ready(url)

        def request() -> tuple[float, bytes]:
            start = time.perf_counter()
            post = urllib.request.Request(
                f"{url}/v1/images/generations",
                data=json.dumps(body).encode(),
                headers={"Content-Type": "application/json"},
            )
            with urllib.request.urlopen(post, timeout=1800) as answer:  # raises on an HTTP error status
                data = json.loads(answer.read())
            return time.perf_counter() - start, base64.b64decode(data["data"][0]["b64_json"])

        for _ in range(2):  # warm-up: the load, kernel compilation
            request()
        runs = [request() for _ in range(args.repeats)]
    finally:
        server.terminate()
        server.wait(300)
    image = work / f"serve-{size}-{gpus}.png"
    image.write_bytes(runs[-1][1])
    return {"latency_s": statistics.median(t for t, _ in runs), "image": image}


def serve_section(args: argparse.Namespace, recorder: Recorder, work: Path) -> None:
    from PIL import Image

    size = args.sizes[0]
    one = time_serve(args, size, 1, work)
    many = time_serve(args, size, args.gpus, work)
    difference = image_difference(Image.open(many.pop("image")), Image.open(one.pop("image")))
    recorder.emit(
        round_floats(
            {
                "section": "serve",
                "model": args.serve_model,
                "size": size,
                "steps": args.steps,
                "gpus": args.gpus,
                "one": one,
                "many": many,
                "speedup": one["latency_s"] / many["latency_s"],
                **difference,
                "image_goal_met": bool(difference["psnr_db"] >= 40),
            }
        )
    )


# ---- the run ------------------------------------------------------------------------------------------
def write_weights(model: str, tiny: bool, work: Path) -> Path:
    """A random checkpoint, also in a private Hugging Face cache ($HF_HUB_CACHE) so a server finds it by id."""
    from imagegen import registry

    weights = work / model
    if not (weights / "model_index.json").exists():
        family(model, TINY if tiny else FULL).write_folder(weights, torch_device())
    repo = work / "hub" / f"models--{registry.get(model).hf_repo.replace('/', '--')}"
    if not (repo / "snapshots" / "bench").exists():
        (repo / "snapshots").mkdir(parents=True, exist_ok=True)
        (repo / "refs").mkdir(exist_ok=True)
        (repo / "snapshots" / "bench").symlink_to(weights.resolve())
        (repo / "refs" / "main").write_text("bench")
    os.environ["HF_HUB_CACHE"] = str(work / "hub")
    return weights


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.rank_run is not None:
        return rank_run(args)
    if args.serve_child is not None:
        return serve_child(args)
    ensure_imports()
    os.environ["NCCL_NVLS_ENABLE"] = "0"  # NVLink multicast off in every rank (shared hosts)
    paths = [str(REPO), str(REPO / "plugins" / "imagegen-flux2"), str(REPO / "plugins" / "imagegen-zimage")]
    os.environ["PYTHONPATH"] = os.pathsep.join([*paths, os.environ.get("PYTHONPATH", "")])
    recorder = Recorder(args.out)
    recorder.emit(header({k: str(v) for k, v in vars(args).items()}))
    work = args.work or Path(tempfile.mkdtemp(prefix="bench-multi-gpu-"))
    sections = set(args.sections.split(","))
    if "serve" in sections:
        write_weights(args.serve_model, args.tiny, work)
        serve_section(args, recorder, work)
    for model in args.models.split(",") if "generate" in sections else ():
        weights = write_weights(model, args.tiny, work)
        for size in args.sizes:
            one = measure(args, model, weights, size, 1, work)
            many = measure(args, model, weights, size, args.gpus, work)
            from PIL import Image

            difference = image_difference(Image.open(many.pop("image")), Image.open(one.pop("image")))
            record = {
                "section": "multi-gpu",
                "model": model,
                "size": size,
                "steps": args.steps,
                "gpus": args.gpus,
                "one": one,
                "many": many,
                "speedup_step": one["step"] / many["step"],
                "speedup_decode": one["decode"] / many["decode"],
                "speedup_total": one["total"] / many["total"],
                **difference,
                "image_goal_met": bool(difference["psnr_db"] >= 40),
            }
            goal = GOALS.get(size)
            if goal and not args.tiny:
                record["goal"] = goal
                record["goal_met"] = bool(
                    record["speedup_step"] >= goal["step"] and record["speedup_total"] >= goal["total"]
                )
            recorder.emit(round_floats(record))


if __name__ == "__main__":
    main()
