"""Terminal progress with rich: component loads, denoise steps with it/s, decode. Silent when quiet."""

from __future__ import annotations

import sys
from types import TracebackType

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from ..pipeline import Step


class RunProgress:
    """Context manager; pass `on_load` to spec.pipeline and `on_step` to generate."""

    def __init__(self, quiet: bool = False):
        self.quiet = quiet or not sys.stderr.isatty()
        self.console = Console(stderr=True)
        self._progress: Progress | None = None
        self._task = None

    def __enter__(self) -> RunProgress:
        if not self.quiet:
            self._progress = Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[rate]}"),
                TimeElapsedColumn(),
                console=self.console,
                transient=True,
            )
            self._progress.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None, tb: TracebackType | None) -> None:
        if self._progress is not None:
            self._progress.stop()

    def note(self, text: str) -> None:
        if not self.quiet:
            self.console.print(text, highlight=False)

    def on_load(self, component: str, seconds: float) -> None:
        self.note(f"[dim]loaded {component} in {seconds:.1f}s[/dim]")

    def on_step(self, step: Step) -> None:
        if self._progress is None:
            return
        if step.stage == "encode":
            self.note(f"[dim]encoded prompt in {step.seconds:.2f}s[/dim]")
        elif step.stage == "denoise":
            if self._task is None:
                self._task = self._progress.add_task("denoising", total=step.total, rate="")
            rate = f"{1 / step.seconds:.2f} it/s" if step.seconds > 0 else ""
            self._progress.update(self._task, completed=step.index, rate=rate)
        elif step.stage == "decode":
            self.note(f"[dim]decoded in {step.seconds:.2f}s[/dim]")
