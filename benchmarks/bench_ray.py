"""Ray's overhead per image, on one GPU: `imagegen batch` in one process vs on Ray (one worker), and
`imagegen serve` vs `imagegen serve --ray` (one replica), on FLUX.2 Klein 4B built full size with random
weights; with `--scale 1,2,...` (default: every GPU count when there are several), images/s as Ray
workers and replicas grow, in the same run. One JSON line per measurement.

    python3 benchmarks/bench_ray.py [--model flux2-klein-4b] [--size 1024] [--steps 4] [--images 16] [--out F]
    python3 benchmarks/bench_ray.py --tiny      # a tiny random Klein on the CPU: proves the code paths

What is timed: a batch's steady rate counts the rows finished after its first two (which load the model
and compile), so model loading and Ray's start-up are left out (`first_row_s` and `wall_s` report them);
a server is timed from the client (the openai client), after two warm-up requests per replica, as the
median latency of sequential requests and as images/s with p50/p95 latency under 8 concurrent clients. Every path
draws the same seeded images from the same random checkpoint, which sits in a private Hugging Face cache
($HF_HUB_CACHE) so servers and Ray workers find it by model id alone.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from common import REPO, Budget, Recorder, Runner, ensure_imports, free_memory, header, round_floats
from families import FULL, TINY, family, torch_device

PLUGIN_PATHS = (REPO, REPO / "plugins" / "imagegen-flux2", REPO / "plugins" / "imagegen-zimage")
SECTIONS = ("batch", "serve", "scaling")
WARMUP_ROWS = 2  # a batch's first rows load the model and compile: left out of its steady rate
PROMPT = "A lighthouse on a cliff at dusk, waves breaking below, warm light in the windows; photo {i}."


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default="flux2-klein-4b", help="flux2-klein-4b, flux2-klein-9b or zimage-turbo")
    p.add_argument("--size", type=int, default=None, help="image side in pixels (default 1024; --tiny: 32)")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument(
        "--images", type=int, default=None, help="images per measurement, at least 4 (default 16; --tiny: 6)"
    )
    p.add_argument("--sections", default=",".join(SECTIONS), help=f"comma list of {', '.join(SECTIONS)}")
    p.add_argument(
        "--scale",
        default=None,
        help="worker / replica counts for 'scaling', e.g. 1,2 (default: 1..GPUs "
        "when there are several GPUs; --tiny: 1,2 on the CPU)",
    )
    p.add_argument("--clients", type=int, default=8, help="concurrent clients against a server (default 8)")
    p.add_argument("--tiny", action="store_true", help="tiny random weights on the CPU (a smoke test, not a timing)")
    p.add_argument("--budget-s", type=float, default=None, help="seconds for the whole run; later sections skip")
    p.add_argument("--work", type=Path, default=None, help="folder for weights and images (default: a temp folder)")
    p.add_argument("--out", type=Path, default=None, help="also append the JSON lines to this file")
    p.add_argument("--child-serve", type=int, default=None, help=argparse.SUPPRESS)  # internal: plain serve on PORT
    args = p.parse_args(argv)
    args.size = args.size or (TINY.size if args.tiny else FULL.size)
    args.images = max(4, args.images or (6 if args.tiny else 16))
    return args


# ---- weights: a random checkpoint where imagegen looks for the model's Hugging Face repo ----------------
def write_weights(args: argparse.Namespace, work: Path) -> float:
    """Write the checkpoint into a private HF cache and point $HF_HUB_CACHE at it; seconds taken."""
    from imagegen import registry

    start = time.perf_counter()
    repo = registry.get(args.model).hf_repo
    cache = work / "hub"
    snapshot = cache / f"models--{repo.replace('/', '--')}" / "snapshots" / "bench"
    if not (snapshot / "model_index.json").exists():
        family(args.model, TINY if args.tiny else FULL).write_folder(snapshot, torch_device())
        (snapshot.parent.parent / "refs").mkdir(exist_ok=True)
        (snapshot.parent.parent / "refs" / "main").write_text("bench")
    os.environ["HF_HUB_CACHE"] = str(cache)
    free_memory()
    return time.perf_counter() - start


def child_env() -> dict[str, str]:
    """Environment for processes this run starts (plain serve, Ray workers): the source tree importable."""
    paths = [str(p) for p in PLUGIN_PATHS] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    # NVLink multicast stays off in every process on shared multi-GPU hosts (the device machines' rule)
    return {**os.environ, "PYTHONPATH": os.pathsep.join(dict.fromkeys(paths)), "NCCL_NVLS_ENABLE": "0"}


# ---- batch ----------------------------------------------------------------------------------------------
class Clock:
    """A batch reporter that notes when each row finished."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self.seconds: list[float] = []

    def start(self, total: int, skipped: int, workers: int) -> None:
        self.t0 = time.perf_counter()

    def row(self, record: dict[str, Any]) -> None:
        if "error" in record:
            raise RuntimeError(f"row {record['id']} failed: {record['error']}")
        self.times.append(time.perf_counter())
        self.seconds.append(record["seconds"])

    def note(self, text: str) -> None:
        print(f"# {text}", file=sys.stderr)


def prompts_file(args: argparse.Namespace, work: Path) -> Path:
    import json

    path = work / "prompts.jsonl"
    path.write_text(
        "".join(
            json.dumps({"id": f"b{i:03d}", "prompt": PROMPT.format(i=i), "seed": i}) + "\n" for i in range(args.images)
        )
    )
    return path


def time_batch(args: argparse.Namespace, work: Path, ray: str | None, workers: int | None = None) -> dict[str, Any]:
    from imagegen.batch import Defaults, run_batch

    out = work / f"batch-{'ray' if ray else 'local'}-{workers or 1}"
    shutil.rmtree(out, ignore_errors=True)
    clock = Clock()
    summary = run_batch(
        prompts_file(args, work),
        out,
        Defaults(model=args.model, width=args.size, height=args.size, steps=args.steps),
        ray=ray,
        workers=workers,
        reporter=clock,
    )
    warm = WARMUP_ROWS - 1  # the rate counts from the end of the last warm-up row
    steady = (len(clock.times) - 1 - warm) / (clock.times[-1] - clock.times[warm])
    generate = statistics.median(clock.seconds[WARMUP_ROWS:])
    return {
        "images": summary.done,
        "workers": summary.workers,
        "images_per_s": steady,
        "s_per_image": 1 / steady,
        "generate_s": generate,
        "outside_generate_s": 1 / steady - generate / summary.workers,
        "first_row_s": clock.times[0] - clock.t0,
        "wall_s": summary.seconds,
    }


# ---- serve ----------------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(base: str, timeout: float = 900) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{base}/health", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise TimeoutError(f"no server at {base} after {timeout} s")


def time_server(args: argparse.Namespace, base: str, replicas: int = 1) -> dict[str, Any]:
    """Median latency of sequential requests, then images/s and p50/p95 latency under `--clients` concurrent
    clients (the openai client, one per thread), as users would drive the server."""
    import openai

    def request(i: int) -> float:
        client = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=600)
        start = time.perf_counter()
        result = client.images.generate(
            model=args.model,
            prompt=PROMPT.format(i=i),
            size=f"{args.size}x{args.size}",
            extra_body={"seed": i, "steps": args.steps},
        )
        if not result.data or not result.data[0].b64_json:
            raise RuntimeError(f"request {i}: no image in the answer")
        return time.perf_counter() - start

    for i in range(2 * replicas):  # warm-up: loads, compiles, first allocations on every replica
        request(i)
    sequential = [request(i) for i in range(max(3, args.images // 4))] if replicas == 1 else []
    start = time.perf_counter()
    with ThreadPoolExecutor(args.clients) as pool:
        latencies = sorted(pool.map(request, range(args.images)))
    wall = time.perf_counter() - start
    record = {
        "images": args.images,
        "replicas": replicas,
        "clients": args.clients,
        "images_per_s": args.images / wall,
        "s_per_image": wall / args.images,
        "p50_s": statistics.median(latencies),
        "p95_s": latencies[min(len(latencies) - 1, round(0.95 * (len(latencies) - 1)))],
    }
    if sequential:
        record["latency_s"] = statistics.median(sequential)
    return record


def plain_server(args: argparse.Namespace) -> tuple[subprocess.Popen, str]:
    port = free_port()
    child = subprocess.Popen(
        [sys.executable, __file__, "--child-serve", str(port), "--model", args.model], env=child_env()
    )
    base = f"http://127.0.0.1:{port}"
    wait_ready(base)
    return child, base


def run_child_server(args: argparse.Namespace) -> None:
    ensure_imports()
    from imagegen.server import run_server

    run_server(port=args.child_serve, models=[args.model], keep_alive="forever", log_level="warning")


def ray_server(args: argparse.Namespace, replicas: int) -> str:
    from ray import serve

    from imagegen.scaleout.serve import APP_NAME, build_app

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app([args.model], keep_alive="forever", replicas=replicas), name=APP_NAME, route_prefix="/")
    return f"http://127.0.0.1:{port}"


def stop_ray_server() -> None:
    from ray import serve

    from imagegen.scaleout.serve import shutdown

    shutdown(False)
    serve.shutdown()


# ---- the run --------------------------------------------------------------------------------------------
def overhead(ray: dict[str, Any], plain: dict[str, Any], key: str = "s_per_image") -> dict[str, Any]:
    return {
        "ray_s": ray[key],
        "plain_s": plain[key],
        "overhead_s": ray[key] - plain[key],
        "overhead_pct": 100 * (ray[key] / plain[key] - 1),
        "goal_pct": 5.0,
    }


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.child_serve is not None:
        return run_child_server(args)
    ensure_imports()
    import ray

    sections = set(args.sections.split(","))
    recorder = Recorder(args.out)
    runner = Runner(recorder, Budget(args.budget_s), sections)
    work = args.work or Path(tempfile.mkdtemp(prefix="bench-ray-"))
    work.mkdir(parents=True, exist_ok=True)
    recorder.emit({**header({k: str(v) for k, v in vars(args).items()}), "ray": ray.__version__})
    recorder.emit({"section": "setup", "model": args.model, "weights_s": round(write_weights(args, work), 1)})
    os.environ.update(child_env())  # Ray workers start from this environment (a local cluster)
    base = {"size": args.size, "steps": args.steps}
    plain: dict[str, dict[str, Any]] = {}

    def emit(record: dict[str, Any]) -> dict[str, Any]:
        return round_floats({**base, **record})

    def batch_local():
        plain["batch"] = time_batch(args, work, None)
        free_memory()  # the driver's pipeline goes before the Ray worker loads its own on the same device
        yield emit(plain["batch"])

    def serve_plain():
        child, url = plain_server(args)
        try:
            plain["serve"] = time_server(args, url)
        finally:
            child.send_signal(signal.SIGINT)
            child.wait(60)
        yield emit(plain["serve"])

    runner.run("batch", args.model, "local", batch_local)
    runner.run("serve", args.model, "plain", serve_plain)
    ray.init(include_dashboard=False, log_to_driver=False, configure_logging=False)
    gpus = int(ray.cluster_resources().get("GPU", 0))
    recorder.emit(
        {
            "section": "cluster",
            "resources": {k: v for k, v in ray.cluster_resources().items() if k in ("CPU", "GPU", "memory")},
        }
    )
    counts = (
        [int(c) for c in args.scale.split(",")]
        if args.scale
        else ([1, 2] if args.tiny else list(range(1, gpus + 1)) if gpus > 1 else [])
    )
    if args.tiny and not gpus:
        counts = [c for c in counts if c <= int(ray.cluster_resources().get("CPU", 1))]

    def batch_ray():
        record = time_batch(args, work, "local", workers=1)
        yield emit(record)
        if "batch" in plain:
            yield emit({"measure": "overhead", **overhead(record, plain["batch"])})

    def serve_ray():
        url = ray_server(args, 1)
        try:
            record = time_server(args, url)
        finally:
            stop_ray_server()
        yield emit(record)
        if "serve" in plain:
            yield emit({"measure": "overhead", **overhead(record, plain["serve"])})
            yield emit({"measure": "latency overhead", **overhead(record, plain["serve"], "latency_s")})

    def scaling():
        first: dict[str, float] = {}
        for count in counts:
            record = time_batch(args, work, "local", workers=count)
            first.setdefault("batch", record["images_per_s"])
            yield emit({"path": "batch", **record, "speedup": record["images_per_s"] / first["batch"]})
        for count in counts:
            url = ray_server(args, count)
            try:
                record = time_server(args, url, count)
            finally:
                stop_ray_server()
            first.setdefault("serve", record["images_per_s"])
            yield emit({"path": "serve", **record, "speedup": record["images_per_s"] / first["serve"]})

    runner.run("batch", args.model, "ray", batch_ray)
    runner.run("serve", args.model, "ray", serve_ray)
    if counts:
        runner.run("scaling", args.model, "ray", scaling, gpus=gpus)
    else:
        recorder.emit({"section": "scaling", "skipped": f"{gpus} GPU(s): scaling needs several (or --scale)"})
    ray.shutdown()
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
