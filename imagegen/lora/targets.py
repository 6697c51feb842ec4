"""Where an adapter's layer lands in an imagegen model: the vocabulary family key tables are written in.

Adapter files name layers the way their trainer saw the model (diffusers, the original BFL / Z-Image code, ComfyUI).
imagegen fuses and splits some projections at load (FLUX.2's q/k/v, its single blocks' output projection; Z-Image's
q/k/v and w1/w3), so one source layer may fill a block of rows of a fused weight, or feed two split weights with
column slices of itself. A family's table maps every source name it knows to the :class:`Part` s it becomes.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import mlx.nn as nn


@dataclass(frozen=True)
class Part:
    """One imagegen Linear (by module path) that a source layer's delta W_s [out_s, in_s] contributes to.

    rows: the target rows W_s's outputs fill (None: all, out_s == target out);
    cols: the columns of W_s this target reads (None: all, in_s == target in);
    swap_halves: the source orders its two output halves the other way round (BFL's (shift, scale) vs
    diffusers' (scale, shift) in the final norm)."""

    path: str
    rows: tuple[int, int] | None = None
    cols: tuple[int, int] | None = None
    swap_halves: bool = False


Targets = dict[str, tuple[Part, ...]]  # source layer name (dotted, any layout) -> the parts it becomes


def whole(path: str, **kwargs) -> tuple[Part, ...]:
    return (Part(path, **kwargs),)


def row_blocks(fused: str, names: Sequence[str], size: int) -> Targets:
    """Projections fused at load into `fused`, `size` rows each, in the order of `names`."""
    return {name: (Part(fused, rows=(i * size, (i + 1) * size)),) for i, name in enumerate(names)}


def col_split(parts: Sequence[tuple[str, int]]) -> tuple[Part, ...]:
    """A source layer split at load along its inputs into (path, width) pieces, in order."""
    out, start = [], 0
    for path, width in parts:
        out.append(Part(path, cols=(start, start + width)))
        start += width
    return tuple(out)


def with_aliases(targets: Targets, aliases: Iterable[tuple[str, str]]) -> Targets:
    """Add names (alias -> existing name) under which other layouts know the same layers."""
    targets = dict(targets)
    for alias, name in aliases:
        if name in targets:
            targets[alias] = targets[name]
    return targets


def qwen3_targets(model: nn.Module) -> Targets:
    """The shared Qwen3 text encoder's projections, named as transformers names them (with or without `model.`)."""
    targets: Targets = {}
    for i in range(len(model.layers)):
        for sub, names in (
            ("self_attn", ("q_proj", "k_proj", "v_proj", "o_proj")),
            ("mlp", ("gate_proj", "up_proj", "down_proj")),
        ):
            for name in names:
                path = f"layers.{i}.{sub}.{name}"
                targets[path] = targets[f"model.{path}"] = whole(path)
    return targets
