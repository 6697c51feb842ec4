"""First-Block Cache over imagegen's block loop, following diffusers 0.42.1 hooks/first_block_cache.py.

Every step runs the first block. When its residual (output - input of the image stream) moved by less than
`threshold` (mean absolute change relative to the last computed step's residual), the later blocks are skipped and
their last residual is added to the first block's output instead."""

from __future__ import annotations

from dataclasses import dataclass, field

import mlx.core as mx

from imagegen import block_loop
from imagegen.block_loop import BlockLoop, State

DEFAULT_THRESHOLD = 0.05  # diffusers' FirstBlockCacheConfig.threshold


@dataclass
class ContextState:
    """What one context (diffusers' FBCSharedBlockState) keeps between steps."""

    head_output: State | None = None  # the first block's output at the last computed step
    head_residual: mx.array | None = None  # its image-stream residual, the reference for the next decision
    tail_residuals: State | None = None  # later blocks' output - first block's output, per stream
    calls: int = 0
    skipped: list[int] = field(default_factory=list)  # call indices whose later blocks were skipped
    changes: list[float] = field(default_factory=list)  # each decision's measured change (to choose a threshold)

    def should_compute(self, residual: mx.array, threshold: float) -> bool:
        """diffusers' _should_compute_remaining_blocks: the relative mean absolute change of the residual."""
        if self.head_residual is None:
            return True
        previous = self.head_residual
        change = (mx.mean(mx.abs(residual - previous)) / mx.mean(mx.abs(previous))).item()
        self.changes.append(change)
        return change > threshold


class FirstBlockCache:
    """A per-run wrapper (imagegen.block_loop.LoopWrapper); one ContextState per context, as diffusers'
    StateManager keeps one per cache_context."""

    def __init__(self, threshold: float = DEFAULT_THRESHOLD):
        self.threshold = threshold
        self.states: dict[str, ContextState] = {}

    def __call__(self, loop: BlockLoop, state: State) -> State:
        head = loop.head(state)
        plans = []
        for name, part in loop.contexts:
            context = self.states.setdefault(name, ContextState())
            mine = block_loop.rows(head, part)
            residual = mine[0] - block_loop.rows(state, part)[0]
            plans.append((context, part, mine, residual, context.should_compute(residual, self.threshold)))
        # one tail for the whole batch when any context needs it; contexts that skip keep their cached result
        tail = loop.tail(head) if any(plan[-1] for plan in plans) else None
        outputs = []
        for context, part, mine, residual, compute in plans:
            if compute:
                context.head_output, context.head_residual = mine, residual
                out = block_loop.rows(tail, part)
                context.tail_residuals = tuple(o - h for o, h in zip(out, mine))
            else:
                out = tuple(h + r for h, r in zip(mine, context.tail_residuals))
                context.skipped.append(context.calls)
            context.calls += 1
            outputs.append(out)
        return block_loop.join(outputs)

    def skipped(self) -> dict[str, list[int]]:
        """Per context, the calls (steps) whose later blocks were skipped."""
        return {name: list(state.skipped) for name, state in self.states.items()}
