"""Throughput of `imagegen batch` in one process: images/s with the PNG writer thread on and off, against the end
to end of one image; and images/s when one generate call draws 1, 2 or 4 images.

    python3 benchmarks/bench_throughput.py [--model flux2-klein-4b] [--reuse] [--out throughput.jsonl]
    python3 benchmarks/bench_throughput.py --tiny       # tiny model on the CPU: proves the code paths

The random checkpoint is the one bench_generate.py writes (`--reuse` takes it from --workdir, else it is written).
Goal (issue 22, goal 4): batch images/s >= 0.95 / (end to end of one image)."""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import mlx.core as mx
from common import free_memory, start_run

PROMPTS = (
    "A red fox in fresh snow at dawn",
    "A lighthouse on a rocky coast at dusk",
    "A bowl of ramen, steam rising",
    "An old library with tall shelves and a ladder",
    "A hot air balloon over green hills",
    "A cat asleep on a sunny windowsill",
    "A city street in the rain at night, neon signs",
    "A sailing boat on a calm lake at sunrise",
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="flux2-klein-4b")
    p.add_argument(
        "--rows", type=int, default=32, help="rows per batch run (the last row's PNG overlaps nothing: a long run)"
    )
    p.add_argument("--batches", default="1,2,4", help="images per generate call")
    p.add_argument("--workdir", type=Path, default=Path("/tmp/imagegen-bench"))
    p.add_argument("--reuse", action="store_true")
    p.add_argument("--keep", action="store_true")
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--tiny", action="store_true")
    args = p.parse_args(argv)
    args.batches = [int(b) for b in args.batches.split(",") if b.strip()]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    recorder = start_run(args)
    from families import FULL, TINY, family

    from imagegen import registry
    from imagegen.batch import LoadOptions, Outputs, Row, RowRunner, Summary, run_local

    folder = args.workdir / args.model
    if not (args.reuse and (folder / "model_index.json").is_file()):
        fam = family(args.model, TINY if args.tiny else FULL)
        fam.write_folder(folder, "cpu" if args.tiny else "cuda")
    size = 32 if args.tiny else 1024
    try:
        spec = registry.get(args.model)
        pipe = spec.pipeline(weights=folder, dtype="bfloat16")
        steps = 2 if args.tiny else spec.default_steps
        options = {"width": size, "height": size, "steps": steps}

        runs = []  # end to end of one image, warm, new prompt each time (no prompt cache)
        for i in range(1 + 3):
            start = time.perf_counter()
            pipe.generate(PROMPTS[i % len(PROMPTS)] + f" #{i}", seed=i, **options)
            runs.append(time.perf_counter() - start)
        one = statistics.median(runs[1:])
        recorder.emit(
            {
                "section": "throughput",
                "what": "one image end to end",
                "s": round(one, 4),
                "images_per_s": round(1 / one, 3),
                "size": f"{size}x{size}",
                "steps": steps,
            }
        )

        runner = RowRunner(LoadOptions(weights=str(folder), dtype="bfloat16"))
        runner.pipe, runner.model = pipe, spec.id
        rates = {}
        for overlap in (True, False):
            rows = [
                Row(
                    id=f"r{i}",
                    line=i + 1,
                    prompt=f"{PROMPTS[i % len(PROMPTS)]} ({overlap}, {i})",  # a new prompt each row: no cache
                    model=spec.id,
                    seed=i,
                    width=size,
                    height=size,
                    steps=steps,
                )
                for i in range(args.rows)
            ]
            out = Path(tempfile.mkdtemp(prefix="imagegen-throughput-"))
            summary = Summary(total=len(rows))
            outputs = Outputs(out, summary)
            start = time.perf_counter()
            try:
                run_local(rows, outputs, overlap=overlap, runner=runner)
            finally:
                outputs.close()
            seconds = time.perf_counter() - start
            rates[overlap] = summary.done / seconds
            recorder.emit(
                {
                    "section": "throughput",
                    "what": "imagegen batch",
                    "overlap": overlap,
                    "rows": len(rows),
                    "done": summary.done,
                    "failed": summary.failed,
                    "s": round(seconds, 3),
                    "images_per_s": round(rates[overlap], 3),
                    "vs_one_image": round(rates[overlap] * one, 3),
                }
            )
            shutil.rmtree(out, ignore_errors=True)

        for n in args.batches:
            prompts = [f"{PROMPTS[i % len(PROMPTS)]} [{n}]" for i in range(n)]
            try:
                pipe.generate(prompts, seed=0, **options)  # warm: a new batch size compiles
                start = time.perf_counter()
                repeats = 2
                for r in range(repeats):
                    pipe.generate([f"{p} {r}" for p in prompts], seed=r, **options)
                seconds = (time.perf_counter() - start) / repeats
                recorder.emit(
                    {
                        "section": "throughput",
                        "what": "images per generate call",
                        "batch": n,
                        "s": round(seconds, 3),
                        "images_per_s": round(n / seconds, 3),
                        "peak_gb": round(mx.get_peak_memory() / 1e9, 2),
                    }
                )
            except Exception as e:  # a batch that does not fit must not end the run
                recorder.emit(
                    {
                        "section": "throughput",
                        "what": "images per generate call",
                        "batch": n,
                        "error": f"{type(e).__name__}: {e}",
                    }
                )
            free_memory()
        recorder.emit(
            {
                "section": "goal",
                "goal": "batch throughput",
                "images_per_s": round(rates[True], 3),
                "bound": round(0.95 / one, 3),
                "met": rates[True] >= 0.95 / one,
                "without_overlap_images_per_s": round(rates[False], 3),
            }
        )
    finally:
        if not args.keep:
            shutil.rmtree(folder, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
