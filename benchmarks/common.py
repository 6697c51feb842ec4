"""Shared pieces of the benchmarks: JSON-line records, the time budget, sections that fail alone, torch timing, memory
freeing, the device and versions, error measures. MLX timing is imagegen's own (imagegen.cli.bench)."""

from __future__ import annotations

import gc
import json
import platform
import statistics
import sys
import time
import traceback
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

from imagegen.errors import DISTRIBUTION

REPO = Path(__file__).resolve().parent.parent
PACKAGES = (
    "mlx",
    "mlx-cuda-13",
    "torch",
    "diffusers",
    "transformers",
    "mflux",
    "imagegen",
    "imagegen-flux2",
    "imagegen-zimage",
    "imagegen-cache",
)


def ensure_imports() -> None:
    """Make imagegen and its in-tree plugins importable from a source checkout that is not pip-installed (the GPU
    machine gets the tree and wheels, not an install), and registered even without entry points."""
    for path in (REPO, *(REPO / "plugins" / f"imagegen-{name}" for name in ("flux2", "zimage", "cache"))):
        if str(path) not in sys.path:
            sys.path.append(str(path))
    import imagegen
    from imagegen import plugins

    names = {info.name for info in plugins.plugin_infos()}
    for name in ("flux2", "zimage", "cache"):
        if name not in names:
            try:
                module = __import__(f"imagegen_{name}.plugin", fromlist=["_"])
                plugins.register_plugin(module, name, f"imagegen-{name}", imagegen.__version__)
            except ImportError:
                pass


class Recorder:
    """Prints each record as one JSON line as soon as it is measured (and appends it to `out`)."""

    def __init__(self, out: Path | None = None, quiet: bool = False):
        self.out, self.quiet = out, quiet
        self.records: list[dict[str, Any]] = []
        if out is not None:
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text("")

    def emit(self, record: dict[str, Any]) -> dict[str, Any]:
        line = json.dumps(record, default=str)
        self.records.append(record)
        if not self.quiet:
            print(line, flush=True)
        if self.out is not None:
            with self.out.open("a") as f:
                f.write(line + "\n")
        return record


class Budget:
    """Seconds left for the run; a section whose estimate does not fit is skipped (and says so)."""

    def __init__(self, seconds: float | None):
        self.seconds = seconds if seconds else None
        self.start = time.perf_counter()

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def remaining(self) -> float:
        return float("inf") if self.seconds is None else self.seconds - self.elapsed()

    def allows(self, estimate: float) -> bool:
        return estimate <= self.remaining()


class Runner:
    """Runs sections: each is selectable, skipped when the budget runs low, and fails alone (the error is
    recorded, the run goes on). A section is a generator yielding result dicts, emitted as they come."""

    def __init__(self, recorder: Recorder, budget: Budget, sections: set[str], cost: float = 1.0):
        self.recorder, self.budget, self.sections, self.cost = recorder, budget, sections, cost

    def wants(self, section: str) -> bool:
        return section in self.sections

    def run(
        self,
        section: str,
        model: str,
        impl: str,
        body: Callable[[], Iterable[dict[str, Any]]],
        estimate_s: float = 0.0,
        **fields: Any,
    ) -> bool:
        """Run one section; True when it finished without an error."""
        if section not in self.sections:
            return False
        base = {"section": section, "model": model, "impl": impl, **fields}
        estimate = estimate_s * self.cost
        if not self.budget.allows(estimate):
            self.recorder.emit(
                {
                    **base,
                    "skipped": f"time budget: ~{estimate:.0f} s needed, {max(self.budget.remaining(), 0):.0f} s left",
                    "t_s": round(self.budget.elapsed(), 1),
                }
            )
            return False
        start = time.perf_counter()
        try:
            for record in body():
                self.recorder.emit({**base, **record, "t_s": round(self.budget.elapsed(), 1)})
            return True
        except SkipSection as e:
            self.recorder.emit({**base, "skipped": str(e), "t_s": round(self.budget.elapsed(), 1)})
        except Exception as e:  # one failing section must not end the run
            tail = traceback.format_exc().strip().splitlines()[-6:]
            self.recorder.emit(
                {
                    **base,
                    "error": f"{type(e).__name__}: {e}",
                    "traceback": tail,
                    "after_s": round(time.perf_counter() - start, 1),
                    "t_s": round(self.budget.elapsed(), 1),
                }
            )
        finally:
            free_memory()
        return False


class SkipSection(Exception):
    """Raised by a section that does not apply (a missing package, a model without that feature)."""


def need(module: str) -> Any:
    """Import an optional package, or skip the section that wants it."""
    try:
        return __import__(module)
    except ImportError as e:
        raise SkipSection(f"{module} is not installed ({e})") from None


def free_memory() -> None:
    """Drop what was freed in Python, then return the allocators' caches (torch, MLX) to the device."""
    gc.collect()
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
    mx = sys.modules.get("mlx.core")
    if mx is not None:
        mx.clear_cache()


def time_torch(fn: Callable[[], Any], warmup: int = 2, repeats: int = 5) -> Any:
    """Median wall time of fn() with the GPU synchronized around it; peak memory of the timed runs (CUDA only)."""
    import torch

    from imagegen.cli.bench import Timing

    cuda = torch.cuda.is_available()

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    with torch.no_grad():  # as the diffusers pipelines run (and what a compiled module was traced under)
        for _ in range(warmup):
            fn()
        sync()
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        runs = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            sync()
            runs.append((time.perf_counter() - start) * 1e3)
    peak = torch.cuda.max_memory_allocated() / 1e9 if cuda else None
    return Timing(statistics.median(runs), tuple(runs), peak)


def errors(got: np.ndarray, want: np.ndarray) -> dict[str, float]:
    """Relative errors of got vs the reference want: max |got - want| / max |want| and mean |got - want| / mean
    |want| (element-wise ratios blow up where the reference is near zero), plus the max absolute error."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    if got.shape != want.shape:
        raise ValueError(f"shapes differ: {got.shape} vs reference {want.shape}")
    diff = np.abs(got - want)
    finite = bool(np.isfinite(got).all() and np.isfinite(want).all())
    return {
        "rel_err": float(diff.max() / max(np.abs(want).max(), 1e-30)),
        "mean_rel_err": float(diff.mean() / max(np.abs(want).mean(), 1e-30)),
        "max_abs_err": float(diff.max()),
        "finite": finite,
    }


def image_difference(got: Any, want: Any) -> dict[str, float]:
    """Pixel differences of two PIL images (0-255): mean and max absolute, and PSNR in dB."""
    a, b = np.asarray(got, np.float64), np.asarray(want, np.float64)
    diff = np.abs(a - b)
    mse = float((diff**2).mean())
    return {
        "pixel_mean_abs": float(diff.mean()),
        "pixel_max_abs": float(diff.max()),
        "psnr_db": float("inf") if mse == 0 else float(10 * np.log10(255**2 / mse)),
    }


def ssim(got: Any, want: Any, window: int = 7) -> float:
    """Mean structural similarity of two PIL images' luma (0-255), over window x window means as scikit-image's
    structural_similarity computes it by default (uniform window, K1 0.01, K2 0.03, sample covariances)."""

    def luma(image: Any) -> np.ndarray:
        return np.asarray(image.convert("L"), np.float64)

    def box(x: np.ndarray) -> np.ndarray:  # the mean of every full window, from a summed-area table
        s = np.pad(x.cumsum(0).cumsum(1), ((1, 0), (1, 0)))
        w = window
        return (s[w:, w:] - s[:-w, w:] - s[w:, :-w] + s[:-w, :-w]) / (w * w)

    a, b = luma(got), luma(want)
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    mean_a, mean_b = box(a), box(b)
    n = window * window
    correction = n / (n - 1)
    var_a = (box(a * a) - mean_a**2) * correction
    var_b = (box(b * b) - mean_b**2) * correction
    cov = (box(a * b) - mean_a * mean_b) * correction
    score = ((2 * mean_a * mean_b + c1) * (2 * cov + c2)) / ((mean_a**2 + mean_b**2 + c1) * (var_a + var_b + c2))
    return float(score.mean())


def versions() -> dict[str, str | None]:
    found = {}
    for name in PACKAGES:
        try:
            found[name] = metadata.version(DISTRIBUTION if name == "imagegen" else name)  # imagegen-mlx
        except metadata.PackageNotFoundError:
            found[name] = None
    if found["imagegen"] is None:
        found["imagegen"] = "source tree"
    return found


def device_name() -> str:
    """The GPU's name (from torch if it sees one), else MLX's device description."""
    try:
        import torch

        if torch.cuda.is_available():
            return torch.cuda.get_device_name(0)
    except ImportError:
        pass
    import mlx.core as mx

    info = mx.device_info()
    return str(info.get("device_name") or info.get("architecture") or mx.default_device())


def header(args: dict[str, Any]) -> dict[str, Any]:
    import mlx.core as mx

    return {
        "section": "header",
        "device": device_name(),
        "mlx_device": str(mx.default_device()),
        "date": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "python": platform.python_version(),
        "host": platform.node(),
        "versions": versions(),
        "args": args,
    }


def start_run(args: Any) -> Recorder:
    """The opening of a benchmark script: tiny runs on the CPU, imagegen and the in-tree plugins importable, and
    the header line (device, versions, arguments) recorded to args.out."""
    import mlx.core as mx

    if getattr(args, "tiny", False):
        mx.set_default_device(mx.cpu)
    ensure_imports()
    recorder = Recorder(args.out)
    recorder.emit(header({k: sorted(v) if isinstance(v, set) else v for k, v in vars(args).items()}))
    return recorder


def round_floats(record: dict[str, Any], digits: int = 4) -> dict[str, Any]:
    return {k: (float(f"{v:.{digits}g}") if isinstance(v, float) else v) for k, v in record.items()}
