"""`imagegen serve`: a resident image server with an OpenAI-compatible images API.

FastAPI, uvicorn and python-multipart are the optional extra `imagegen-mlx[serve]`; they are imported only
when a server is built, so `import imagegen` (and this package) never needs them.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from ..errors import ImagegenError, install_hint

if TYPE_CHECKING:
    from fastapi import FastAPI

# import name -> distribution name; python-multipart is importable as python_multipart (>= 0.0.13) or multipart
_NEEDS = {"fastapi": "fastapi", "uvicorn": "uvicorn", "python_multipart|multipart": "python-multipart"}


def require_serve_extra() -> None:
    """One clear line when the extra is missing, instead of an ImportError traceback."""
    missing = [dist for names, dist in _NEEDS.items() if not any(importlib.util.find_spec(n) for n in names.split("|"))]
    if missing:
        raise ImagegenError(f"The server needs {', '.join(missing)}: install them with {install_hint('serve')}.")


def create_app(
    models: Sequence[str] = (), keep_alive: str | float | None = "5m", api_key: str | None = None, **limits: Any
) -> FastAPI:
    """The ASGI app (FastAPI). See imagegen.server.app.create_app."""
    require_serve_extra()
    from .app import create_app as build

    return build(models, keep_alive, api_key, **limits)


def run_server(*args: Any, **options: Any) -> None:
    """Serve until Ctrl-C: imagegen.server.app.run_server, imported when called (it needs the serve extra);
    limits are imagegen.server.settings.Limits."""
    require_serve_extra()
    from .app import run_server as serve

    serve(*args, **options)


__all__ = ["create_app", "require_serve_extra", "run_server"]
