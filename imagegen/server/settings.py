"""Server settings: request limits and the duration / byte-size strings the command line accepts."""

from __future__ import annotations

import re
from dataclasses import dataclass, fields
from typing import Any

from ..errors import InvalidOptionError

_DURATION = re.compile(r"^\s*(-?\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$", re.IGNORECASE)
_SECONDS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}
_BYTES = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?i?b?)?\s*$", re.IGNORECASE)
_POWERS = {"": 0, "k": 1, "m": 2, "g": 3, "t": 4}


def parse_duration(value: str | float | int | None) -> float | None:
    """Keep-alive as seconds: "5m", "30s", "1h", a number of seconds; "0" unloads at once after each
    request; a negative value, "forever" or None keeps models loaded (Ollama's convention)."""
    if value is None:
        return None
    if isinstance(value, int | float):
        seconds = float(value)
    else:
        if value.strip().lower() in ("forever", "inf", "never"):
            return None
        match = _DURATION.match(value)
        if match is None:
            raise InvalidOptionError(f"Cannot read '{value}' as a duration: use e.g. 30s, 5m, 1h, 0 or -1.")
        seconds = float(match.group(1)) * _SECONDS[(match.group(2) or "s").lower()]
    return None if seconds < 0 else seconds


def parse_bytes(value: str | int | None) -> int | None:
    """A memory size: bytes as a number, or "16GB", "512MiB", "8g" (powers of 1024)."""
    if value is None or isinstance(value, int):
        return value
    match = _BYTES.match(value)
    if match is None:
        raise InvalidOptionError(f"Cannot read '{value}' as a memory size: use e.g. 16GB or 512MB.")
    unit = (match.group(2) or "").lower()[:1]
    return int(float(match.group(1)) * 1024 ** _POWERS[unit if unit in _POWERS else ""])


@dataclass(frozen=True)
class Limits:
    """What one request (and the server as a whole) may ask for; `run_server(**limits)` sets them."""

    max_body_bytes: int = 32 * 1024**2  # a JSON body or a multipart upload (all images together)
    max_images_in: int = 8  # reference images per edit request
    max_n: int = 10  # images per request (OpenAI's limit)
    max_steps: int = 200
    max_queue: int = 64  # requests waiting for the device; more are refused with 429
    max_queue_per_client: int = 16  # of those, from one client address (a quarter of the queue)
    # 512 tokens (all FLUX.2 and Z-Image read of a prompt) at ~8 characters each: twice English's ~4
    max_prompt_chars: int = 4096
    max_batch: int = 10  # images per pipeline call; fewer when memory is short
    max_memory: int | None = None  # bytes for resident models; None = available memory at start
    url_ttl: float = 3600.0  # seconds a response_format="url" image stays downloadable
    max_stored_bytes: int = 512 * 1024**2  # URL images kept in memory; the oldest go first
    shutdown_grace: float = 30.0  # seconds in-flight requests may finish after SIGTERM / Ctrl-C

    @classmethod
    def from_options(cls, **options: Any) -> Limits:
        """Build from keyword options (CLI / run_server); sizes and durations may be strings, None
        means the default."""
        options = {k: v for k, v in options.items() if v is not None}
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(options) - names)
        if unknown:
            known = ", ".join(sorted(names))
            raise InvalidOptionError(f"Unknown server limit(s): {', '.join(unknown)} (known: {known}).")
        if "max_memory" in options:
            options["max_memory"] = parse_bytes(options["max_memory"])
        for name in ("max_body_bytes", "max_stored_bytes"):
            if isinstance(options.get(name), str):
                options[name] = parse_bytes(options[name])
        for name in ("url_ttl", "shutdown_grace"):
            if isinstance(options.get(name), str):
                seconds = parse_duration(options[name])
                options[name] = getattr(cls, name) if seconds is None else seconds
        for name, value in options.items():
            if name != "max_memory" and isinstance(value, int | float) and value < 0:
                raise InvalidOptionError(f"The server limit {name} cannot be negative, got {value}.")
        return cls(**options)
