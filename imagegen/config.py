"""Typed configs: frozen pydantic models parsed from HF config.json files (user options: imagegen.options)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Self

from pydantic import BaseModel, ConfigDict, ValidationError

from .errors import WeightsError


class HFConfig(BaseModel):
    """A checkpoint's config.json: known keys typed, unknown keys ignored but recorded."""

    model_config = ConfigDict(frozen=True, extra="ignore", protected_namespaces=())

    unknown_keys: tuple[str, ...] = ()

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Self:
        known = set(cls.model_fields)
        unknown = tuple(sorted(k for k in data if k not in known and not k.startswith("_")))
        try:
            return cls.model_validate({**data, "unknown_keys": unknown})
        except ValidationError as e:
            first = e.errors()[0]
            where = ".".join(str(p) for p in first["loc"])
            raise WeightsError(f"{cls.__name__}: bad value for '{where}': {first['msg']}") from None

    @classmethod
    def from_file(cls, path: str | Path) -> Self:
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise WeightsError(f"Missing config file {path}") from None
        except json.JSONDecodeError as e:
            raise WeightsError(f"{path} is not valid JSON: {e}") from None
        return cls.from_dict(data)
