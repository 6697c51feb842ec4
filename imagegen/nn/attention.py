"""Attention over mx.fast.scaled_dot_product_attention, plus the masks the models need."""

from __future__ import annotations

import mlx.core as mx


def attention(q: mx.array, k: mx.array, v: mx.array, mask: mx.array | None = None,
              scale: float | None = None) -> mx.array:
    """q: [B, H, Lq, D]; k, v: [B, Hkv, Lk, D] (Hkv may divide H: grouped-query attention).

    mask: boolean (True = attend) or additive, broadcastable to [B, H, Lq, Lk]. Returns [B, H, Lq, D]."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if mask is not None and mask.dtype != mx.bool_:
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


def repeat_kv(x: mx.array, repeats: int) -> mx.array:
    """[B, Hkv, L, D] -> [B, Hkv * repeats, L, D]: each key/value head serves `repeats` query heads.

    mx.fast attention handles grouped heads itself; this is for code that needs the full layout."""
    if repeats == 1:
        return x
    b, h, l, d = x.shape
    return mx.broadcast_to(x[:, :, None], (b, h, repeats, l, d)).reshape(b, h * repeats, l, d)
