"""Adapter files on disk: tensors, safetensors metadata, and the content hash PNG metadata records."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import mlx.core as mx

from ..errors import LoraError

PEFT_METADATA_KEY = "lora_adapter_metadata"  # diffusers' LORA_ADAPTER_METADATA_KEY: the saved PEFT config


@dataclass(frozen=True, eq=False)
class AdapterFile:
    path: Path
    tensors: dict[str, mx.array]
    metadata: dict[str, str] = field(default_factory=dict)
    sha256: str = ""

    @property
    def name(self) -> str:
        return self.path.name

    def peft_config(self) -> dict[str, Any]:
        """The PEFT LoraConfig diffusers saves with an adapter (r, lora_alpha, rank/alpha patterns), keys without
        their component prefix; {} when absent."""
        raw = self.metadata.get(PEFT_METADATA_KEY)
        if not raw:
            return {}
        try:
            config = json.loads(raw)
        except json.JSONDecodeError:
            return {}
        return {
            k.split(".", 1)[1] if k.startswith(("transformer.", "text_encoder.")) else k: v for k, v in config.items()
        }


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            digest.update(chunk)
    return digest.hexdigest()


def read_adapter(path: str | Path) -> AdapterFile:
    """Read a .safetensors adapter (cached by path, size and modification time: switching back is free)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise LoraError(f"LoRA file not found: {path}")
    stat = os.stat(path)
    return _read(str(path.resolve()), stat.st_size, stat.st_mtime_ns)


@lru_cache(maxsize=8)
def _read(path: str, size: int, mtime: int) -> AdapterFile:
    if not path.endswith(".safetensors"):
        raise LoraError(f"{Path(path).name}: only .safetensors adapter files are read (pickled .ckpt/.pt are not).")
    try:
        tensors, metadata = mx.load(path, return_metadata=True)
        mx.eval(tensors)  # cached and shared across threads: a lazy array would stay bound to this thread's stream
    except Exception as e:  # corrupt, truncated or not safetensors
        raise LoraError(f"Cannot read LoRA file {path}: {e}") from None
    if not tensors:
        raise LoraError(f"LoRA file {path} holds no tensors.")
    return AdapterFile(Path(path), tensors, dict(metadata or {}), file_sha256(path))
