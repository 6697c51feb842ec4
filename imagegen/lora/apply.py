"""Putting adapters into a module tree and taking them out again.

Each adapted Linear is replaced by a new module; the original module object is kept aside untouched and put back
on restore, so nothing a request changes outlives it and no shared array is ever written. A dense Linear gets a
copy whose weight has the deltas merged in (free at run time). A QuantizedLinear keeps its quantized weight and
gets a side path: one low-rank product for all LoRA / LoHa terms (fused q/k/v pieces become row blocks of one
up matrix), a Kronecker product for a whole-layer LoKr (A X B^T, never materialised), a dense matmul otherwise.
Merging into a quantized weight would re-round it: never done.
"""

from __future__ import annotations

import copy
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from ..errors import LoraError
from ..nn.fp8_linear import Fp8Linear
from .deltas import Delta, LohaDelta, LokrDelta, LoraDelta
from .targets import Part

Terms = dict[str, list[tuple[Delta, Part]]]  # imagegen layer path -> (delta, where it lands)


def module_at(root: nn.Module, path: str) -> tuple[Any, Any, Any]:
    """(parent, key, module) for a dotted path through modules, lists (integer keys) and dicts."""
    parent, key, node = None, None, root
    for piece in path.split("."):
        parent = node
        key = int(piece) if isinstance(node, list | tuple) and piece.isdigit() else piece
        try:
            node = node[key]
        except (KeyError, IndexError, TypeError):
            raise LoraError(f"no layer '{path}' in {type(root).__name__}") from None
    return parent, key, node


def layer_shape(module: Any) -> tuple[int, int] | None:
    """(out, in) of a Linear, QuantizedLinear or Fp8Linear (or of an adapted one); None for anything else."""
    if isinstance(module, LoraLinear):
        return layer_shape(module.base)
    if isinstance(module, nn.QuantizedLinear):
        return module.weight.shape[0], module.scales.shape[-1] * module.group_size
    if isinstance(module, nn.Linear | Fp8Linear):  # an Fp8Linear's weight has one byte per value
        return tuple(module.weight.shape)
    return None


def check_part(delta: Delta, part: Part, module: Any, source: str, file: str) -> None:
    """The source layer's delta must fit the part of the target layer it lands in: name both shapes if not."""
    shape = layer_shape(module)
    if shape is None:
        raise LoraError(f"{file}: layer '{source}' maps to {part.path}, which is not a Linear layer.")
    out, inp = shape
    want_out = part.rows[1] - part.rows[0] if part.rows else out
    have_out, have_in = delta.shape
    ok_in = (part.cols[1] <= have_in and part.cols[1] - part.cols[0] == inp) if part.cols else have_in == inp
    if have_out != want_out or not ok_in:
        want_in = f">={part.cols[1]}" if part.cols else str(inp)
        raise LoraError(
            f"{file}: layer '{source}' has shape ({have_out}, {have_in}) but the model's {part.path} "
            f"needs ({want_out}, {want_in}): an adapter for another model or model size?"
        )


def _swap(x: mx.array) -> mx.array:
    half = x.shape[0] // 2
    return mx.concatenate([x[half:], x[:half]])


def _placed_dense(delta: Delta, part: Part, shape: tuple[int, int]) -> mx.array:
    d = delta.dense()
    if part.cols:
        d = d[:, part.cols[0] : part.cols[1]]
    if part.swap_halves:
        d = _swap(d)
    if part.rows:
        d = mx.pad(d, [(part.rows[0], shape[0] - part.rows[1]), (0, 0)])
    return d


def _placed_factors(delta: LoraDelta | LohaDelta, part: Part, out: int) -> tuple[mx.array, mx.array]:
    down, up = delta.factors()
    if part.cols:
        down = down[:, part.cols[0] : part.cols[1]]
    if part.swap_halves:
        up = _swap(up)
    if part.rows:
        up = mx.pad(up, [(part.rows[0], out - part.rows[1]), (0, 0)])
    return down, up


class LoraLinear(nn.Module):
    """A (quantized) Linear plus adapter side paths; built by :class:`Patcher`, never saved."""

    def __init__(
        self,
        base: nn.Module,
        down_t: mx.array | None,
        up_t: mx.array | None,
        krons: Sequence[tuple[mx.array, mx.array]],
        dense_t: mx.array | None,
    ):
        super().__init__()
        self.base = base
        self.down_t, self.up_t, self.dense_t = down_t, up_t, dense_t  # [in, r], [r, out], [in, out]
        self.krons = list(krons)  # (A [a_out, a_in], B [b_out, b_in]) with kron(A, B) = delta

    def __call__(self, x: mx.array) -> mx.array:
        y = self.base(x)
        if self.down_t is not None:  # the add rides in the GEMM's epilogue: no extra pass over y
            y = mx.addmm(y, x @ self.down_t, self.up_t)
        for a, b in self.krons:
            blocks = x.reshape(*x.shape[:-1], a.shape[1], b.shape[1]) @ b.T  # [..., a_in, b_out]
            y = y + (a @ blocks).reshape(y.shape)
        if self.dense_t is not None:
            y = mx.addmm(y, x, self.dense_t)
        return y


def merged(module: nn.Linear, items: Sequence[tuple[Delta, Part, float]]) -> nn.Linear:
    """A shallow copy of a dense Linear with the scaled deltas added to its weight (rounded once)."""
    shape = tuple(module.weight.shape)
    total = sum(_placed_dense(delta, part, shape) * scale for delta, part, scale in items)
    new = copy.copy(module)
    new.weight = (module.weight.astype(mx.float32) + total).astype(module.weight.dtype)
    return new


def side_path(module: nn.Module, items: Sequence[tuple[Delta, Part, float]], dtype: mx.Dtype) -> LoraLinear:
    """`dtype`: the activations' (a quantized layer's scales may be integers, e.g. mxfp8's E8M0)."""
    out, _ = layer_shape(module)
    downs, ups, krons, dense = [], [], [], None
    for delta, part, scale in items:
        if isinstance(delta, LoraDelta | LohaDelta):
            down, up = _placed_factors(delta, part, out)
            downs.append(down)
            ups.append(up * scale)
        elif isinstance(delta, LokrDelta) and part == Part(part.path):
            a, b = delta.kron()
            krons.append(((a * scale).astype(dtype), b.astype(dtype)))
        else:
            d = _placed_dense(delta, part, layer_shape(module)) * scale
            dense = d if dense is None else dense + d
    down_t = mx.concatenate(downs).T.astype(dtype) if downs else None
    up_t = mx.concatenate(ups, axis=1).T.astype(dtype) if ups else None
    return LoraLinear(module, down_t, up_t, krons, None if dense is None else dense.T.astype(dtype))


class Patcher:
    """Installs the scaled sum of several adapters into one module tree, and restores the original layers."""

    def __init__(self, root: nn.Module, dtype: mx.Dtype = mx.float32):
        self.root, self.dtype = root, dtype  # dtype: the model's activations, which side paths compute in
        self.originals: dict[str, nn.Module] = {}

    def apply(self, adapters: Sequence[tuple[Terms, float]]) -> None:
        self.restore()
        by_path: dict[str, list[tuple[Delta, Part, float]]] = defaultdict(list)
        for terms, scale in adapters:
            for path, items in terms.items():
                by_path[path] += [(delta, part, scale) for delta, part in items]
        for path, items in by_path.items():
            parent, key, module = module_at(self.root, path)
            dense = isinstance(module, nn.Linear) and not isinstance(module, nn.QuantizedLinear)
            new = merged(module, items) if dense else side_path(module, items, self.dtype)
            mx.eval(new.parameters())  # layer by layer: one layer's float32 temporaries at a time
            self.originals[path] = module
            parent[key] = new

    def restore(self) -> None:
        for path, module in self.originals.items():
            parent, key, _ = module_at(self.root, path)
            parent[key] = module
        self.originals.clear()
