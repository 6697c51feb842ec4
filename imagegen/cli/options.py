"""CLI flags derived from the option declarations (imagegen.options), and option errors worded with the flags."""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import typer

from ..errors import InvalidOptionError
from ..options import OPTIONS, Option, OptionError, UnsupportedOptionError

F = TypeVar("F", bound=Callable[..., Any])
# the flag's text type per kind ("any": `convert` parses the text)
_TYPES = {"int": int, "float": float, "str": str, "choice": str, "image": Path, "file": Path, "any": str}


def cli_options(options: Sequence[Option] = OPTIONS) -> list[Option]:
    return [o for o in options if "cli" in o.fronts]


def _parameter(option: Option, help_prefix: str = "") -> inspect.Parameter:
    names = [option.cli_flag, *([option.short] if option.short else [])]
    text = help_prefix + option.help + (f" [{option.rule}]" if option.kind in ("int", "float", "choice") else "")
    if option.kind == "bool":
        default, annotation = typer.Option(False, *names, help=text), bool
    else:
        kind = _TYPES[option.kind]
        annotation = list[kind] if option.repeatable else kind  # type: ignore[valid-type]
        default = typer.Option(None, *names, help=text)
    return inspect.Parameter(option.name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=annotation)


def with_flags(options: Sequence[Option], help_prefix: str = "") -> Callable[[F], F]:
    """The command takes one flag per declared option besides its own parameters; their values reach it as
    `flags` ({name: value}, None / False where not given)."""

    def decorate(command: F) -> F:
        signature = inspect.signature(command)
        own = [p for p in signature.parameters.values() if p.name != "flags"]

        @functools.wraps(command)
        def wrapper(**kwargs: Any) -> Any:
            flags = {o.name: kwargs.pop(o.name, None) for o in options}
            return command(flags=flags, **kwargs)

        params = own + [_parameter(o, help_prefix) for o in options]
        wrapper.__signature__ = signature.replace(parameters=params)  # type: ignore[attr-defined]
        return wrapper  # type: ignore[return-value]

    return decorate


def label(name: str) -> str:
    """How the CLI names an option: its flag, or `--option NAME` for a family's option."""
    option = next((o for o in OPTIONS if o.name == name), None)
    return option.cli_flag if option is not None else f"--option {name}"


@contextmanager
def flag_errors() -> Iterator[None]:
    """Option errors from the shared request check, reworded with the CLI's flag names."""
    try:
        yield
    except OptionError as e:
        core = any(o.name == e.name for o in OPTIONS)
        raise InvalidOptionError(e.render(label(e.name) if core else e.name)) from None
    except UnsupportedOptionError as e:
        raise InvalidOptionError(e.render(label(e.name))) from None
