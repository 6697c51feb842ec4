"""The weight update each adapter type encodes for one Linear, delta W [out, in], in float32.

LoRA: (alpha / r) * up @ down (alpha defaults to r). LoKr (LyCORIS): kron(w1, w2), each factor whole or
rank-decomposed (w1_a @ w1_b); alpha / r scales it only when a factor is decomposed, so the ~1e10 alpha that
trainers write beside two whole factors is ignored, as in LyCORIS, ComfyUI and diffusers' `_bake_lokr_alpha_`.
LoHa: (alpha / r) * (w1_a @ w1_b) * (w2_a @ w2_b). Full: a stored difference `diff`.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx

from ..errors import LoraError

F32 = mx.float32


def _f32(x: mx.array) -> mx.array:
    return x.astype(F32)


@dataclass(frozen=True)
class LoraDelta:
    down: mx.array  # [r, in]
    up: mx.array  # [out, r]
    scale: float

    @property
    def shape(self) -> tuple[int, int]:
        return self.up.shape[0], self.down.shape[1]

    def factors(self) -> tuple[mx.array, mx.array]:
        """(down [r, in], up [out, r]) with the scale folded into up."""
        return _f32(self.down), _f32(self.up) * self.scale

    def dense(self) -> mx.array:
        down, up = self.factors()
        return up @ down


@dataclass(frozen=True)
class LokrDelta:
    w1: mx.array  # [a_out, a_in]
    w2: mx.array  # [b_out, b_in]
    scale: float

    @property
    def shape(self) -> tuple[int, int]:
        return self.w1.shape[0] * self.w2.shape[0], self.w1.shape[1] * self.w2.shape[1]

    def kron(self) -> tuple[mx.array, mx.array]:
        return _f32(self.w1) * self.scale, _f32(self.w2)

    def dense(self) -> mx.array:
        return mx.kron(*self.kron())


@dataclass(frozen=True)
class LohaDelta:
    w1_a: mx.array  # [out, r1]
    w1_b: mx.array  # [r1, in]
    w2_a: mx.array  # [out, r2]
    w2_b: mx.array  # [r2, in]
    scale: float

    @property
    def shape(self) -> tuple[int, int]:
        return self.w1_a.shape[0], self.w1_b.shape[1]

    def factors(self) -> tuple[mx.array, mx.array]:
        """The Hadamard product of two rank-r products is one product of rank r1 * r2 (row-wise Kronecker of the
        left factors, column-wise of the right): (down [r1 r2, in], up [out, r1 r2])."""
        a1, b1, a2, b2 = (_f32(x) for x in (self.w1_a, self.w1_b, self.w2_a, self.w2_b))
        up = (a1[:, :, None] * a2[:, None, :]).reshape(a1.shape[0], -1) * self.scale
        down = (b1[:, None, :] * b2[None, :, :]).reshape(-1, b1.shape[1])
        return down, up

    def dense(self) -> mx.array:
        a1, b1, a2, b2 = (_f32(x) for x in (self.w1_a, self.w1_b, self.w2_a, self.w2_b))
        return (a1 @ b1) * (a2 @ b2) * self.scale


@dataclass(frozen=True)
class FullDelta:
    diff: mx.array  # [out, in]

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.diff.shape)

    def dense(self) -> mx.array:
        return _f32(self.diff)


Delta = LoraDelta | LokrDelta | LohaDelta | FullDelta
KINDS = {"lora": "LoRA", "lokr": "LoKr", "loha": "LoHa", "full": "full difference"}


def _alpha(tensors: dict[str, mx.array]) -> float | None:
    alpha = tensors.get("alpha")
    return None if alpha is None else float(alpha.astype(F32).reshape(-1)[0].item())


def _need(tensors: dict[str, mx.array], name: str, where: str) -> mx.array:
    if name not in tensors:
        raise LoraError(f"{where}: the file has no '{name}' for this layer (have: {', '.join(sorted(tensors))}).")
    t = tensors[name]
    if t.ndim != 2:
        raise LoraError(f"{where}: '{name}' has shape {tuple(t.shape)}; only Linear layers (2-D weights) are adapted.")
    return t


def build_delta(kind: str, tensors: dict[str, mx.array], where: str, alpha: float | None = None) -> Delta:
    """One layer's delta from its tensors (suffix -> array, 'alpha' included). `alpha`: a value from the file's
    PEFT metadata when it has no alpha tensor (LoRA only)."""
    file_alpha = _alpha(tensors)
    if kind == "lora":
        down, up = _need(tensors, "down", where), _need(tensors, "up", where)
        rank = down.shape[0]
        if up.shape[1] != rank:
            raise LoraError(f"{where}: lora down {tuple(down.shape)} and up {tuple(up.shape)} disagree on the rank.")
        alpha = file_alpha if file_alpha is not None else alpha
        return LoraDelta(down, up, 1.0 if alpha is None else alpha / rank)
    if kind == "lokr":
        factors, ranks = [], []
        for w in ("w1", "w2"):
            if f"lokr_{w}" in tensors:
                factors.append(_need(tensors, f"lokr_{w}", where))
            else:
                a, b = _need(tensors, f"lokr_{w}_a", where), _need(tensors, f"lokr_{w}_b", where)
                factors.append(_f32(a) @ _f32(b))
                ranks.append(b.shape[0])
        rank = ranks[-1] if ranks else None  # LyCORIS: w2's rank when both are decomposed
        scale = file_alpha / rank if rank and file_alpha is not None else 1.0
        return LokrDelta(factors[0], factors[1], scale)
    if kind == "loha":
        names = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")
        w1_a, w1_b, w2_a, w2_b = (_need(tensors, n, where) for n in names)
        rank = w1_b.shape[0]
        return LohaDelta(w1_a, w1_b, w2_a, w2_b, 1.0 if file_alpha is None else file_alpha / rank)
    return FullDelta(_need(tensors, "diff", where))
