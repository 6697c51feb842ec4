"""API errors as OpenAI reports them: an HTTP status and {"error": {message, type, param, code}}."""

from __future__ import annotations

from typing import Any

from ..errors import (
    ImagegenError,
    InvalidImageError,
    InvalidOptionError,
    UnknownModelError,
    WeightsError,
    WeightsNotFoundError,
)
from .worker import QueueFullError


class APIError(Exception):
    """An error answer; `type` follows OpenAI ("invalid_request_error", "server_error", ...)."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def api_error(e: Exception, param: str | None = None) -> APIError:
    """The answer for any exception: 4xx for what the caller can fix, 500 for everything else."""
    if isinstance(e, APIError):
        return e
    if isinstance(e, UnknownModelError):
        hint = f" Did you mean: {', '.join(e.suggestions)}?" if e.suggestions else ""
        return APIError(404, f"Unknown model '{e.name}'.{hint} GET /v1/models lists them.", param="model",
                        code="model_not_found")
    if isinstance(e, QueueFullError):
        return APIError(429, f"The server is busy: {e}", "rate_limit_error", code="queue_full",
                        headers={"Retry-After": "1"})
    if isinstance(e, InvalidImageError):
        return APIError(400, str(e), param=param or "image", code="invalid_image")
    if isinstance(e, InvalidOptionError):
        return APIError(400, str(e), param=param, code="invalid_value")
    if isinstance(e, WeightsNotFoundError | WeightsError):
        return APIError(400, str(e), param="model", code="model_not_available")
    if isinstance(e, ImagegenError):
        return APIError(400, str(e), param=param)
    return APIError(500, f"Generation failed: {type(e).__name__}: {e}", "server_error", code="generation_failed")
