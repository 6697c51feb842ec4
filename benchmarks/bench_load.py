"""How fast a checkpoint's safetensors become GPU-ready arrays: MLX's lazy load as imagegen uses it (every tensor read
and copied to the GPU on the one eval thread) against reads spread over several CPU streams (MLX gives each its own
thread; the GPU then reads the host arrays through unified memory).

    python benchmarks/bench_load.py FOLDER [--streams 4,8]

FOLDER: any folder holding *.safetensors (searched recursively; e.g. the checkpoint bench_generate.py --keep leaves).
Each way is timed until a GPU reduction over every tensor has finished (what the first image would wait for), from
the page cache (the files are read once before timing)."""

from __future__ import annotations

import argparse
import gc
import time
from pathlib import Path

import mlx.core as mx
from common import Recorder, header


def touch_on_gpu(arrays: list[mx.array]) -> None:
    """Wait until every array is usable by the GPU: one reduction each, on the default device (the GPU)."""
    sums = [mx.sum(a) for a in arrays]
    mx.eval(sums)
    mx.synchronize()


def one_stream(files: list[Path], streams: int) -> list[mx.array]:
    arrays = []
    for f in files:
        arrays += list(mx.load(str(f)).values())
    return arrays


def cpu_streams(files: list[Path], streams: int) -> list[mx.array]:
    """Tensor k of a file read on CPU stream k % streams (one lazy mx.load of the file per stream)."""
    pool = [mx.new_stream(mx.cpu) for _ in range(streams)]
    arrays = []
    for f in files:
        loads = [mx.load(str(f), stream=s) for s in pool]
        names = sorted(loads[0])
        arrays += [loads[k % streams][name] for k, name in enumerate(names)]
    return arrays


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("folder", type=Path)
    p.add_argument("--streams", default="4,8")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    rec = Recorder(args.out)
    rec.emit(header(vars(args)))
    files = sorted(args.folder.rglob("*.safetensors"))
    gb = sum(f.stat().st_size for f in files) / 1e9
    for f in files:  # into the page cache
        f.read_bytes()
    ways = [("mlx-load", one_stream, 1)] + [
        (f"cpu-streams-{n}", cpu_streams, n) for n in map(int, args.streams.split(","))
    ]
    for name, way, streams in ways * 2:  # twice: the second round shows the noise
        gc.collect()
        mx.clear_cache()
        start = time.perf_counter()
        arrays = way(files, streams)
        touch_on_gpu(arrays)
        seconds = time.perf_counter() - start
        rec.emit(
            dict(
                section="load",
                way=name,
                files=len(files),
                gb=round(gb, 2),
                s=round(seconds, 3),
                gb_per_s=round(gb / seconds, 2),
            )
        )
        del arrays


if __name__ == "__main__":
    main()
