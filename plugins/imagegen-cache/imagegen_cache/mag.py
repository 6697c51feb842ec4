"""MagCache over imagegen's block loop, following diffusers 0.42.1 hooks/mag_cache.py.

A model's residual (output - input of the block loop) changes in magnitude from step to step by a ratio that is
nearly the same for every prompt: a checkpoint's "mag ratios", measured once by a calibration run. After the first
`retention` share of the steps, MagCache multiplies up the ratios since the last computed step; while the
accumulated error stays within `threshold` (and at most `max_skip_steps` steps in a row), the whole block loop is
skipped and the last residual is added to the input instead."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx
import numpy as np

from imagegen import block_loop
from imagegen.block_loop import BlockLoop, State

# diffusers' MagCacheConfig defaults
DEFAULT_THRESHOLD = 0.06
DEFAULT_MAX_SKIP_STEPS = 3
DEFAULT_RETENTION = 0.2


def nearest_interp(ratios: Sequence[float], length: int) -> np.ndarray:
    """diffusers' nearest_interp: resample the calibrated ratios to `length` steps (float32, round half to even)."""
    source = np.asarray(ratios, dtype=np.float32)
    if length == 1:
        return source[-1:]
    scale = np.float32((len(source) - 1) / (length - 1))
    return source[np.round(np.arange(length, dtype=np.float32) * scale).astype(np.int64)]


@dataclass
class ContextState:
    """What one context (diffusers' MagCacheState) keeps between steps; the accumulators are float32 as there."""

    previous_residual: mx.array | None = None
    accumulated_ratio: np.float32 = np.float32(1.0)
    accumulated_err: np.float32 = np.float32(0.0)
    accumulated_steps: int = 0
    step: int = 0
    calls: int = 0
    skipped: list[int] = field(default_factory=list)
    calibration: list[float] = field(default_factory=list)

    def reset_accumulators(self) -> None:
        self.accumulated_ratio, self.accumulated_err, self.accumulated_steps = np.float32(1.0), np.float32(0.0), 0


class MagCache:
    """A per-run wrapper (imagegen.block_loop.LoopWrapper). `ratios` None with `calibrate`: compute every step and
    measure the ratios, written as a JSON list to `calibration_file` when the run ends."""

    def __init__(
        self,
        steps: int,
        ratios: Sequence[float] | None = None,
        threshold: float = DEFAULT_THRESHOLD,
        max_skip_steps: int = DEFAULT_MAX_SKIP_STEPS,
        retention: float = DEFAULT_RETENTION,
        calibrate: bool = False,
        calibration_file: Path | None = None,
    ):
        self.steps, self.calibrate, self.calibration_file = steps, calibrate, calibration_file
        self.ratios = (
            None
            if ratios is None
            else nearest_interp(ratios, steps)
            if len(ratios) != steps
            else (np.asarray(ratios, dtype=np.float32))
        )
        self.threshold, self.max_skip_steps = np.float32(threshold), max_skip_steps
        self.retention_step = int(retention * steps + 0.5)
        self.states: dict[str, ContextState] = {}
        self.calibrations: dict[str, list[float]] = {}  # per context, the ratios of each finished calibration run

    def should_compute(self, state: ContextState) -> bool:
        """MagCacheHeadHook's decision for this context's current step."""
        if self.calibrate:
            return True
        scale = self.ratios[state.step] if state.step < len(self.ratios) else np.float32(1.0)
        if state.step < self.retention_step:
            return True
        state.accumulated_ratio = np.float32(state.accumulated_ratio * scale)
        state.accumulated_steps += 1
        state.accumulated_err = np.float32(state.accumulated_err + abs(np.float32(1.0) - state.accumulated_ratio))
        if (
            state.previous_residual is not None
            and state.accumulated_err <= self.threshold
            and state.accumulated_steps <= self.max_skip_steps
        ):
            return False
        state.reset_accumulators()
        return True

    def __call__(self, loop: BlockLoop, state: State) -> State:
        plans = []
        for name, part in loop.contexts:
            context = self.states.setdefault(name, ContextState())
            plans.append((name, context, part, self.should_compute(context)))
        out_all = loop.tail(loop.head(state)) if any(plan[-1] for plan in plans) else None
        outputs = []
        for name, context, part, compute in plans:
            given = block_loop.rows(state, part)
            if compute:
                out = block_loop.rows(out_all, part)
                residual = out[0] - given[0]
                if self.calibrate:
                    context.calibration.append(self._ratio(context.previous_residual, residual))
                context.previous_residual = residual
            else:  # the input plus the last residual; other streams pass through, as diffusers' hooks return them
                out = (given[0] + context.previous_residual, *given[1:])
                context.skipped.append(context.calls)
            context.calls += 1
            self._advance(name, context)
            outputs.append(out)
        return block_loop.join(outputs)

    @staticmethod
    def _ratio(previous: mx.array | None, current: mx.array) -> float:
        """diffusers' calibration: the mean over tokens of |current| / |previous| (1.0 for the first step)."""
        if previous is None:
            return 1.0
        now = mx.linalg.norm(current.astype(mx.float32), axis=-1)
        before = mx.linalg.norm(previous.astype(mx.float32), axis=-1)
        return mx.mean(now / (before + 1e-8)).item()

    def _advance(self, name: str, context: ContextState) -> None:
        """diffusers' _advance_step: past the last step, everything but the skip record starts over."""
        context.step += 1
        if context.step < self.steps:
            return
        if self.calibrate:
            self.calibrations.setdefault(name, []).append(list(context.calibration))
            if self.calibration_file is not None and name == next(iter(self.states)):
                self.calibration_file.write_text(json.dumps(context.calibration) + "\n")
        context.step, context.previous_residual, context.calibration = 0, None, []
        context.reset_accumulators()

    def skipped(self) -> dict[str, list[int]]:
        """Per context, the calls (steps) whose blocks were skipped."""
        return {name: list(state.skipped) for name, state in self.states.items()}
