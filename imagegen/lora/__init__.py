"""LoRA and LyCORIS adapters: read any layout, map every key onto imagegen's layers, apply per request.

Families register their key tables through ``ModelSpec.lora_targets`` (naming style -> source name -> parts);
everything else - files, layouts, the adapter math, patching and switching - lives here and names no family.
"""

from .adapters import (
    LoraManager,
    LoraSpec,
    Plan,
    TextPatch,
    current_text_patch,
    lora_metadata,
    lora_replay,
    lora_value,
    parse_cli_lora,
    patched,
    plan_adapter,
    text_adapters,
)
from .apply import LoraLinear, Patcher
from .file import AdapterFile, file_sha256, read_adapter
from .keys import KeyReport, ParsedAdapter, parse_keys
from .targets import Part, Targets, col_split, qwen3_targets, row_blocks, whole, with_aliases

__all__ = [
    "AdapterFile",
    "KeyReport",
    "LoraLinear",
    "LoraManager",
    "LoraSpec",
    "ParsedAdapter",
    "Part",
    "Patcher",
    "Plan",
    "Targets",
    "TextPatch",
    "col_split",
    "current_text_patch",
    "file_sha256",
    "lora_metadata",
    "lora_replay",
    "lora_value",
    "parse_cli_lora",
    "parse_keys",
    "patched",
    "plan_adapter",
    "qwen3_targets",
    "read_adapter",
    "row_blocks",
    "text_adapters",
    "whole",
    "with_aliases",
]
