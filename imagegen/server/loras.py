"""The adapters a server offers: the .safetensors files of `imagegen serve --lora-dir DIR`, named by file name only
(a client never gives a path)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..lora import LoraSpec, read_adapter
from .errors import APIError


class LoraFolder:
    def __init__(self, folder: str | Path | None):
        self.folder = Path(folder).expanduser().resolve() if folder else None

    def files(self) -> list[Path]:
        if self.folder is None or not self.folder.is_dir():
            return []
        return sorted(p for p in self.folder.glob("*.safetensors") if p.is_file())

    def resolve(self, refs: Sequence[Any] | None) -> tuple[LoraSpec, ...]:
        """[{"name", "scale"}] -> specs of files inside the folder; anything else is a 400 naming the field."""
        if not refs:
            return ()
        if self.folder is None:
            raise APIError(
                400,
                "This server offers no LoRA adapters (start it with --lora-dir DIR).",
                param="loras",
                code="unsupported_option",
            )
        specs = []
        for ref in refs:
            name = ref.name
            path = self.folder / name
            if Path(name).name != name or name.startswith(".") or not path.is_file():
                raise APIError(
                    400,
                    f"No LoRA named '{name}': GET /v1/loras lists the adapters this server offers.",
                    param="loras",
                    code="invalid_value",
                )
            specs.append(LoraSpec(str(path), ref.scale))
        return tuple(specs)

    def listing(self) -> list[dict[str, Any]]:
        """Name, size and content hash of each offered adapter (hashes are cached per file version)."""
        return [{"name": p.name, "bytes": p.stat().st_size, "sha256": read_adapter(p).sha256} for p in self.files()]
