"""`imagegen bench`: time a model on this machine (load, prompt encode, one denoise step, decode, end to end) and its
peak memory, through the Pipeline contract, so it works for every plugin's models. benchmarks/ builds on its timers."""

from __future__ import annotations

import dataclasses
import json
import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from typing import Any

import mlx.core as mx
import typer

from .. import __version__, hub, registry
from ..errors import InvalidOptionError
from ..options import parse_size
from ..pipeline import Pipeline, check_size
from ..weights import random_weights
from . import app, handle_errors

GB = 1e9
DEFAULT_PROMPT = "a red fox sitting in fresh snow at dawn, telephoto, soft golden light, detailed fur"


@dataclasses.dataclass(frozen=True)
class Timing:
    """Median and every run of a timed call, in milliseconds, and the peak memory during the timed runs."""

    ms: float
    runs: tuple[float, ...]
    peak_gb: float | None = None

    def record(self) -> dict[str, Any]:
        return {
            "ms": round(self.ms, 3),
            "runs_ms": [round(r, 3) for r in self.runs],
            "repeats": len(self.runs),
            "peak_gb": None if self.peak_gb is None else round(self.peak_gb, 3),
        }


def _leaves(obj: Any) -> Iterator[mx.array]:
    if isinstance(obj, mx.array):
        yield obj
    elif dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        for f in dataclasses.fields(obj):
            yield from _leaves(getattr(obj, f.name))
    elif isinstance(obj, (list, tuple)):
        for item in obj:
            yield from _leaves(item)
    elif isinstance(obj, dict):
        for item in obj.values():
            yield from _leaves(item)


def evaluate(obj: Any) -> Any:
    """mx.eval every array inside obj (arrays, lists, tuples, dicts, dataclasses such as a pipeline's conditioning)."""
    mx.eval(list(_leaves(obj)))
    return obj


def mlx_peak_gb() -> float:
    return mx.get_peak_memory() / GB


def time_mlx(fn: Callable[[], Any], warmup: int = 2, repeats: int = 5) -> Timing:
    """Median wall time of `evaluate(fn())`: MLX is lazy, so the work is forced inside the timed region. Warm-up
    runs compile kernels (and mx.compile traces); peak memory covers the timed runs, resident weights included."""
    for _ in range(warmup):
        evaluate(fn())
    mx.synchronize()
    mx.reset_peak_memory()
    runs = []
    for _ in range(repeats):
        start = time.perf_counter()
        evaluate(fn())
        mx.synchronize()
        runs.append((time.perf_counter() - start) * 1e3)
    return Timing(statistics.median(runs), tuple(runs), mlx_peak_gb())


def clear_prompt_cache(pipe: Pipeline) -> None:
    """Forget cached prompt features, so an encode does the work again."""
    encoder = getattr(pipe, "text_encoder", None)
    if hasattr(encoder, "clear_cache"):
        encoder.clear_cache()


def _record(stage: str, timing: Timing, **extra: Any) -> dict[str, Any]:
    return {"stage": stage, **timing.record(), **extra}


def time_step(pipe: Pipeline, request: Any, warmup: int = 2, repeats: int = 5) -> tuple[Timing, mx.array]:
    """One iteration of the pipeline's own denoise loop (its compiled transformer call and Euler update), timed over
    a request of warmup + repeats steps; returns the timing and the last latents."""
    request = dataclasses.replace(request, steps=warmup + repeats)
    conditioning = evaluate(pipe.encode(request))
    steps = pipe.denoise_steps(request, conditioning, pipe.prepare_latents(request))
    latest: dict[str, mx.array] = {}

    def step() -> mx.array:
        latest["latents"] = next(steps)
        return latest["latents"]

    return time_mlx(step, warmup, repeats), latest["latents"]


def bench_pipeline(
    pipe: Pipeline,
    prompt: str,
    width: int,
    height: int,
    steps: int | None = None,
    warmup: int = 2,
    repeats: int = 5,
    e2e_repeats: int = 3,
) -> Iterator[dict[str, Any]]:
    """Time each stage of a loaded pipeline; yields one record per stage as it is measured.

    encode: the prompt (cache cleared each run); step: one iteration of denoise_steps (the pipeline's own,
    compiled, transformer call and Euler update); decode: latents to PIL images; e2e: generate() with the
    model's default steps (or `steps`), prompt cache cleared each run."""
    request = pipe.request(prompt, width=width, height=height, seed=0)
    size = f"{width}x{height}"

    def encode() -> Any:
        clear_prompt_cache(pipe)
        return pipe.encode(request)

    yield _record("encode", time_mlx(encode, warmup, repeats), size=size)
    timing, latents = time_step(pipe, request, warmup, repeats)
    yield _record("step", timing, size=size)
    yield _record("decode", time_mlx(lambda: pipe.decode(request, latents), 1, repeats), size=size)

    def generate() -> Any:
        clear_prompt_cache(pipe)
        return pipe.generate(prompt, width=width, height=height, steps=steps, seed=0).images

    total = steps or pipe.spec.default_steps
    yield _record("e2e", time_mlx(generate, 1, e2e_repeats), size=size, steps=total)


@app.command()
@handle_errors
def bench(
    model: str = typer.Option(
        None, "--model", "-m", help="Model id, alias or family (default: $IMAGEGEN_MODEL or the bundled demo model)."
    ),
    weights: str = typer.Option(None, "--weights", help="Weights folder or Hugging Face repo id (cached)."),
    random: bool = typer.Option(
        False,
        "--random",
        help="Random weights of the checkpoint's configs: only its "
        "config and tokenizer files are read (speed and memory, not images).",
    ),
    size: str = typer.Option(None, "--size", help="WIDTHxHEIGHT (default: the model's)."),
    steps: int = typer.Option(None, "--steps", "-s", help="Steps of the end-to-end run (default: the model's)."),
    quantize: str = typer.Option(
        None, "--quantize", "-q", help="Quantize weights: 4, 8, mxfp8, mxfp4, nvfp4, fp8 (faster on CUDA), ..."
    ),
    dtype: str = typer.Option(
        None, "--dtype", help="bfloat16, float16 or float32 (default: the model's; float32 for flux2-demo)."
    ),
    repeats: int = typer.Option(5, "--repeats", help="Timed runs per stage (the median is reported)."),
    warmup: int = typer.Option(2, "--warmup", help="Untimed runs first (kernel compilation, tracing)."),
    prompt: str = typer.Option(DEFAULT_PROMPT, "--prompt", help="The prompt to encode and generate."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON record per line."),
) -> None:
    """Time a model here: load, prompt encode, one denoise step, decode, end to end, and peak memory."""
    if repeats < 1 or warmup < 0:
        raise InvalidOptionError(f"--repeats must be >= 1 and --warmup >= 0, got {repeats} and {warmup}.")
    spec = registry.get(model or registry.default_model() or "")
    width, height = parse_size(size, "--size") if size else spec.default_size
    check_size(spec, width, height)
    quantize = spec.check_quantize(quantize)
    path = hub.resolve_weights(spec, weights)
    base = {
        "model": spec.id,
        "dtype": dtype or spec.default_dtype,
        "quantize": quantize,
        "random": random,
        "device": str(mx.default_device()),
        "imagegen": __version__,
        "mlx": mx.__version__,
    }

    def emit(record: dict[str, Any]) -> None:
        if as_json:
            typer.echo(json.dumps({**base, **record}))
        else:
            peak = f"{record['peak_gb']:.2f} GB peak" if record.get("peak_gb") is not None else ""
            typer.echo(f"{record['stage']:<8} {record['ms']:>10.1f} ms   {peak}")

    if not as_json:
        typer.echo(
            f"{spec.id} {width}x{height} {base['dtype']}{' ' + quantize if quantize else ''}"
            f"{' (random weights)' if random else ''} on {base['device']}, median of {repeats}"
        )
    mx.reset_peak_memory()
    start = time.perf_counter()
    with random_weights() if random else nullcontext():
        pipe = spec.pipeline(weights=path, dtype=dtype, quantize=quantize)
    emit({"stage": "load", "ms": (time.perf_counter() - start) * 1e3, "peak_gb": mlx_peak_gb()})
    for record in bench_pipeline(pipe, prompt, width, height, steps, warmup, repeats, min(repeats, 3)):
        emit(record)
