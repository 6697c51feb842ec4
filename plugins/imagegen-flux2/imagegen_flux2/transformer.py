"""FLUX.2 (Klein) transformer: double- and single-stream MMDiT blocks with 4-axis RoPE, following diffusers 0.42.1
models/transformers/transformer_flux2.py (Flux2Transformer2DModel) and its use in pipeline_flux2_klein.py."""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from imagegen import block_loop
from imagegen.errors import InvalidOptionError
from imagegen.nn import TimestepEmbedding, attention_blhd, recording, timestep_embedding
from imagegen.nn.attention_inputs import qk_norm_rope
from imagegen.nn.pacing import PacedBlocks, Pacer
from imagegen.nn.swiglu import swiglu
from imagegen.rope import rope_cos_sin, rope_tables
from imagegen.weights import fuse_projections

from .config import Flux2TransformerConfig

Rope = tuple[mx.array, mx.array]
KV = tuple[mx.array, mx.array]  # one attention layer's keys and values [B, L, H, D]
Grid = tuple[int, int]

REFERENCE_T_SCALE = 10  # diffusers' _prepare_image_ids(scale=10): reference image i sits at T = 10 + 10 * i
# The double blocks' q/k/v projections are fused at load into one matmul per stream, under the names that
# diffusers' own `fuse_projections()` gives them.
QKV_FUSIONS = {"to_qkv": ("to_q", "to_k", "to_v"), "to_added_qkv": ("add_q_proj", "add_k_proj", "add_v_proj")}
# A single block's output projection, one weight over [attention, MLP] in diffusers, is split at load into its two
# column blocks (see Flux2ParallelSelfAttention).
SINGLE_OUT_SPLIT = ("to_out", ("to_out_attn", "to_out_mlp"))


# Position ids (T, H, W, L) as Flux2KleinPipeline._prepare_text_ids / _prepare_latent_ids / _prepare_image_ids.


def _grid_ids(t: int, height: int, width: int) -> np.ndarray:
    rows, cols = np.meshgrid(np.arange(height), np.arange(width), indexing="ij")
    ids = np.zeros((height * width, 4), dtype=np.int64)
    ids[:, 0], ids[:, 1], ids[:, 2] = t, rows.ravel(), cols.ravel()
    return ids


def text_ids(length: int) -> np.ndarray:
    """[length, 4]: T = H = W = 0, L = token index."""
    ids = np.zeros((length, 4), dtype=np.int64)
    ids[:, 3] = np.arange(length)
    return ids


def latent_ids(height: int, width: int) -> np.ndarray:
    """[height * width, 4] for packed latent tokens (row-major): T = 0, H = row, W = column, L = 0."""
    return _grid_ids(0, height, width)


def reference_ids(grids: Sequence[Grid], scale: int = REFERENCE_T_SCALE) -> np.ndarray:
    """[sum(h * w), 4] for reference-image tokens appended in order: image i has T = scale + scale * i."""
    parts = [_grid_ids(scale + scale * i, h, w) for i, (h, w) in enumerate(grids)]
    return np.concatenate(parts) if parts else np.zeros((0, 4), dtype=np.int64)


@lru_cache(maxsize=32)
def flux2_rope(
    text_len: int, grid: Grid, ref_grids: tuple[Grid, ...], axes_dims: tuple[int, ...], theta: float
) -> Rope:
    """Full-width RoPE tables cos, sin [text_len + h * w + reference tokens, sum(axes_dims)] (see
    imagegen.rope.rope_tables) for the joint sequence [text, latents, references], the order attended over."""
    ids = np.concatenate([text_ids(text_len), latent_ids(*grid), reference_ids(ref_grids)])
    cos, sin = rope_tables(*rope_cos_sin(ids, axes_dims, theta))
    mx.eval(cos, sin)
    return cos, sin


# Helpers shared by the blocks.


def _modulate(x: mx.array, shift: mx.array, scale: mx.array, eps: float) -> mx.array:
    """LayerNorm without affine, then the adaptive (1 + scale) * x + shift."""
    if x.shape[0] == 1:  # one modulation for the batch: LayerNorm's own affine applies it in the same pass
        return mx.fast.layer_norm(x, (1 + scale).reshape(-1), shift.reshape(-1), eps)
    return mx.fast.layer_norm(x, None, None, eps) * (1 + scale) + shift


def _clip_fp16(x: mx.array) -> mx.array:
    """diffusers clips the residual stream in float16 to keep it finite."""
    return mx.clip(x, -65504, 65504) if x.dtype == mx.float16 else x


# Embeddings and modulations.


class Flux2TimestepGuidanceEmbeddings(nn.Module):
    """Sinusoidal timestep (and guidance, for guidance-distilled checkpoints) -> MLP -> the conditioning vector."""

    def __init__(self, channels: int, dim: int, guidance_embeds: bool):
        super().__init__()
        self.channels = channels
        self.timestep_embedder = TimestepEmbedding(channels, dim, bias=False)
        if guidance_embeds:
            self.guidance_embedder = TimestepEmbedding(channels, dim, bias=False)

    def _project(self, t: mx.array) -> mx.array:
        return timestep_embedding(t, self.channels).astype(t.dtype)

    def __call__(self, timestep: mx.array, guidance: mx.array | None) -> mx.array:
        temb = self.timestep_embedder(self._project(timestep))
        if guidance is not None and "guidance_embedder" in self:
            temb = temb + self.guidance_embedder(self._project(guidance))
        return temb


class Flux2Modulation(nn.Module):
    """SiLU -> linear: (shift, scale, gate) sets shared by every block of one kind."""

    def __init__(self, dim: int, sets: int):
        super().__init__()
        self.sets = sets
        self.linear = nn.Linear(dim, dim * 3 * sets, bias=False)

    def __call__(self, temb: mx.array) -> list[mx.array]:
        """[B, D] -> 3 * sets arrays [B, 1, D]: shift, scale, gate of each set."""
        return mx.split(self.linear(nn.silu(temb))[:, None], 3 * self.sets, axis=-1)


class AdaLayerNormContinuous(nn.Module):
    """The final norm: LayerNorm without affine, modulated by (scale, shift) from the conditioning vector."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.linear = nn.Linear(dim, 2 * dim, bias=False)

    def __call__(self, x: mx.array, temb: mx.array) -> mx.array:
        scale, shift = mx.split(self.linear(nn.silu(temb))[:, None], 2, axis=-1)  # scale first, as diffusers
        return _modulate(x, shift, scale, self.eps)


# Blocks.


class Flux2FeedForward(nn.Module):
    """SwiGLU MLP whose gate and value projections share one linear (first half gated)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.linear_in = nn.Linear(dim, 2 * hidden, bias=False)
        self.linear_out = nn.Linear(hidden, dim, bias=False)

    def __call__(self, x: mx.array) -> mx.array:
        return self.linear_out(swiglu(self.linear_in(x)))


class Flux2Attention(nn.Module):
    """Joint attention of a double-stream block: each stream has its own projections and q/k norms; attention
    runs over the concatenation [text, image]."""

    def __init__(self, dim: int, heads: int, head_dim: int, eps: float):
        super().__init__()
        inner = heads * head_dim
        self.heads, self.head_dim = heads, head_dim
        self.to_qkv = nn.Linear(dim, 3 * inner, bias=False)
        self.norm_q = nn.RMSNorm(head_dim, eps=eps)
        self.norm_k = nn.RMSNorm(head_dim, eps=eps)
        self.to_out = [nn.Linear(inner, dim, bias=False)]
        self.to_added_qkv = nn.Linear(dim, 3 * inner, bias=False)
        self.norm_added_q = nn.RMSNorm(head_dim, eps=eps)
        self.norm_added_k = nn.RMSNorm(head_dim, eps=eps)
        self.to_add_out = nn.Linear(inner, dim, bias=False)

    def __call__(
        self, x: mx.array, context: mx.array | None, rope: Rope, extra: KV | None = None
    ) -> tuple[mx.array, mx.array | None]:
        """context None: the image stream alone (the KV variant's reference pass)."""
        streams = [(self.to_qkv(x), self.norm_q, self.norm_k)]
        if context is not None:
            streams.insert(0, (self.to_added_qkv(context), self.norm_added_q, self.norm_added_k))
        out = attention_blhd(*qk_norm_rope(streams, self.heads, self.head_dim, *rope), extra=extra)
        if context is None:
            return self.to_out[0](out), None
        n_txt = context.shape[1]
        return self.to_out[0](out[:, n_txt:]), self.to_add_out(out[:, :n_txt])


class Flux2TransformerBlock(nn.Module):
    """Double-stream block: image and text keep separate weights and modulations, and meet in attention."""

    def __init__(self, dim: int, heads: int, head_dim: int, mlp_hidden: int, eps: float):
        super().__init__()
        self.eps = eps
        self.attn = Flux2Attention(dim, heads, head_dim, eps)
        self.ff = Flux2FeedForward(dim, mlp_hidden)
        self.ff_context = Flux2FeedForward(dim, mlp_hidden)

    def __call__(
        self,
        x: mx.array,
        context: mx.array,
        mod_img: Sequence[mx.array],
        mod_txt: Sequence[mx.array],
        rope: Rope,
        extra: KV | None = None,
    ) -> tuple[mx.array, mx.array]:
        shift, scale, gate, mlp_shift, mlp_scale, mlp_gate = mod_img
        c_shift, c_scale, c_gate, c_mlp_shift, c_mlp_scale, c_mlp_gate = mod_txt
        eps = self.eps
        attn, c_attn = self.attn(
            _modulate(x, shift, scale, eps),
            None if context is None else _modulate(context, c_shift, c_scale, eps),
            rope,
            extra,
        )
        x = x + gate * attn
        x = x + mlp_gate * self.ff(_modulate(x, mlp_shift, mlp_scale, eps))
        if context is None:  # the image stream alone
            return x, None
        context = context + c_gate * c_attn
        context = context + c_mlp_gate * self.ff_context(_modulate(context, c_mlp_shift, c_mlp_scale, eps))
        return x, _clip_fp16(context)


class Flux2ParallelSelfAttention(nn.Module):
    """Single-stream attention and MLP in parallel: one fused input projection (q, k, v, MLP gate and value). The
    output projection over [attention, MLP] is held as its two column blocks (split at load, SINGLE_OUT_SPLIT), so
    the sum of two matmuls replaces a copy of both activations into one concatenated input."""

    def __init__(self, dim: int, heads: int, head_dim: int, mlp_hidden: int, eps: float):
        super().__init__()
        self.heads, self.head_dim = heads, head_dim
        self.qkv_dim = 3 * heads * head_dim
        self.to_qkv_mlp_proj = nn.Linear(dim, self.qkv_dim + 2 * mlp_hidden, bias=False)
        self.norm_q = nn.RMSNorm(head_dim, eps=eps)
        self.norm_k = nn.RMSNorm(head_dim, eps=eps)
        self.to_out_attn = nn.Linear(heads * head_dim, dim, bias=False)
        self.to_out_mlp = nn.Linear(mlp_hidden, dim, bias=False)

    def __call__(self, x: mx.array, rope: Rope, extra: KV | None = None) -> mx.array:
        h = self.to_qkv_mlp_proj(x)
        qkv = qk_norm_rope([(h, self.norm_q, self.norm_k)], self.heads, self.head_dim, *rope)
        out = attention_blhd(*qkv, extra=extra)
        return self.to_out_attn(out) + self.to_out_mlp(swiglu(h, self.qkv_dim))


class Flux2SingleTransformerBlock(nn.Module):
    """Single-stream block over the joint [text, image] sequence."""

    def __init__(self, dim: int, heads: int, head_dim: int, mlp_hidden: int, eps: float):
        super().__init__()
        self.eps = eps
        self.attn = Flux2ParallelSelfAttention(dim, heads, head_dim, mlp_hidden, eps)

    def __call__(self, x: mx.array, mod: Sequence[mx.array], rope: Rope, extra: KV | None = None) -> mx.array:
        shift, scale, gate = mod
        return _clip_fp16(x + gate * self.attn(_modulate(x, shift, scale, self.eps), rope, extra))


# The model.


def quant_predicate(path: str, module: nn.Module) -> bool:
    """Quantize the blocks' linear layers: ~95% of the weights (Klein 4B and 9B) and nearly all of the compute.
    Embedders, the shared modulations, norm_out and proj_out stay in the load dtype: ~5% of the weights, run once
    per step (modulations) or once per token, and an error there reaches every token of every block."""
    return path.startswith(("transformer_blocks.", "single_transformer_blocks."))


class Flux2Transformer(PacedBlocks, nn.Module):
    """Flux2Transformer2DModel. Inputs are packed tokens [B, N, C] in row-major order; reference-image tokens,
    if any, follow the noisy latents (and the output keeps them: slice back to the latents' count)."""

    paced_lists = ("transformer_blocks", "single_transformer_blocks")
    sequence_parallel = None  # an imagegen.distributed.SequenceParallel spreads one call's image tokens over ranks

    def __init__(self, config: Flux2TransformerConfig):
        super().__init__()
        self.config = config
        dim = config.inner_dim
        block = (dim, config.num_attention_heads, config.attention_head_dim, config.mlp_hidden_dim, config.eps)
        self.time_guidance_embed = Flux2TimestepGuidanceEmbeddings(
            config.timestep_guidance_channels, dim, config.guidance_embeds
        )
        self.double_stream_modulation_img = Flux2Modulation(dim, sets=2)
        self.double_stream_modulation_txt = Flux2Modulation(dim, sets=2)
        self.single_stream_modulation = Flux2Modulation(dim, sets=1)
        self.x_embedder = nn.Linear(config.in_channels, dim, bias=False)
        self.context_embedder = nn.Linear(config.joint_attention_dim, dim, bias=False)
        self.transformer_blocks = [Flux2TransformerBlock(*block) for _ in range(config.num_layers)]
        self.single_transformer_blocks = [Flux2SingleTransformerBlock(*block) for _ in range(config.num_single_layers)]
        self.norm_out = AdaLayerNormContinuous(dim, config.eps)
        self.proj_out = nn.Linear(dim, config.out_dim, bias=False)

    def rope(self, text_len: int, grid: Grid, ref_grids: Sequence[Grid] = ()) -> Rope:
        """cos/sin for `text_len` text tokens, a latent grid (h, w) and reference grids, in that order (cached)."""
        refs = tuple((int(h), int(w)) for h, w in ref_grids)
        axes = tuple(self.config.axes_dims_rope)
        return flux2_rope(int(text_len), (int(grid[0]), int(grid[1])), refs, axes, float(self.config.rope_theta))

    def sanitize(self, weights: dict[str, mx.array]) -> dict[str, mx.array]:
        """Fuse each double block's per-stream q/k/v weights into one projection (QKV_FUSIONS) and split each single
        block's output projection (SINGLE_OUT_SPLIT). Idempotent."""
        prefixes = (f"transformer_blocks.{i}.attn." for i in range(len(self.transformer_blocks)))
        weights = fuse_projections(weights, prefixes, QKV_FUSIONS)
        joined, (attn, mlp) = SINGLE_OUT_SPLIT
        for i, block in enumerate(self.single_transformer_blocks):
            prefix = f"single_transformer_blocks.{i}.attn."
            if f"{prefix}{joined}.weight" in weights:
                weight = weights.pop(f"{prefix}{joined}.weight")
                width = block.attn.heads * block.attn.head_dim
                # contiguous copies: a column slice would be copied again by every matmul
                weights[f"{prefix}{attn}.weight"] = mx.contiguous(weight[:, :width])
                weights[f"{prefix}{mlp}.weight"] = mx.contiguous(weight[:, width:])
        return weights

    def __call__(
        self,
        hidden_states: mx.array,
        encoder_hidden_states: mx.array,
        timestep: mx.array,
        rope: Rope,
        guidance: mx.array | None = None,
        reference_kv: Sequence[KV] | None = None,
        wrapper: block_loop.LoopWrapper | None = None,
        contexts: tuple[tuple[str, slice], ...] = (("cond", slice(None)),),
    ) -> mx.array:
        """hidden_states [B, N_img, C_in] and encoder_hidden_states [B, N_txt, D_joint], in the model's dtype;
        timestep [B] in [0, 1] (the pipeline's t / 1000); rope from `self.rope` covering N_txt + N_img tokens;
        guidance [B] as diffusers passes it (used only by checkpoints with a guidance embedder); reference_kv from
        `reference_kv` (the KV variant): every token also attends to those reference-image keys and values;
        `wrapper` and `contexts`: a plugin's block-loop wrapper for this run and the batch's parts
        (imagegen.block_loop).
        Returns [B, N_img, C_out]."""
        n_txt, n_img = encoder_hidden_states.shape[1], hidden_states.shape[1]
        if rope[0].shape[-2] != n_txt + n_img:
            raise ValueError(f"rope covers {rope[0].shape[-2]} tokens; inputs have {n_txt} text + {n_img} image")
        spread = self.sequence_parallel
        if spread is None:
            return self._run(
                hidden_states, encoder_hidden_states, timestep, rope, guidance, reference_kv, wrapper, contexts
            )
        if wrapper is not None:  # each rank would decide on its own shard of the image, and the ranks part ways
            raise InvalidOptionError("A block-loop option (such as cache) does not combine with --gpus.")
        # Several ranks: each runs its shard of the image tokens (and the whole text); attention gathers k/v.
        cos, sin = (mx.concatenate([t[:n_txt], spread.shard(t[None, n_txt:])[0]]) for t in rope)
        with spread.active(n_txt, n_img):
            out = self._run(
                spread.shard(hidden_states), encoder_hidden_states, timestep, (cos, sin), guidance, reference_kv
            )
        return spread.gather(out, n_img)

    def reference_kv(self, references: mx.array, rope: Rope, timestep: float = 0.0) -> list[KV]:
        """Keys and values of every attention layer (double blocks, then single blocks) for reference-image tokens
        [B, N_ref, C_in] alone, rope covering them: diffusers' Flux2KleinKV "extract" step, where reference tokens
        attend only to each other under the modulation of a fixed timestep (ref_fixed_timestep, 0). They depend on
        nothing else (not the prompt, not the noise), so they can be kept for every step and every request."""
        b = references.shape[0]
        with recording() as kv:  # no text stream at all (an empty one would launch zero-sized GPU kernels)
            self._run(references, None, mx.full((b,), timestep), rope, None, plain=True)
        return list(kv)

    def _run(
        self,
        hidden_states: mx.array,
        encoder_hidden_states: mx.array | None,
        timestep: mx.array,
        rope: Rope,
        guidance: mx.array | None,
        reference_kv: Sequence[KV] | None = None,
        wrapper: block_loop.LoopWrapper | None = None,
        contexts: tuple[tuple[str, slice], ...] = (("cond", slice(None)),),
        plain: bool = False,
    ) -> mx.array:
        n_txt = 0 if encoder_hidden_states is None else encoder_hidden_states.shape[1]
        dtype = hidden_states.dtype
        # diffusers casts to the activation dtype before scaling back to [0, 1000]
        temb = self.time_guidance_embed(
            timestep.astype(dtype) * 1000, None if guidance is None else guidance.astype(dtype) * 1000
        )
        # The modulations depend only on the timestep: computed once, shared by every block.
        mod_img = self.double_stream_modulation_img(temb)
        mod_txt = self.double_stream_modulation_txt(temb)
        mod_single = self.single_stream_modulation(temb)

        x = self.x_embedder(hidden_states)
        context = None if encoder_hidden_states is None else self.context_embedder(encoder_hidden_states)
        # plain: the modules themselves (recording reads each call's arrays, which compiled blocks only trace)
        every, double, single = (
            (0, self.transformer_blocks, self.single_transformer_blocks) if plain else self.paced_blocks()
        )
        extra = list(reference_kv) if reference_kv is not None else [None] * (len(double) + len(single))
        pace = Pacer(every)

        def first_block(state: block_loop.State) -> block_loop.State:
            x, context = double[0](*state, mod_img, mod_txt, rope, extra[0])
            pace(x, context)
            return x, context

        def later_blocks(state: block_loop.State) -> block_loop.State:
            x, context = state
            for block, kv in zip(double[1:], extra[1:]):
                x, context = block(x, context, mod_img, mod_txt, rope, kv)
                pace(x, context)
            if context is None:  # the KV variant's reference pass: image tokens alone
                for block, kv in zip(single, extra[len(double) :]):
                    x = block(x, mod_single, rope, kv)
                return x, None
            x = mx.concatenate([context, x], axis=1)
            for block, kv in zip(single, extra[len(double) :]):
                x = block(x, mod_single, rope, kv)
                pace(x)
            return x[:, n_txt:], x[:, :n_txt]

        loop = block_loop.BlockLoop(first_block, later_blocks, contexts)
        x, _ = block_loop.run(wrapper, loop, (x, context))
        return self.proj_out(self.norm_out(x, temb))
