"""Replaying the adapters a PNG's metadata records (`imagegen run --from`): find each file again and check its hash."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..errors import LoraError
from .adapters import LoraSpec
from .file import read_adapter


def replay_loras(saved: list[dict[str, Any]], search: list[Path] = ()) -> tuple[tuple[LoraSpec, ...], list[str]]:
    """The recorded adapters as specs, and a warning for each whose file now has other contents. A recorded file
    found neither at its path nor by name in `search` (then the current folder) is an error naming it."""
    specs, warnings = [], []
    for entry in saved:
        name, sha = entry.get("name", ""), entry.get("sha256", "")
        candidates = [Path(entry.get("path", name)), *(Path(folder) / name for folder in search), Path(name)]
        found = next((p for p in candidates if p.is_file()), None)
        if found is None:
            raise LoraError(f"The image was made with LoRA '{name}' (sha256 {sha[:12]}...), which is not at "
                            f"{candidates[0]}: pass it again with --lora PATH:{entry.get('scale', 1.0)}.")
        if sha and read_adapter(found).sha256 != sha:
            warnings.append(f"LoRA {found} differs from the one the image was made with (sha256 {sha[:12]}...); "
                            "the result will differ.")
        specs.append(LoraSpec(str(found), float(entry.get("scale", 1.0))))
    return tuple(specs), warnings
