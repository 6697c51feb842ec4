"""Hook specifications: what a plugin may implement. Each hook receives a callback, never globals."""

from __future__ import annotations

from collections.abc import Callable

import pluggy

hookspec = pluggy.HookspecMarker("imagegen")
hookimpl = pluggy.HookimplMarker("imagegen")


@hookspec
def register_models(register: Callable) -> None:
    """Register model specs: call ``register(spec)`` once per :class:`imagegen.ModelSpec`."""


@hookspec
def register_commands(cli) -> None:
    """Add commands to the ``imagegen`` typer app (``cli``), e.g. ``@cli.command()``."""


@hookspec
def register_block_loop_options(register: Callable) -> None:
    """Offer request options that wrap the transformer block loop of every model whose spec sets
    ``block_loop=True``: call ``register(option)`` once per :class:`imagegen.block_loop.BlockLoopOption`."""
