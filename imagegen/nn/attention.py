"""Attention over mx.fast.scaled_dot_product_attention, plus the masks the models need and the [B, L, H, D] entry
the transformers call (sequence-parallel aware, with an optional recording of each call's keys and values)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import mlx.core as mx

from ..distributed import current as sequence_parallel


def attention(
    q: mx.array, k: mx.array, v: mx.array, mask: mx.array | None = None, scale: float | None = None
) -> mx.array:
    """q: [B, H, Lq, D]; k, v: [B, Hkv, Lk, D] (Hkv may divide H: grouped-query attention).

    mask: boolean (True = attend) or additive, broadcastable to [B, H, Lq, Lk]. Returns [B, H, Lq, D]."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if mask is not None:
        # additive at the mask's own shape: MLX broadcasts it as a view, while a boolean mask is made a full
        # [B, H, Lq, Lk] bias on every call on CUDA (a quarter of a Qwen3 prompt encode's GPU time on an H200);
        # the most negative value, as MLX's own fallback uses, keeps a row with no allowed key finite
        if mask.dtype == mx.bool_:
            mask = mx.where(mask, 0.0, mx.finfo(q.dtype).min)
        mask = mask.astype(q.dtype)
    return mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=mask)


def causal_mask(length: int, offset: int = 0) -> mx.array:
    """Boolean [length, offset + length]: query i (at absolute position offset + i) sees keys <= it."""
    rows = mx.arange(offset, offset + length)[:, None]
    cols = mx.arange(offset + length)[None, :]
    return cols <= rows


def padding_mask(attention_mask: mx.array) -> mx.array:
    """[B, Lk] of 1/0 (tokenizer output) -> boolean [B, 1, 1, Lk] (True = a real token)."""
    return (attention_mask != 0)[:, None, None, :]


def combine_masks(*masks: mx.array | None) -> mx.array | None:
    """Logical AND of boolean masks (None = no constraint)."""
    out = None
    for m in masks:
        if m is not None:
            out = m if out is None else mx.logical_and(out, m)
    return out


def attention_blhd(
    q: mx.array, k: mx.array, v: mx.array, mask: mx.array | None = None, extra: tuple[mx.array, mx.array] | None = None
) -> mx.array:
    """Attention over [B, L, H, D] inputs -> [B, L, H * D]. The fused kernel reads the transposed views as they are
    and writes its output in the queries' memory order, so neither side copies. `extra`: keys and values [B, L', H, D]
    every query also attends to (cached reference-image tokens); `recording` collects each call's k and v."""
    b, length, heads, d = q.shape
    spread = sequence_parallel()
    if spread is not None:  # this rank holds a shard of the tokens: attend over every rank's keys and values
        k, v = spread.keys_values(k, v)
    if _recorded is not None:
        kept = (mx.contiguous(k), mx.contiguous(v))  # not views: they would pin whole projections
        mx.eval(kept)  # layer by layer: the recorded pass never holds more than one layer's temporaries
        _recorded.append(kept)
    if extra is not None:  # attention does not depend on the keys' order: appended after this call's own
        k, v = (mx.concatenate([a, mx.broadcast_to(e, (b, *e.shape[1:]))], axis=1) for a, e in zip((k, v), extra))
    out = attention(q.transpose(0, 2, 1, 3), k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3), mask)
    return out.transpose(0, 2, 1, 3).reshape(b, length, heads * d)


_recorded: list[tuple[mx.array, mx.array]] | None = None


@contextmanager
def recording() -> Iterator[list[tuple[mx.array, mx.array]]]:
    """Collect the keys and values of every attention call made inside, in call order (for a reference-image
    pass whose K/V later steps reuse). Not for compiled functions: their arrays are placeholders while tracing."""
    global _recorded
    previous, _recorded = _recorded, []
    try:
        yield _recorded
    finally:
        _recorded = previous
