"""Batch generation: prompts from a JSON-lines file to PNGs, resumable, in one process or on Ray workers.

Each input line is a JSON object: `prompt` (required), optional `id`, `model`, `size` ("WxH"), every option
declared for batch in imagegen.options (`seed`, `steps`, `guidance`, `negative_prompt`, `tile`, `noise`, and
`images`, `init_image`, `mask`: paths relative to the prompts file; `strength`, `outpaint`) and `options` (the
model's own, as `-O`); `Defaults` (the CLI options) fill in what a row leaves out. The output folder gets
`<id>.png` (with the metadata `imagegen run` writes), `results.jsonl` (one line per PNG: id, file, model, seed,
seconds, worker) and `failures.jsonl` (this run's failed rows and why).

This process is the only writer: workers (the local RowRunner, or Ray actors running one) return PNG
bytes, so a row is written once however often a worker dies, and a row is done when its PNG exists,
which is what a re-run skips (resume). In one process, PNG encoding and writing run on a thread of their own
while the next row generates (`Writer`), in row order.
"""

from __future__ import annotations

import errno
import gc
import hashlib
import json
import os
import queue
import re
import socket
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import IO, Any, Protocol

import mlx.core as mx
from PIL import Image

from . import ranks, registry
from .errors import ImagegenError, InvalidOptionError, LoraError
from .image import generation_metadata, png_bytes, read_metadata, write_atomic
from .options import OPTIONS, Option, OptionError, family_options, parse_size
from .pipeline import Pipeline
from .request import check_size
from .server.settings import Limits

RESULTS, FAILURES = "results.jsonl", "failures.jsonl"
# the row fields that are not generate() options: the JSON types they may have, and their name in errors
FIELDS: dict[str, tuple[tuple[type, ...], str]] = {
    "prompt": ((str,), "a string"),
    "id": ((str, int), "a string or an integer"),
    "model": ((str,), "a string"),
    "size": ((str,), 'a string like "1024x768"'),
    "options": ((dict,), "an object of the model's options"),
}
ROW_OPTIONS = {o.name: o for o in OPTIONS if "batch" in o.fronts}  # every other key: a declared option
ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")  # safe as a file name everywhere
MAX_STEPS = Limits.max_steps  # the server's limit: a typo like 20000 would hold a worker for hours


class BatchInputError(ImagegenError):
    """The prompts file is unusable: not JSON lines, a missing prompt, a bad field (names the line)."""


# ---- rows ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Defaults:
    """What a row gets for each field it leaves out (the CLI options). Without a seed anywhere, a row's
    seed is derived from its id, so a re-run or another machine draws the same image."""

    model: str | None = None
    width: int | None = None
    height: int | None = None
    steps: int | None = None
    guidance: float | None = None
    seed: int | None = None
    negative_prompt: str | None = None
    options: dict[str, Any] = field(default_factory=dict)  # any other declared option, by name


@dataclass(frozen=True)
class LoadOptions:
    """How every worker loads pipelines (the same for all rows of a batch)."""

    weights: str | None = None
    dtype: str | None = None
    quantize: str | None = None
    controlnet: str | None = None  # loaded with the models that take one (ModelSpec.components)


@dataclass(frozen=True)
class Row:
    id: str
    line: int  # 1-based line of the prompts file
    prompt: str
    model: str
    seed: int
    width: int | None = None  # None: the model's default size
    height: int | None = None
    steps: int | None = None
    guidance: float | None = None
    negative_prompt: str | None = None
    other_options: dict[str, Any] = field(default_factory=dict, hash=False)  # tile, images, the model's own, ...

    @property
    def file(self) -> str:
        return f"{self.id}.png"

    def options(self) -> dict[str, Any]:
        """The keyword options of Pipeline.generate for this row (unset ones left to the model)."""
        options = {
            "width": self.width,
            "height": self.height,
            "steps": self.steps,
            "guidance": self.guidance,
            "negative_prompt": self.negative_prompt,
            **self.other_options,
        }
        return {"seed": self.seed, **{k: v for k, v in options.items() if v is not None}}


def row_hash(obj: dict[str, Any]) -> str:
    """A stable id for a row that has none: its canonical JSON, hashed."""
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def derived_seed(row_id: str) -> int:
    return int(hashlib.sha256(f"seed:{row_id}".encode()).hexdigest()[:8], 16) % 2**31


def parse_row(text: str, line: int, defaults: Defaults, where: str = "", folder: Path = Path()) -> Row:
    """One input line -> a Row; anything malformed raises BatchInputError naming the line. Image paths are
    relative to `folder` (the prompts file's)."""
    at = f"{where}line {line}"
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise BatchInputError(f"{at}: not valid JSON ({e.msg}).") from None
    if not isinstance(obj, dict):
        raise BatchInputError(f'{at}: expected a JSON object like {{"prompt": "..."}}, got {type(obj).__name__}.')
    unknown = sorted(set(obj) - set(FIELDS) - set(ROW_OPTIONS))
    if unknown:
        raise BatchInputError(f"{at}: unknown field '{unknown[0]}' (fields: {', '.join([*FIELDS, *ROW_OPTIONS])}).")
    for name, value in obj.items():
        if value is None:
            continue
        if name in FIELDS:
            kinds, kind = FIELDS[name]
            if not isinstance(value, kinds) or isinstance(value, bool):
                raise BatchInputError(f"{at}: '{name}' must be {kind}, got {json.dumps(value)}.")
        elif ROW_OPTIONS[name].kind in ("image", "file"):  # paths relative to the prompts file, read later
            paths = value if ROW_OPTIONS[name].repeatable else [value]
            if not isinstance(paths, list) or not all(isinstance(v, str) and v for v in paths):
                one, many = (
                    ("an image path", "a list of image paths")
                    if ROW_OPTIONS[name].kind == "image"
                    else ("a path", "a list of paths")
                )
                what = many if ROW_OPTIONS[name].repeatable else one
                raise BatchInputError(f"{at}: '{name}' must be {what}, got {json.dumps(value)}.")
        else:
            try:
                ROW_OPTIONS[name].check(value)
            except OptionError as e:
                raise BatchInputError(f"{at}: {e.render(repr(name))}") from None
            except LoraError as e:  # a missing or unreadable adapter: refused before anything runs
                raise BatchInputError(f"{at}: {e}") from None
    if not isinstance(obj.get("prompt"), str) or not obj["prompt"].strip():
        raise BatchInputError(f"{at}: missing 'prompt' (a non-empty string).")
    row_id = str(obj["id"]) if obj.get("id") is not None else row_hash(obj)
    if not ID_PATTERN.match(row_id):
        raise BatchInputError(
            f"{at}: id '{row_id}' must be 1-128 letters, digits, '.', '_' or '-' (it names the PNG file)."
        )
    width, height = defaults.width, defaults.height
    if obj.get("size") is not None:
        try:
            width, height = parse_size(obj["size"], "'size'")
        except InvalidOptionError as e:
            raise BatchInputError(f"{at}: {e}") from None

    def pick(name: str) -> Any:
        return obj[name] if obj.get(name) is not None else getattr(defaults, name)

    files = family_files()
    family = {
        name: relative_to(folder, files[name], value) if name in files and isinstance(value, str) else value
        for name, value in (obj.get("options") or {}).items()
    }
    other = {**defaults.options, **family}
    for name in set(ROW_OPTIONS) - {"seed", "steps", "guidance", "negative_prompt"}:
        if obj.get(name) is not None:
            other[name] = relative_to(folder, ROW_OPTIONS[name], obj[name])
    seed, steps = pick("seed"), pick("steps")
    if steps is not None and steps > MAX_STEPS:
        raise BatchInputError(f"{at}: 'steps' must be between 1 and {MAX_STEPS}, got {steps}.")
    return Row(
        id=row_id,
        line=line,
        prompt=obj["prompt"],
        model=pick("model") or registry.default_model() or "",
        seed=derived_seed(row_id) if seed is None else seed,
        width=width,
        height=height,
        steps=steps,
        guidance=pick("guidance"),
        negative_prompt=pick("negative_prompt"),
        other_options=other,
    )


def family_files() -> dict[str, Option]:
    """The installed families' single image and file options by name: their paths in a row's "options" are
    relative to the prompts file too."""
    return {
        o.name: o
        for spec in registry.all_specs()
        for o in family_options(spec.extra_options)
        if o.kind in ("image", "file") and not o.repeatable
    }


def relative_to(folder: Path, option: Option, value: Any) -> Any:
    """A row's file-valued option with its paths taken relative to the prompts file's folder."""
    if option.kind not in ("image", "file"):
        return value
    return [folder / p for p in value] if option.repeatable else folder / value


def read_rows(path: str | Path, defaults: Defaults = Defaults()) -> list[Row]:
    """Every row of a prompts file, checked before anything runs (blank lines are skipped)."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8-sig").splitlines()  # -sig: a BOM some editors write is not text
    except FileNotFoundError:
        raise BatchInputError(f"Prompts file not found: {path}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise BatchInputError(f"Cannot read {path}: {e}") from None
    rows: list[Row] = []
    first_line: dict[str, int] = {}
    ids: dict[int, str] = {}
    for number, text in enumerate(lines, 1):
        if not text.strip():
            continue
        row = parse_row(text, number, defaults, f"{path}: ", path.parent)
        key = row.id.casefold()  # ids that differ only by case name the same file on macOS and Windows
        if key in first_line:
            earlier = first_line[key]
            same = "is already used" if ids[earlier] == row.id else "differs only by case from the id"
            raise BatchInputError(
                f"{path}: line {number}: id '{row.id}' {same} on line {earlier} "
                "(each row needs its own file name; identical rows draw identical images: give "
                "each an id or a seed)."
            )
        first_line[key], ids[number] = number, row.id
        rows.append(row)
    if not rows:
        raise BatchInputError(f"{path} has no rows.")
    return rows


def check_row(row: Row) -> Row:
    """The model and the size, checked before any worker starts; the row with its model's id. The other options
    go through the same request check in the worker's generate() (a refused row is recorded, the rest go on)."""
    if not row.model:
        raise ImagegenError("No model given and none installed.")
    spec = registry.get(row.model)
    default_w, default_h = spec.default_size
    check_size(spec, row.width or default_w, row.height or default_h)
    return replace(row, model=spec.id)


# ---- workers ---------------------------------------------------------------------------------
@dataclass
class RowOutcome:
    """A row's result from a worker: the PNG file's bytes, or the error that stopped it."""

    row: Row
    worker: str
    png: bytes | None = None
    seconds: float = 0.0
    error: str | None = None


@dataclass
class Generated:
    """A row's image and metadata, not yet encoded: `outcome()` makes the PNG (on the writer thread)."""

    row: Row
    worker: str
    image: Image.Image
    metadata: dict[str, Any]
    seconds: float

    def outcome(self) -> RowOutcome:
        try:
            return RowOutcome(self.row, self.worker, png_bytes(self.image, self.metadata), self.seconds)
        except Exception as e:
            return RowOutcome(self.row, self.worker, error=error_text(e))


def encoded(item: Generated | RowOutcome) -> RowOutcome:
    """A generated row with its PNG made, or an outcome as it is (already encoded, or failed)."""
    return item.outcome() if isinstance(item, Generated) else item


def error_text(e: BaseException) -> str:
    """One line for a row's error: the message of errors users cause, else the kind and the first line."""
    if isinstance(e, ImagegenError):
        return str(e)
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0]}" if lines else type(e).__name__


def worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


class RowRunner:
    """Runs rows on one device. A model's pipeline is loaded on its first row and kept for the rows
    after it; one model is resident at a time (rows arrive grouped by model)."""

    def __init__(self, load: LoadOptions = LoadOptions(), name: str | None = None):
        self.load, self.name = load, name or worker_name()
        self.model: str | None = None
        self.pipe: Pipeline | None = None
        self.load_errors: dict[str, str] = {}  # a model that failed to load is not retried for each row
        self.loads = 0

    def pipeline(self, model: str) -> Pipeline:
        if self.pipe is not None and self.model == model:
            return self.pipe
        if model in self.load_errors:
            raise ImagegenError(self.load_errors[model])
        self.pipe = self.model = None
        gc.collect()  # free the previous model before the next one loads
        mx.clear_cache()
        spec = registry.get(model)
        if ranks.leader() is not None and not spec.extra.get("sequence_parallel"):
            raise ImagegenError(f"Model '{model}' cannot spread one image over several GPUs (--gpus-per-worker).")
        parts = {"controlnet": self.load.controlnet} if "controlnet" in spec.components else {}
        try:  # on every rank under --gpus-per-worker N (imagegen.batch_ranks)
            pipe = ranks.load(
                spec,
                weights=self.load.weights,
                dtype=self.load.dtype,
                quantize=self.load.quantize,
                **{k: v for k, v in parts.items() if v is not None},
            )
        except Exception as e:
            self.load_errors[model] = f"Cannot load '{model}': {error_text(e)}"
            raise ImagegenError(self.load_errors[model]) from None
        self.pipe, self.model = pipe, model
        self.loads += 1
        return pipe

    def run(self, row: Row) -> RowOutcome:
        """Generate one row and encode its PNG; its failure is the outcome's error, never an exception."""
        return encoded(self.generate(row))

    def generate(self, row: Row) -> Generated | RowOutcome:
        """Generate one row without encoding it; a failure is a RowOutcome with its error."""
        try:
            pipe = self.pipeline(row.model)
            start = time.perf_counter()
            result = pipe.generate(row.prompt, **row.options())
            seconds = time.perf_counter() - start
            batch = {"id": row.id, "seconds": round(seconds, 4), "worker": self.name}
            metadata = generation_metadata(pipe, result, source="imagegen batch", batch=batch)
            return Generated(row, self.name, result.images[0], metadata, seconds)
        except Exception as e:
            return RowOutcome(row, self.name, error=error_text(e))


# ---- the output folder -----------------------------------------------------------------------
def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Records of a JSON-lines file we wrote; a line cut short by a crash is dropped."""
    if not path.exists():
        return []
    records = []
    for text in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(text)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and isinstance(record.get("id"), str):
            records.append(record)
    return records


class Reporter(Protocol):
    """Progress: `start` once, `row` after every finished row (a results or a failures record)."""

    def start(self, total: int, skipped: int, workers: int) -> None: ...

    def row(self, record: dict[str, Any]) -> None: ...

    def note(self, text: str) -> None: ...


@dataclass
class Summary:
    total: int  # rows in the input
    skipped: int = 0  # done by an earlier run
    done: int = 0
    failed: int = 0
    retried: int = 0  # rows sent again after their worker died
    replaced: int = 0  # workers that died and were replaced
    workers: int = 1
    seconds: float = 0.0
    failures: list[dict[str, Any]] = field(default_factory=list)

    @property
    def images_per_second(self) -> float:
        return self.done / self.seconds if self.seconds > 0 else 0.0


class Outputs:
    """The output folder and the run's tally. `resume` keeps results.jsonl to one line per PNG present
    (recovering a line lost to a crash from the PNG's metadata); `finish` writes a row's outcome."""

    def __init__(self, folder: str | Path, summary: Summary, reporter: Reporter | None = None):
        self.folder, self.summary, self.reporter = Path(folder), summary, reporter
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ImagegenError(f"Cannot create output folder {self.folder}: {e.strerror}") from None
        self._results: IO[str] | None = None
        self._failures: IO[str] | None = None

    def resume(self, rows: Sequence[Row]) -> list[Row]:
        """The rows whose PNG does not exist yet; also rewrites results.jsonl and clears failures.jsonl."""
        kept = {r["id"]: r for r in _read_jsonl(self.folder / RESULTS) if (self.folder / str(r.get("file"))).exists()}
        todo = []
        for row in rows:
            if not (self.folder / row.file).exists():
                kept.pop(row.id, None)
                todo.append(row)
            elif row.id not in kept:
                kept[row.id] = self._recover(row)
        text = "".join(json.dumps(r) + "\n" for r in kept.values())
        try:
            write_atomic(self.folder / RESULTS, text.encode())
        except OSError as e:
            raise ImagegenError(f"Output folder {self.folder} is not writable: {e.strerror}") from None
        (self.folder / FAILURES).unlink(missing_ok=True)
        self.summary.skipped = len(rows) - len(todo)
        self._results = (self.folder / RESULTS).open("a", encoding="utf-8")
        return todo

    def start(self, workers: int, rejected: Iterable[RowOutcome] = ()) -> None:
        """The runner is ready: report the totals, then the rows refused before any worker saw them."""
        self.summary.workers = workers
        if self.reporter is not None:
            self.reporter.start(self.summary.total, self.summary.skipped, workers)
        for outcome in rejected:
            self.finish(outcome)

    def _recover(self, row: Row) -> dict[str, Any]:
        try:
            metadata = read_metadata(self.folder / row.file)
        except ImagegenError:  # a PNG imagegen did not write: still done, details unknown
            metadata = {}
        batch = metadata.get("batch", {})
        return {
            "id": row.id,
            "file": row.file,
            "model": metadata.get("model", row.model),
            "seed": metadata.get("seed", row.seed),
            "seconds": batch.get("seconds"),
            "worker": batch.get("worker"),
        }

    def finish(self, outcome: RowOutcome) -> dict[str, Any]:
        """Write one row's PNG and results line, or its failures line; report it. A write that fails (a full
        disk) is the row's failure; when even that cannot be recorded, or the disk is full, the batch stops."""
        row = outcome.row
        write_error = None
        if outcome.png is not None:
            try:
                write_atomic(self.folder / row.file, outcome.png)
                record = {
                    "id": row.id,
                    "file": row.file,
                    "model": row.model,
                    "seed": row.seed,
                    "seconds": round(outcome.seconds, 4),
                    "worker": outcome.worker,
                }
                self._append("_results", RESULTS, record)
                self.summary.done += 1
            except OSError as e:
                (self.folder / row.file).unlink(missing_ok=True)  # not done: a re-run makes it again
                write_error = e
                outcome = replace(outcome, png=None, error=f"Cannot write {self.folder / row.file}: {e.strerror or e}")
        if outcome.png is None:
            record = {
                "id": row.id,
                "line": row.line,
                "prompt": row.prompt,
                "model": row.model,
                "error": outcome.error,
                "worker": outcome.worker or None,
            }  # None: refused before any worker
            try:
                self._append("_failures", FAILURES, record)
            except OSError as e:
                raise ImagegenError(
                    f"{outcome.error}; cannot record it in {self.folder / FAILURES} either "
                    f"({e.strerror or e}). Stopped; free space and re-run to resume."
                ) from None
            self.summary.failed += 1
            self.summary.failures.append(record)
        if self.reporter is not None:
            self.reporter.row(record)
        if write_error is not None and write_error.errno in (errno.ENOSPC, errno.EDQUOT):
            raise ImagegenError(
                f"{outcome.error}. Stopped; free space and re-run to resume (see {self.folder / FAILURES})."
            )
        return record

    def note(self, text: str) -> None:
        if self.reporter is not None:
            self.reporter.note(text)

    def _append(self, attr: str, name: str, record: dict[str, Any]) -> None:
        handle = getattr(self, attr)
        if handle is None:
            handle = (self.folder / name).open("a", encoding="utf-8")
            setattr(self, attr, handle)
        handle.write(json.dumps(record) + "\n")
        handle.flush()  # a line per finished row, on disk before the next one starts

    def close(self) -> None:
        for handle in (self._results, self._failures):
            if handle is not None:
                handle.close()
        self._results = self._failures = None


# ---- running ---------------------------------------------------------------------------------
class Writer:
    """Encodes and writes finished rows on one thread, in the order given, while the caller generates the next
    (H100/H200: PNG encoding is ~0.2 s of a 0.6 s 1024 px image). At most `depth` rows wait, so memory stays
    bounded; an error writing a row (a full disk) stops the run at the next put, as it would without the thread."""

    def __init__(self, outputs: Outputs, depth: int = 2):
        self.outputs = outputs
        self.queue: queue.Queue[Generated | RowOutcome | None] = queue.Queue(maxsize=depth)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._loop, name="imagegen-batch-writer", daemon=True)
        self.thread.start()

    def put(self, item: Generated | RowOutcome) -> None:
        self._raise()
        self.queue.put(item)

    def close(self) -> None:
        """Write what is queued, then stop (also after an interrupt: rows already generated are kept)."""
        self.queue.put(None)
        self.thread.join()
        self._raise()

    def _loop(self) -> None:
        while (item := self.queue.get()) is not None:
            if self.error is None:
                try:
                    self.outputs.finish(encoded(item))
                except BaseException as e:  # re-raised on the caller's thread
                    self.error = e

    def _raise(self) -> None:
        if self.error is not None:
            raise self.error


def run_local(
    rows: Iterable[Row],
    outputs: Outputs,
    load: LoadOptions = LoadOptions(),
    rejected: Iterable[RowOutcome] = (),
    overlap: bool = True,
    runner: RowRunner | None = None,
) -> None:
    """All rows in this process, one after another, on one RowRunner (a new one unless given); with `overlap`,
    each PNG is encoded and written while the next row generates."""
    runner = runner or RowRunner(load)
    outputs.start(1, rejected)
    if not overlap:
        for row in rows:
            outputs.finish(runner.run(row))
        return
    writer = Writer(outputs)
    try:
        for row in rows:
            writer.put(runner.generate(row))
    finally:
        writer.close()


def run_batch(
    prompts: str | Path | Sequence[Row],
    out: str | Path,
    defaults: Defaults = Defaults(),
    load: LoadOptions = LoadOptions(),
    ray: str | None = None,
    workers: int | None = None,
    reporter: Reporter | None = None,
    max_retries: int = 2,
    gpus_per_worker: int = 1,
) -> Summary:
    """Generate every row not done yet into `out`. `ray`: None runs here; "local" starts a local Ray
    cluster, "auto" or an address joins one (see imagegen.scaleout.batch). `workers` overrides one worker per
    GPU (per CPU slot without GPUs); `max_retries` bounds how often a row is resent after its worker died.
    `gpus_per_worker` > 1 splits each image over that many GPUs (ranks) of the worker (imagegen.batch_ranks)."""
    rows = read_rows(prompts, defaults) if isinstance(prompts, str | Path) else list(prompts)
    summary = Summary(total=len(rows))
    outputs = Outputs(out, summary, reporter)
    try:
        todo: list[Row] = []
        rejected: list[RowOutcome] = []
        for row in outputs.resume(rows):
            try:
                todo.append(check_row(row))
            except ImagegenError as e:
                rejected.append(RowOutcome(row, "", error=str(e)))
        todo.sort(key=lambda r: r.model)  # stable: file order within a model; each model loads once
        start = time.perf_counter()
        if ray is None and gpus_per_worker > 1 and todo:
            from .batch_ranks import RankedRowRunner

            runner = RankedRowRunner(load, gpus_per_worker)
            try:
                run_local(todo, outputs, load, rejected, runner=runner)
            finally:
                runner.close()
        elif ray is None:
            run_local(todo, outputs, load, rejected)
        else:
            from .scaleout import require_ray

            require_ray()
            from .scaleout.batch import run_on_ray

            run_on_ray(todo, outputs, load, ray, workers, max_retries, rejected, gpus_per_worker)
        summary.seconds = time.perf_counter() - start
    finally:
        outputs.close()
    return summary
