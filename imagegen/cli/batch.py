"""`imagegen batch`: many prompts from a JSON-lines file to a folder of PNGs, here or on a Ray cluster."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from types import TracebackType
from typing import Any

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from .. import distributed, registry
from ..batch import FAILURES, MAX_STEPS, ROW_OPTIONS, Defaults, LoadOptions, Summary, run_batch
from ..errors import InvalidOptionError
from ..options import parse_size
from ..request import given
from . import app, error, handle_errors
from .options import cli_options, flag_errors, with_flags


class BatchProgress:
    """Rows done of rows to do, images/s and ETA on stderr (a reporter for imagegen.batch.run_batch)."""

    def __init__(self, quiet: bool = False):
        self.quiet = quiet or not sys.stderr.isatty()
        self.console = Console(stderr=True)
        self.progress: Progress | None = None
        self.task: Any = None
        self.done = self.failed = 0
        self.started = time.perf_counter()

    def __enter__(self) -> BatchProgress:
        return self

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None, tb: TracebackType | None) -> None:
        if self.progress is not None:
            self.progress.stop()

    def start(self, total: int, skipped: int, workers: int) -> None:
        self.started = time.perf_counter()
        if skipped:
            self.note(f"{skipped} of {total} rows already done: resuming")
        if self.quiet:
            return
        self.progress = Progress(
            TextColumn("rows"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[rate]}"),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            TextColumn("{task.fields[failed]}"),
            console=self.console,
            transient=True,
        )
        self.task = self.progress.add_task("rows", total=total - skipped, rate="", failed="")
        self.progress.start()
        self.note(f"[dim]{workers} worker{'s' if workers > 1 else ''}[/dim]")

    def row(self, record: dict[str, Any]) -> None:
        if "error" in record:
            self.failed += 1
        else:
            self.done += 1
        if self.progress is None:
            return
        elapsed = time.perf_counter() - self.started
        rate = f"{self.done / elapsed:.2f} images/s" if elapsed > 0 and self.done else ""
        failed = f"[red]{self.failed} failed[/red]" if self.failed else ""
        self.progress.update(self.task, advance=1, rate=rate, failed=failed)

    def note(self, text: str) -> None:
        if not self.quiet:
            self.console.print(text, highlight=False)


def summary_line(summary: Summary, folder: Path) -> str:
    parts = [f"{summary.done} done"]
    if summary.skipped:
        parts.append(f"{summary.skipped} already done")
    if summary.failed:
        parts.append(f"{summary.failed} failed")
    if summary.retried:
        parts.append(f"{summary.retried} retried after a worker died")
    rate = f", {summary.images_per_second:.2f} images/s" if summary.done else ""
    return f"{', '.join(parts)} in {summary.seconds:.1f}s{rate} -> {folder}"


@app.command()
@handle_errors
@with_flags(cli_options(ROW_OPTIONS.values()), help_prefix="For rows without it: ")
def batch(
    prompts: Path = typer.Argument(
        ...,
        help="JSON-lines file: one object per line with 'prompt' and optionally "
        "'id', 'model', 'size', 'options' and the options below by name (e.g. 'seed', "
        "'steps', 'negative_prompt').",
    ),
    output: Path = typer.Option(..., "--output", "-o", help="Folder for <id>.png, results.jsonl, failures.jsonl."),
    ray: str = typer.Option(
        None,
        "--ray",
        help="Run on Ray: 'local' starts a cluster on this machine, 'auto' joins "
        "the one `ray start` runs, or a cluster address (needs the ray extra: "
        "pip install 'imagegen-mlx\\[ray]').",
    ),
    workers: int = typer.Option(
        None, "--workers", help="Ray workers (default: one per GPU, or per --gpus-per-worker GPUs; 1 without GPUs)."
    ),
    gpus_per_worker: int = typer.Option(
        1,
        "--gpus-per-worker",
        help="Spread each image over N GPUs of a worker, "
        "one process each (FLUX.2 models): without --ray the batch's own worker, "
        "with --ray each Ray worker holds N GPUs.",
    ),
    model: str = typer.Option(
        None,
        "--model",
        "-m",
        help="Model for rows that name none (default: $IMAGEGEN_MODEL or the bundled demo model).",
    ),
    size: str = typer.Option(None, "--size", help="WIDTHxHEIGHT for rows without 'size' (default: the model's)."),
    weights: str = typer.Option(None, "--weights", help="Weights folder or Hugging Face repo id (cached)."),
    quantize: str = typer.Option(
        None, "--quantize", "-q", help="Quantize weights: 4, 8, mxfp8, mxfp4, nvfp4, fp8 (faster on CUDA), ..."
    ),
    dtype: str = typer.Option(
        None, "--dtype", help="bfloat16, float16 or float32 (default: the model's; float32 for flux2-demo)."
    ),
    controlnet: str = typer.Option(
        None,
        "--controlnet",
        help="A ControlNet (diffusers folder or cached repo id) for "
        "the models that take one (Z-Image); rows give 'control_image' in 'options'.",
    ),
    as_json: bool = typer.Option(False, "--json", help="Print the summary as JSON."),
    quiet: bool = typer.Option(False, "--quiet", help="No progress output."),
    flags: dict[str, Any] | None = None,
) -> None:
    """Generate one image per line of a JSON-lines file; re-running resumes where it stopped."""
    if workers is not None and ray is None:
        raise InvalidOptionError("--workers needs --ray (without it the batch runs in this process).")
    if workers is not None and workers < 1:
        raise InvalidOptionError(f"--workers must be >= 1, got {workers}.")
    if gpus_per_worker < 1 or ray is None:  # Ray checks the cluster's GPUs; here, the ones this host shows
        distributed.check_count(gpus_per_worker, "--gpus-per-worker")
    if gpus_per_worker > 1 and model is not None and not registry.get(model).extra.get("sequence_parallel"):
        raise InvalidOptionError(
            f"Model '{registry.get(model).id}' cannot spread one image over several GPUs (--gpus-per-worker)."
        )
    values = {name: value for name, value in (flags or {}).items() if given(value)}
    with flag_errors():  # the same type and range checks as a row's, worded with the flags
        values = {name: ROW_OPTIONS[name].check(value) for name, value in values.items()}
    if values.get("steps") is not None and values["steps"] > MAX_STEPS:
        raise InvalidOptionError(f"--steps must be between 1 and {MAX_STEPS}, got {values['steps']}.")
    width, height = parse_size(size, "--size") if size is not None else (None, None)
    named = {k: values.pop(k, None) for k in ("steps", "guidance", "seed", "negative_prompt")}
    defaults = Defaults(model=model, width=width, height=height, options=values, **named)
    with BatchProgress(quiet or as_json) as progress:
        summary = run_batch(
            prompts,
            output,
            defaults,
            LoadOptions(weights, dtype, quantize, controlnet),
            ray=ray,
            workers=workers,
            reporter=progress,
            gpus_per_worker=gpus_per_worker,
        )
    if as_json:
        fields = ("total", "skipped", "done", "failed", "retried", "replaced", "workers")
        typer.echo(
            json.dumps(
                {
                    **{k: getattr(summary, k) for k in fields},
                    "seconds": round(summary.seconds, 3),
                    "images_per_second": round(summary.images_per_second, 4),
                    "output": str(output),
                }
            )
        )
    else:
        typer.echo(summary_line(summary, output))
    if summary.failed:
        error(f"{summary.failed} of {summary.total} rows failed: see {output / FAILURES}")
        raise typer.Exit(1)
