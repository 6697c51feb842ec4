"""The transformer block loop as plugins may wrap it.

A family runs its main blocks through :func:`run` as `head` (the first block) and `tail` (every later block), both
mapping a state tuple to one of the same shapes. A plugin offers a request option (``register_block_loop_options``);
when a request sets it, the plugin's per-run wrapper receives the loop and decides how to get the tail's result: run
it, or reuse what it kept from earlier steps. Without one, ``tail(head(state))`` runs as before.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import mlx.core as mx

from .errors import InvalidOptionError
from .plugins import get_plugin_manager

if TYPE_CHECKING:
    from .options import Option
    from .request import Request

# The streams a block passes on: state[0] is the image stream [B, N, D]; any further entries are other streams
# (FLUX.2's text) whose rows follow the same batch order.
State = tuple[mx.array, ...]
Block = Callable[[State], State]


@dataclass(frozen=True)
class BlockLoop:
    """One transformer call's block loop, split so a wrapper can run the first block alone."""

    head: Block  # the first block
    tail: Block  # every later block, back to the head's output shapes
    # (name, rows) for each part of the batch that the reference runs as its own call (diffusers' cache_context:
    # "cond" and "uncond" when a pipeline runs CFG as two calls); one entry covering every row otherwise
    contexts: tuple[tuple[str, slice], ...] = (("cond", slice(None)),)


class LoopWrapper(Protocol):
    """A plugin's wrapper for one run: called once per transformer call, returns what `tail(head(state))` would."""

    def __call__(self, loop: BlockLoop, state: State) -> State: ...


@dataclass(frozen=True)
class BlockLoopOption:
    """A request option that wraps the block loop of every model whose spec sets ``block_loop=True``: declared as
    any other option (it joins those models' family options, so it travels through every front end), plus how
    to start its wrapper."""

    option: Option  # e.g. imagegen.Option("cache", "any", "...", convert=parse): None from `convert` means off
    start: Callable[[Any, Request], LoopWrapper]  # (checked value, request) -> a fresh wrapper for one run

    @property
    def name(self) -> str:
        return self.option.name


def run(wrapper: LoopWrapper | None, loop: BlockLoop, state: State) -> State:
    """The loop's result: `tail(head(state))`, or whatever the run's wrapper makes of it."""
    if wrapper is None:
        return loop.tail(loop.head(state))
    return wrapper(loop, state)


def options() -> dict[str, BlockLoopOption]:
    """Every block-loop option the loaded plugins offer, by name; a plugin that fails to register is a warning."""
    found: dict[str, BlockLoopOption] = {}
    for impl in get_plugin_manager().hook.register_block_loop_options.get_hookimpls():
        mine: list[BlockLoopOption] = []
        try:
            impl.function(register=mine.append)
        except Exception as e:  # third-party code
            warnings.warn(f"imagegen: plugin '{impl.plugin_name}' failed to register options ({e})", stacklevel=2)
            continue
        for option in mine:
            if option.name in found:
                warnings.warn(
                    f"imagegen: option '{option.name}' of plugin '{impl.plugin_name}' is already taken; skipped",
                    stacklevel=2,
                )
                continue
            found[option.name] = option
    return found


def start(request: Request) -> LoopWrapper | None:
    """The wrapper for one run of `request`: from the one block-loop option it sets (not None), or None."""
    offered = options()
    chosen = [name for name in offered if request.option(name) is not None]
    if len(chosen) > 1:
        raise InvalidOptionError(f"Options {', '.join(chosen)} each wrap the transformer blocks; use one at a time.")
    if not chosen:
        return None
    return offered[chosen[0]].start(request.option(chosen[0]), request)


def rows(state: State, part: slice) -> State:
    """The rows of one context of the batch (the state itself when the context covers every row)."""
    return state if part == slice(None) else tuple(a[part] for a in state)


def join(parts: list[State]) -> State:
    """Stack the contexts' states back into the batch, in the order of `BlockLoop.contexts`."""
    return parts[0] if len(parts) == 1 else tuple(mx.concatenate(arrays) for arrays in zip(*parts))
