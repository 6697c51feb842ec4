"""The `imagegen` command: a typer app. Plugins add commands through the register_commands hook.

Errors a user can cause (ImagegenError) print as one line and exit 1; Ctrl-C exits 130; anything
else prints one line too, with the traceback only under --debug / IMAGEGEN_DEBUG=1.
"""

from __future__ import annotations

import functools
import os
import sys
import warnings
from collections.abc import Callable
from typing import Any, TypeVar

import typer

from .. import __version__
from ..errors import ImagegenError

app = typer.Typer(
    name="imagegen",
    help="Generate images with MLX models: FLUX.2 Klein, Z-Image and any model a plugin adds.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
_registered = False
F = TypeVar("F", bound=Callable[..., Any])


def _version(value: bool) -> None:
    if value:
        typer.echo(f"imagegen {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Show the version."),
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks for unexpected errors."),
) -> None:
    if debug:
        os.environ["IMAGEGEN_DEBUG"] = "1"


def error(message: str) -> None:
    typer.secho(f"Error: {message}", fg=typer.colors.RED, err=True)


def handle_errors(command: F) -> F:
    """One clear line and a non-zero exit for every failure; a traceback only in debug mode."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except (typer.Exit, typer.Abort):
            raise
        except BrokenPipeError:  # the reader went away (`imagegen info x.png | head -1`): nothing to report
            quiet_closed_pipe()
            raise typer.Exit(0) from None
        except ImagegenError as e:
            error(str(e))
            raise typer.Exit(1) from None
        except KeyboardInterrupt:
            typer.secho("Interrupted.", err=True)
            raise typer.Exit(130) from None
        except Exception as e:
            if os.environ.get("IMAGEGEN_DEBUG") == "1":
                raise
            error(f"{type(e).__name__}: {e} (run with --debug for the traceback)")
            raise typer.Exit(1) from None

    return wrapper  # type: ignore[return-value]


def quiet_closed_pipe() -> None:
    """Point stdout at /dev/null, so the interpreter's final flush does not fail on the closed pipe again."""
    try:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except (OSError, ValueError):  # no real file descriptor (a test runner's captured stdout)
        pass


def take_debug_flag(args: list[str]) -> list[str]:
    """--debug anywhere before a `--` (after the subcommand too): typer knows it only before the subcommand."""
    end = args.index("--") if "--" in args else len(args)
    if "--debug" in args[:end]:
        os.environ["IMAGEGEN_DEBUG"] = "1"
        return [a for i, a in enumerate(args) if not (a == "--debug" and i < end)]
    return args


def get_app() -> typer.Typer:
    """The app with core and plugin commands registered (once)."""
    global _registered
    if not _registered:
        _registered = True
        from .. import plugins
        from . import batch, bench, generate, lora, manage, serve  # noqa: F401  (their @app.command decorators register them)
        from .options import add_flags, family_flag_options

        add_flags(generate.run, family_flag_options(), help_prefix="(models that take it) ")
        for impl in plugins.get_plugin_manager().hook.register_commands.get_hookimpls():
            try:
                impl.function(cli=app)
            except Exception as e:  # a broken plugin must not break the CLI
                warnings.warn(f"imagegen: plugin '{impl.plugin_name}' failed to add commands ({e})", stacklevel=1)
    return app


def main() -> None:
    warnings.formatwarning = lambda msg, *a, **k: f"Warning: {msg}\n"
    get_app()(args=take_debug_flag(sys.argv[1:]), prog_name="imagegen")
