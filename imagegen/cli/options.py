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
from ..options import BY_NAME, OPTIONS, Option, OptionError, UnsupportedOptionError, family_options

F = TypeVar("F", bound=Callable[..., Any])
# the flag's text type per kind ("any": `convert` parses the text)
_TYPES = {"int": int, "float": float, "str": str, "choice": str, "image": Path, "file": Path, "any": str}


def cli_options(options: Sequence[Option] = OPTIONS) -> list[Option]:
    return [o for o in options if "cli" in o.fronts]


def family_flag_options() -> list[Option]:
    """The installed families' options that declare a CLI flag (Option.flag), e.g. Z-Image's --control-image; the
    first declaration of a name wins. The others stay `-O NAME=VALUE`."""
    from .. import registry

    found: dict[str, Option] = {}
    for spec in registry.all_specs():
        for option in family_options(spec.extra_options):
            if option.flag and "cli" in option.fronts and option.name not in BY_NAME:
                found.setdefault(option.name, option)
    return list(found.values())


_FAMILY_FLAGS: dict[str, str] = {}  # family option name -> its flag, once add_flags gave it one


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
            flags = {o.name: kwargs.pop(o.name, None) for o in wrapper.flag_options}  # type: ignore[attr-defined]
            return command(flags=flags, **kwargs)

        params = own + [_parameter(o, help_prefix) for o in options]
        wrapper.__signature__ = signature.replace(parameters=params)  # type: ignore[attr-defined]
        wrapper.flag_options = list(options)  # type: ignore[attr-defined]  (add_flags extends it)
        return wrapper  # type: ignore[return-value]

    return decorate


def add_flags(command: Callable[..., Any], options: Sequence[Option], help_prefix: str = "") -> None:
    """More flags on a `with_flags` command once plugins are loaded (family options with a flag); `command` is the
    registered callback (wrappers over it share the option list and get the new signature)."""
    taken = {o.name for o in command.flag_options}  # type: ignore[attr-defined]
    new = [o for o in options if o.name not in taken]
    if not new:
        return
    command.flag_options.extend(new)  # type: ignore[attr-defined]
    signature = inspect.signature(command)
    params = list(signature.parameters.values()) + [_parameter(o, help_prefix) for o in new]
    command.__signature__ = signature.replace(parameters=params)  # type: ignore[attr-defined]
    _FAMILY_FLAGS.update({o.name: o.cli_flag for o in new})


def label(name: str) -> str:
    """How the CLI names an option: its flag, or `--option NAME` for a family's option."""
    option = next((o for o in OPTIONS if o.name == name), None)
    if option is not None:
        return option.cli_flag
    return _FAMILY_FLAGS.get(name, f"--option {name}")


@contextmanager
def flag_errors() -> Iterator[None]:
    """Option errors from the shared request check, reworded with the CLI's flag names."""
    try:
        yield
    except OptionError as e:
        flagged = any(o.name == e.name for o in OPTIONS) or e.name in _FAMILY_FLAGS
        raise InvalidOptionError(e.render(label(e.name) if flagged else e.name)) from None
    except UnsupportedOptionError as e:
        raise InvalidOptionError(e.render(label(e.name))) from None
