"""API errors as OpenAI reports them: an HTTP status and {"error": {message, type, param, code}}.

Messages never show the server's file paths (a weights folder, a home directory): the client sees
".../name", the log keeps the whole message.
"""

from __future__ import annotations

import logging
import re
from typing import Any

from ..errors import (
    ImagegenError,
    InvalidImageError,
    InvalidOptionError,
    UnknownModelError,
    WeightsError,
    WeightsNotFoundError,
)
from .residency import OverBudgetError
from .schemas import BodyError
from .worker import QueueFullError, ShuttingDown

log = logging.getLogger("imagegen.server")
# An absolute path of at least one folder: after a space, quote or bracket (not inside a URL, a fraction
# or an API route such as /v1/models); the last part, the file's own name, is kept.
_SERVER_PATH = re.compile(r"(?<![\w.~:/\\-])/(?!v1/)(?:[^\s/'\"`]+/)+(?=[^\s/'\"`]*)")


def hide_paths(message: str) -> str:
    return _SERVER_PATH.sub(".../", message)


class APIError(Exception):
    """An error answer; `type` follows OpenAI ("invalid_request_error", "server_error", ...)."""

    def __init__(
        self,
        status: int,
        message: str,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        public = hide_paths(message)
        if public != message:
            log.info("answered %d (paths hidden from the client): %s", status, message)
        super().__init__(public)
        self.status, self.message, self.type, self.param, self.code = status, public, type, param, code
        self.headers = headers

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def api_error(e: Exception, param: str | None = None) -> APIError:
    """The answer for any exception: 4xx for what the caller can fix, 5xx for everything else."""
    if isinstance(e, APIError):
        return e
    if isinstance(e, UnknownModelError):
        hint = f" Did you mean: {', '.join(e.suggestions)}?" if e.suggestions else ""
        return APIError(
            404, f"Unknown model '{e.name}'.{hint} GET /v1/models lists them.", param="model", code="model_not_found"
        )
    if isinstance(e, QueueFullError):
        return APIError(429, f"The server is busy: {e}", "rate_limit_error", code=e.code, headers={"Retry-After": "1"})
    if isinstance(e, ShuttingDown):
        return APIError(503, str(e), "server_error", code="server_shutting_down", headers={"Retry-After": "5"})
    if isinstance(e, BodyError):
        return APIError(400, str(e), param=e.param or param, code=e.code)
    if isinstance(e, InvalidImageError):
        return APIError(400, str(e), param=param or "image", code="invalid_image")
    if isinstance(e, InvalidOptionError):
        return APIError(400, str(e), param=param, code="invalid_value")
    if isinstance(e, WeightsNotFoundError | WeightsError):
        return APIError(400, str(e), param="model", code="model_not_available")
    if isinstance(e, OverBudgetError):
        return APIError(400, str(e), param="model", code="insufficient_memory")
    if isinstance(e, ImagegenError):
        return APIError(400, str(e), param=param, code="invalid_request")
    return APIError(500, f"Generation failed: {type(e).__name__}: {e}", "server_error", code="generation_failed")
