"""Z-Image transformer (single-stream DiT) in MLX, following diffusers 0.42.1
models/transformers/transformer_z_image.py (ZImageTransformer2DModel, the text-to-image path).

Layout: latents are NHWC [B, H, W, C] (diffusers' per-image [C, 1, H, W], channels last); the
output comes back in the same layout. Everything that depends only on shapes (positions, RoPE
tables, caption padding) lives in a :class:`Layout` built once per run, so a step does no host work.

Token order per sample is diffusers': image tokens (padded to a multiple of 32 with `x_pad_token`),
then caption tokens (padded to a multiple of 32 with `cap_pad_token`). Image positions start after
the caption's padded length. Samples whose captions pad to different lengths run as separate groups.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from imagegen import InvalidOptionError, block_loop
from imagegen.nn import attention_blhd, timestep_embedding
from imagegen.nn.attention_inputs import qk_norm_rope
from imagegen.nn.pacing import PacedBlocks, Pacer
from imagegen.nn.swiglu import swiglu
from imagegen.rope import apply_rope_tables, rope_cos_sin, rope_tables
from imagegen.weights import fuse_projections

from .config import BlockShape, ZImageTransformerConfig

SEQ_MULTI_OF = 32  # diffusers pads the image and the caption token runs to multiples of this
FREQ_EMBED_DIM = 256  # TimestepEmbedder's frequency_embedding_size
T_MID_DIM = 1024  # TimestepEmbedder's mid_size in ZImageTransformer2DModel

Rope = tuple[mx.array, mx.array]  # rope_tables' full-width cos, sin: [1, L, 1, head_dim]
# Checkpoint projections fused at load, per block: one matmul instead of three (attention) or two (SwiGLU)
FUSIONS = {
    "attention.to_qkv": ("attention.to_q", "attention.to_k", "attention.to_v"),
    "feed_forward.w13": ("feed_forward.w1", "feed_forward.w3"),
}


def _round_up(n: int, multiple: int = SEQ_MULTI_OF) -> int:
    return -(-n // multiple) * multiple


def patchify(latents: mx.array, p: int) -> mx.array:
    """[B, H, W, C] -> [B, (H/p)(W/p), p*p*C], features ordered (ph, pw, c) as diffusers'."""
    b, h, w, c = latents.shape
    x = latents.reshape(b, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, -1, p * p * c)


def pad_tokens(x: mx.array, length: int, token: mx.array) -> mx.array:
    """Append copies of `token` [1, D] up to `length` tokens (the image run's padding)."""
    b, n, dim = x.shape
    if length <= n:
        return x
    return mx.concatenate([x, mx.broadcast_to(token.astype(x.dtype), (b, length - n, dim))], axis=1)


@dataclass(frozen=True, eq=False)
class Group:
    """Samples whose captions pad to the same run length: one forward with no attention mask."""

    index: mx.array | None  # the samples' places in the batch (None: the whole batch, in order)
    cap_tokens: int  # the caption run: caption length rounded up to SEQ_MULTI_OF
    cap_pad: mx.array  # [Bg, cap_tokens, 1] True where cap_pad_token replaces the feature
    image_rope: Rope  # image tokens (noise refiner)
    cap_rope: Rope  # caption tokens (context refiner)
    rope: Rope  # image then caption tokens (main layers)


@dataclass(frozen=True, eq=False)
class Layout:
    """The shape-only inputs of a step: build with :meth:`ZImageTransformer.layout`, reuse every step.

    diffusers pads a batch to its longest caption run and masks the padding out of attention; masked
    keys weigh exactly zero, so running each group of equal runs unmasked gives the same per-sample
    results, and it is faster (on an H100, MLX attention with a mask takes ~6x as long)."""

    cap_lens: tuple[int, ...]  # valid caption tokens per sample
    height: int  # latent grid
    width: int
    image_tokens: int  # image run: (height / p) * (width / p) rounded up to SEQ_MULTI_OF
    groups: tuple[Group, ...]
    order: mx.array | None  # puts the groups' concatenated outputs back in batch order (None: already)


@dataclass(frozen=True)
class Prologue:
    """One group's state before the main layers (ZImageTransformer.prologue); a ControlNet reads all of it."""

    embedded: mx.array  # image tokens as embedded, before the noise refiner [Bg, image_tokens, dim]
    adaln: mx.array  # timestep embedding [Bg, adaln_dim]
    image: mx.array  # image tokens after the noise refiner
    cap: mx.array  # caption tokens after the context refiner [Bg, cap_tokens, dim]
    noise_refiner: Sequence[Callable]  # the noise-refiner blocks as this run calls them (paced or not)


# control(transformer, group, prologue, pacer) -> {main layer index: hint added after it} (imagegen_zimage.controlnet)
Control = Callable[["ZImageTransformer", Group, Prologue, Pacer], dict[int, mx.array]]


def _group(
    cap_lens: Sequence[int],
    index: Sequence[int] | None,
    run: int,
    ht: int,
    wt: int,
    image_tokens: int,
    axes_dims: tuple[int, ...],
    theta: float,
) -> Group:
    """Positions as diffusers' patchify_and_embed builds them: caption token j at (1 + j, 0, 0),
    image token (h, w) at (run + 1, h, w), image padding tokens at (0, 0, 0)."""
    n = ht * wt
    pos = np.zeros((image_tokens + run, 3), dtype=np.int64)
    pos[:n, 0] = run + 1
    pos[:n, 1] = np.repeat(np.arange(ht), wt)
    pos[:n, 2] = np.tile(np.arange(wt), ht)
    pos[image_tokens:, 0] = np.arange(1, run + 1)
    cos, sin = rope_tables(*rope_cos_sin(pos, axes_dims, theta, float32_angles=True))
    cos, sin = cos[None, :, None], sin[None, :, None]
    lens = np.array(cap_lens)[:, None, None]
    group = Group(
        index=None if index is None else mx.array(index),
        cap_tokens=run,
        cap_pad=mx.array(np.arange(run)[None, :, None] >= lens),
        image_rope=(cos[:, :image_tokens], sin[:, :image_tokens]),
        cap_rope=(cos[:, image_tokens:], sin[:, image_tokens:]),
        rope=(cos, sin),
    )
    mx.eval(group.cap_pad, group.image_rope, group.cap_rope, group.rope)
    return group


@lru_cache(maxsize=16)
def build_layout(
    cap_lens: tuple[int, ...],
    height: int,
    width: int,
    patch_size: int,
    axes_dims: tuple[int, ...],
    axes_lens: tuple[int, ...],
    theta: float,
) -> Layout:
    """The layout of diffusers' patchify_and_embed / _prepare_sequence for one image per caption (F = 1)."""
    if not cap_lens or min(cap_lens) < 1:
        raise InvalidOptionError(f"Every sample needs at least one caption token, got lengths {cap_lens}")
    if height % patch_size or width % patch_size:
        raise InvalidOptionError(f"Latent grid {height}x{width} is not a multiple of the patch size {patch_size}")
    ht, wt = height // patch_size, width // patch_size
    runs = [_round_up(n) for n in cap_lens]
    limits = (max(runs) + 1, ht, wt)
    if any(top >= size for top, size in zip(limits, axes_lens)):
        raise InvalidOptionError(f"Positions up to {limits} exceed the model's RoPE tables {axes_lens}")
    image_tokens = _round_up(ht * wt)
    members = {run: [i for i, r in enumerate(runs) if r == run] for run in dict.fromkeys(runs)}
    whole = len(members) == 1
    groups = tuple(
        _group([cap_lens[i] for i in index], None if whole else index, run, ht, wt, image_tokens, axes_dims, theta)
        for run, index in members.items()
    )
    placed = [i for index in members.values() for i in index]
    order = None if placed == sorted(placed) else mx.array(np.argsort(placed))
    return Layout(cap_lens=cap_lens, height=height, width=width, image_tokens=image_tokens, groups=groups, order=order)


class TimestepEmbedder(nn.Module):
    """Sinusoidal [cos, sin] features -> Linear -> SiLU -> Linear (diffusers' `mlp.0` / `mlp.2`)."""

    def __init__(self, out_dim: int, mid_dim: int = T_MID_DIM):
        super().__init__()
        self.mlp = [nn.Linear(FREQ_EMBED_DIM, mid_dim), nn.SiLU(), nn.Linear(mid_dim, out_dim)]

    def __call__(self, t: mx.array, dtype: mx.Dtype) -> mx.array:
        x = timestep_embedding(t, FREQ_EMBED_DIM, flip_sin_to_cos=True).astype(dtype)
        for layer in self.mlp:
            x = layer(x)
        return x


class Attention(nn.Module):
    """Self-attention with per-head RMSNorm on q/k and interleaved-pair 3-axis RoPE. The checkpoint's to_q, to_k
    and to_v are fused at load into one projection (ZImageTransformer.sanitize)."""

    def __init__(self, dim: int, heads: int, qk_norm: bool):
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.to_qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.to_out = [nn.Linear(dim, dim, bias=False)]
        # diffusers' Attention(qk_norm="rms_norm", eps=1e-5): the eps is fixed, not config.norm_eps
        self.norm_q = nn.RMSNorm(self.head_dim, eps=1e-5) if qk_norm else None
        self.norm_k = nn.RMSNorm(self.head_dim, eps=1e-5) if qk_norm else None

    def __call__(self, x: mx.array, rope: Rope) -> mx.array:
        qkv = self.to_qkv(x)
        if self.norm_q is not None:
            q, k, v = qk_norm_rope([(qkv, self.norm_q, self.norm_k)], self.heads, self.head_dim, *rope)
        else:
            b, length, _ = x.shape
            q, k, v = (qkv.reshape(b, length, 3, self.heads, self.head_dim)[:, :, i] for i in range(3))
            q, k = apply_rope_tables(q, *rope), apply_rope_tables(k, *rope)
        return self.to_out[0](attention_blhd(q, k, v))


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x), with w1 and w3 fused at load into one projection w13."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.w13 = nn.Linear(dim, 2 * hidden_dim, bias=False)
        self.w2 = nn.Linear(hidden_dim, dim, bias=False)

    def __call__(self, x: mx.array) -> mx.array:
        return self.w2(swiglu(self.w13(x)))


def _scaled_norm(norm: nn.RMSNorm, x: mx.array, scale: mx.array) -> mx.array:
    """norm(x) * (1 + scale); with one scale for the batch, folded into the norm's weight (one pass, not two)."""
    if x.shape[0] == 1:
        return mx.fast.rms_norm(x, norm.weight * (1.0 + scale).reshape(-1), norm.eps)
    return norm(x) * (1.0 + scale)


class ZImageTransformerBlock(nn.Module):
    """Sandwich-normed attention + SwiGLU; with modulation, adaLN scales the inputs and tanh gates the outputs."""

    def __init__(self, config: BlockShape, modulation: bool = True):
        super().__init__()
        dim, eps = config.dim, config.norm_eps
        self.attention = Attention(dim, config.n_heads, config.qk_norm)
        self.feed_forward = FeedForward(dim, config.ffn_dim)
        self.attention_norm1 = nn.RMSNorm(dim, eps=eps)
        self.ffn_norm1 = nn.RMSNorm(dim, eps=eps)
        self.attention_norm2 = nn.RMSNorm(dim, eps=eps)
        self.ffn_norm2 = nn.RMSNorm(dim, eps=eps)
        self.modulation = modulation
        if modulation:
            self.adaLN_modulation = [nn.Linear(config.adaln_dim, 4 * dim)]

    def __call__(self, x: mx.array, rope: Rope, adaln: mx.array | None = None) -> mx.array:
        if not self.modulation:
            x = x + self.attention_norm2(self.attention(self.attention_norm1(x), rope))
            return x + self.ffn_norm2(self.feed_forward(self.ffn_norm1(x)))
        scale_msa, gate_msa, scale_mlp, gate_mlp = mx.split(self.adaLN_modulation[0](adaln)[:, None], 4, axis=-1)
        attn = self.attention(_scaled_norm(self.attention_norm1, x, scale_msa), rope)
        x = x + mx.tanh(gate_msa) * self.attention_norm2(attn)
        ff = self.feed_forward(_scaled_norm(self.ffn_norm1, x, scale_mlp))
        return x + mx.tanh(gate_mlp) * self.ffn_norm2(ff)


class FinalLayer(nn.Module):
    """LayerNorm (no affine) scaled by 1 + Linear(SiLU(c)), then Linear to patch features."""

    def __init__(self, dim: int, adaln_dim: int, out_dim: int):
        super().__init__()
        self.linear = nn.Linear(dim, out_dim)
        self.adaLN_modulation = [nn.SiLU(), nn.Linear(adaln_dim, dim)]

    def __call__(self, x: mx.array, adaln: mx.array) -> mx.array:
        scale = 1.0 + self.adaLN_modulation[1](nn.silu(adaln))
        return self.linear(mx.fast.layer_norm(x, None, None, 1e-6) * scale[:, None])


class ZImageTransformer(PacedBlocks, nn.Module):
    """ZImageTransformer2DModel: noise refiner (image), context refiner (caption), single-stream layers.

    Module names are the checkpoint's keys (`all_x_embedder` and `all_final_layer` are dicts keyed
    "2-1" as in the checkpoint), except the projections `sanitize` fuses at load (FUSIONS)."""

    paced_lists = ("noise_refiner", "context_refiner", "layers")

    def __init__(self, config: ZImageTransformerConfig):
        super().__init__()
        self.config = config
        dim, c = config.dim, config.in_channels
        self.all_x_embedder = {}
        self.all_final_layer = {}
        for p, pf in zip(config.all_patch_size, config.all_f_patch_size):
            self.all_x_embedder[f"{p}-{pf}"] = nn.Linear(pf * p * p * c, dim)
            self.all_final_layer[f"{p}-{pf}"] = FinalLayer(dim, config.adaln_dim, pf * p * p * c)
        # the pipeline calls forward with its defaults, patch_size=2 and f_patch_size=1
        self.patch_size, self.patch_key = 2, "2-1"
        self.noise_refiner = [ZImageTransformerBlock(config) for _ in range(config.n_refiner_layers)]
        self.context_refiner = [
            ZImageTransformerBlock(config, modulation=False) for _ in range(config.n_refiner_layers)
        ]
        self.t_embedder = TimestepEmbedder(config.adaln_dim)
        self.cap_embedder = [nn.RMSNorm(config.cap_feat_dim, eps=config.norm_eps), nn.Linear(config.cap_feat_dim, dim)]
        self.x_pad_token = mx.zeros((1, dim))
        self.cap_pad_token = mx.zeros((1, dim))
        self.layers = [ZImageTransformerBlock(config) for _ in range(config.n_layers)]

    def sanitize(self, weights: dict[str, mx.array]) -> dict[str, mx.array]:
        """Fuse each block's q/k/v projections and its SwiGLU's w1/w3 into one matmul each (FUSIONS). Idempotent."""
        prefixes = (f"{name}.{i}." for name in self.paced_lists for i in range(len(getattr(self, name))))
        return fuse_projections(weights, prefixes, FUSIONS)

    def layout(self, cap_lens: Sequence[int], height: int, width: int) -> Layout:
        """The per-run layout for captions of `cap_lens` valid tokens and a latent grid height x width."""
        cfg = self.config
        return build_layout(
            tuple(int(n) for n in cap_lens),
            int(height),
            int(width),
            self.patch_size,
            tuple(cfg.axes_dims),
            tuple(cfg.axes_lens),
            float(cfg.rope_theta),
        )

    def __call__(
        self,
        latents: mx.array,
        t: mx.array,
        cap_feats: mx.array,
        layout: Layout,
        wrapper: block_loop.LoopWrapper | None = None,
        control: Control | None = None,
    ) -> mx.array:
        """latents [B, H, W, C]; t [B] = 1 - sigma (diffusers' (1000 - timestep) / 1000); cap_feats
        [B, L, cap_feat_dim] with sample i's layout.cap_lens[i] valid tokens first (L >= the longest); `wrapper`: a
        plugin's block-loop wrapper for this run (imagegen.block_loop), applied to the main layers; `control`: a
        ControlNet's hints for the main layers (imagegen_zimage.controlnet).

        Returns the transformer's output [B, H, W, C] in the latents' dtype; the pipeline negates it
        to get the flow-matching velocity, as diffusers' pipeline does."""
        t = mx.broadcast_to(t, latents.shape[:1])
        outs = [
            self._forward(
                *(a if g.index is None else a[g.index] for a in (latents, t, cap_feats)), layout, g, i, wrapper, control
            )
            for i, g in enumerate(layout.groups)
        ]
        out = outs[0] if len(outs) == 1 else mx.concatenate(outs)
        return out if layout.order is None else out[layout.order]

    def prologue(
        self,
        latents: mx.array,
        t: mx.array,
        cap_feats: mx.array,
        layout: Layout,
        group: Group,
        pace: Pacer | None = None,
    ) -> Prologue:
        """Everything before the main layers for one group: the embedded image tokens (padded with x_pad_token),
        the timestep embedding, the image tokens after the noise refiner and the caption after the context one."""
        dtype = self.x_pad_token.dtype
        pace = pace or Pacer(0)
        _, noise_refiner, context_refiner, _ = self.paced_blocks()
        embedded = self.all_x_embedder[self.patch_key](patchify(latents.astype(dtype), self.patch_size))
        embedded = pad_tokens(embedded, layout.image_tokens, self.x_pad_token)
        adaln = self.t_embedder(t * self.config.t_scale, dtype)
        x = embedded
        for block in noise_refiner:
            x = block(x, group.image_rope, adaln)
            pace(x)

        cap = cap_feats.astype(dtype)[:, : group.cap_tokens]
        if cap.shape[1] < group.cap_tokens:
            cap = mx.pad(cap, [(0, 0), (0, group.cap_tokens - cap.shape[1]), (0, 0)])
        for layer in self.cap_embedder:
            cap = layer(cap)
        cap = mx.where(group.cap_pad, self.cap_pad_token, cap)
        for block in context_refiner:
            cap = block(cap, group.cap_rope)
            pace(cap)
        return Prologue(embedded, adaln, x, cap, noise_refiner)

    def _forward(
        self,
        latents: mx.array,
        t: mx.array,
        cap_feats: mx.array,
        layout: Layout,
        group: Group,
        group_index: int = 0,
        wrapper: block_loop.LoopWrapper | None = None,
        control: Control | None = None,
    ) -> mx.array:
        b, h, w, c = latents.shape
        p = self.patch_size
        every, _, _, layers = self.paced_blocks()
        pace = Pacer(every)
        start = self.prologue(latents, t, cap_feats, layout, group, pace)
        adaln, n = start.adaln, (h // p) * (w // p)
        hints = control(self, group, start, pace) if control is not None else {}

        def run(x: mx.array, index: int) -> mx.array:
            x = layers[index](x, group.rope, adaln)
            if index in hints:  # diffusers adds a ControlNet's hint after its layer
                x = x + hints[index]
            pace(x)
            return x

        def first_block(state: block_loop.State) -> block_loop.State:
            return (run(state[0], 0),)

        def later_blocks(state: block_loop.State) -> block_loop.State:
            (x,) = state
            for index in range(1, len(layers)):
                x = run(x, index)
            return (x,)

        # diffusers runs the whole batch (CFG included) as one call, one cache context; imagegen runs each layout group
        # as its own call, so each group is its own context
        context = "cond" if group_index == 0 else f"group{group_index}"
        loop = block_loop.BlockLoop(first_block, later_blocks, ((context, slice(None)),))
        (x,) = block_loop.run(wrapper, loop, (mx.concatenate([start.image, start.cap], axis=1),))

        # Only the image tokens are decoded; unpatchify back to NHWC
        x = self.all_final_layer[self.patch_key](x[:, :n], adaln)
        x = x.reshape(b, h // p, w // p, p, p, c).transpose(0, 1, 3, 2, 4, 5).reshape(b, h, w, c)
        return x.astype(latents.dtype)


def quant_predicate(path: str, module: nn.Module) -> bool:
    """Quantize the attention and feed-forward Linears of every block (~97% of the weights).

    Kept in the load dtype: the timestep, caption and patch embedders and the final layer (small,
    and every token passes through them), and the adaLN modulation Linears (~2% of the weights):
    their scales and gates multiply every token of the image, so their error does not average out."""
    return path.startswith(("layers.", "noise_refiner.", "context_refiner.")) and ".adaLN_modulation." not in path
