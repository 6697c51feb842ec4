"""Typed configs: frozen pydantic models parsed from HF config.json files (user options: imagegen.options)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, ClassVar, Self

from pydantic import BaseModel, ConfigDict, ValidationError

from .errors import WeightsError


class HFConfig(BaseModel):
    """A checkpoint's config.json: known keys typed, unknown keys ignored but recorded. The keys a class lists
    in `required` must be in a file it reads: a shape taken from another model's defaults loads the wrong model."""

    model_config = ConfigDict(frozen=True, extra="ignore", protected_namespaces=())
    required: ClassVar[tuple[str, ...]] = ()

    unknown_keys: tuple[str, ...] = ()

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "") -> Self:
        where = source or cls.__name__
        if not isinstance(data, dict):
            raise WeightsError(f"{where} must hold a JSON object, not a {type(data).__name__}.")
        known = set(cls.model_fields)
        unknown = tuple(sorted(k for k in data if k not in known and not k.startswith("_")))
        try:
            return cls.model_validate({**data, "unknown_keys": unknown})
        except ValidationError as e:
            first = e.errors()[0]
            field = ".".join(str(p) for p in first["loc"])
            raise WeightsError(f"{where}: bad value for '{field}': {first['msg']}") from None

    @classmethod
    def from_file(cls, path: str | Path) -> Self:
        """Parse a checkpoint's file: it must hold every `required` key (from_dict alone fills in defaults)."""
        data = read_json(path)
        missing = [k for k in cls.required if k not in data] if isinstance(data, dict) else []
        if missing:
            raise WeightsError(f"{path} lacks {', '.join(repr(k) for k in missing)} (needed by {cls.__name__}).")
        return cls.from_dict(data, str(path))


def read_pipeline_index(root: str | Path, classes: tuple[str, ...], family: str) -> dict[str, Any]:
    """A diffusers folder's model_index.json, checked to describe a pipeline of `classes` (its `_class_name`; no
    check when empty): the weights of another family would fail later with a list of mismatched keys, or not at all."""
    path = Path(root) / "model_index.json"
    if not path.exists() and not path.is_symlink():
        raise WeightsError(f"{root} is not a {family} diffusers folder: model_index.json is missing.")
    index = read_json(path)
    if not isinstance(index, dict):
        raise WeightsError(f"{path} must hold a JSON object, not a {type(index).__name__}.")
    name = index.get("_class_name")
    if classes and name is not None and name not in classes:
        raise WeightsError(
            f"{root} holds a {name} checkpoint, not {family} ({' or '.join(classes)}); "
            "pass the weights of the model you asked for, or ask for the model these weights are."
        )
    return index


def read_json(path: str | Path) -> Any:
    """A JSON file of a checkpoint; missing, unreadable (a symlink loop, a folder) or malformed files are one
    WeightsError naming the file."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise WeightsError(f"Missing config file {path}") from None
    except json.JSONDecodeError as e:
        raise WeightsError(f"{path} is not valid JSON: {e}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise WeightsError(f"Cannot read {path}: {getattr(e, 'strerror', None) or e}") from None
