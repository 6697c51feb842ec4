"""Qwen3 decoder stack as a text encoder (hidden states of chosen layers); follows transformers' modeling_qwen3.py.

Loads a `Qwen3ForCausalLM` or `Qwen3Model` folder (config.json + safetensors). The language-model head is
never used by an encoder, so it is not loaded. Qwen3 has no attention sinks. Sliding-window layers
(a config option no released Qwen3 checkpoint enables) are refused.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from pydantic import model_validator

from ..config import HFConfig
from ..nn import attention, causal_mask, combine_masks, padding_mask
from ..nn.pacing import Pacer
from ..quantize import keep_high_precision
from ..weights import load_model

# The embedding table is a lookup: quantizing it saves memory but no time, and its error would enter
# the residual stream of every token before the first layer. Every Linear of the stack is quantized.
quant_predicate = keep_high_precision("embed_tokens")


class Qwen3Config(HFConfig):
    """config.json of Qwen3ForCausalLM / Qwen3Model (defaults are transformers' Qwen3Config defaults)."""

    required = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")

    vocab_size: int = 151936
    hidden_size: int = 4096
    intermediate_size: int = 22016
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None  # None: as many as query heads
    head_dim: int = 128
    hidden_act: str = "silu"
    max_position_embeddings: int = 32768
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10_000.0  # transformers' default_theta when a config names none
    rope_parameters: dict[str, Any] | None = None  # transformers 5 keeps rope_theta here
    rope_scaling: dict[str, Any] | None = None  # transformers 4 name of rope_parameters
    attention_bias: bool = False
    use_sliding_window: bool = False
    sliding_window: int | None = 4096
    max_window_layers: int = 28
    layer_types: list[str] | None = None

    @model_validator(mode="after")
    def _check(self) -> Qwen3Config:
        rope = self.rope_parameters or self.rope_scaling or {}
        kind = rope.get("rope_type", rope.get("type", "default"))
        if kind != "default":
            raise ValueError(f"RoPE type '{kind}' is not supported (only 'default')")
        if self.hidden_act != "silu":
            raise ValueError(f"activation '{self.hidden_act}' is not supported (only 'silu')")
        sliding = (
            self.use_sliding_window
            and self.sliding_window is not None
            and (self.max_window_layers < self.num_hidden_layers)
        )
        if sliding or any(t != "full_attention" for t in self.layer_types or ()):
            raise ValueError("sliding-window attention layers are not supported")
        return self

    @property
    def theta(self) -> float:
        return float((self.rope_parameters or self.rope_scaling or {}).get("rope_theta", self.rope_theta))

    @property
    def kv_heads(self) -> int:
        return self.num_key_value_heads or self.num_attention_heads


def rope_periods(head_dim: int, theta: float) -> mx.array:
    """theta^(2i/d) rounded once to float32, as torch computes it; mx.fast.rope takes their reciprocal."""
    return mx.array((theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)).astype(np.float32))


class Qwen3Attention(nn.Module):
    """Grouped-query attention with RMSNorm on each query/key head, half-split RoPE."""

    def __init__(self, cfg: Qwen3Config):
        super().__init__()
        self.head_dim = d = cfg.head_dim
        bias = cfg.attention_bias
        self.q_proj = nn.Linear(cfg.hidden_size, cfg.num_attention_heads * d, bias=bias)
        self.k_proj = nn.Linear(cfg.hidden_size, cfg.kv_heads * d, bias=bias)
        self.v_proj = nn.Linear(cfg.hidden_size, cfg.kv_heads * d, bias=bias)
        self.o_proj = nn.Linear(cfg.num_attention_heads * d, cfg.hidden_size, bias=bias)
        self.q_norm = nn.RMSNorm(d, eps=cfg.rms_norm_eps)
        self.k_norm = nn.RMSNorm(d, eps=cfg.rms_norm_eps)

    def __call__(self, x: mx.array, mask: mx.array, periods: mx.array) -> mx.array:
        b, length, _ = x.shape
        d = self.head_dim
        q = self.q_norm(self.q_proj(x).reshape(b, length, -1, d)).transpose(0, 2, 1, 3)
        k = self.k_norm(self.k_proj(x).reshape(b, length, -1, d)).transpose(0, 2, 1, 3)
        v = self.v_proj(x).reshape(b, length, -1, d).transpose(0, 2, 1, 3)
        q = mx.fast.rope(q, d, traditional=False, base=None, scale=1.0, offset=0, freqs=periods)
        k = mx.fast.rope(k, d, traditional=False, base=None, scale=1.0, offset=0, freqs=periods)
        out = attention(q, k, v, mask=mask)
        return self.o_proj(out.transpose(0, 2, 1, 3).reshape(b, length, -1))


class Qwen3MLP(nn.Module):
    def __init__(self, cfg: Qwen3Config):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def __call__(self, x: mx.array) -> mx.array:
        return self.down_proj(nn.silu(self.gate_proj(x)) * self.up_proj(x))


class Qwen3DecoderLayer(nn.Module):
    def __init__(self, cfg: Qwen3Config):
        super().__init__()
        self.self_attn = Qwen3Attention(cfg)
        self.mlp = Qwen3MLP(cfg)
        self.input_layernorm = nn.RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)
        self.post_attention_layernorm = nn.RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)

    def __call__(self, x: mx.array, mask: mx.array, periods: mx.array) -> mx.array:
        x = x + self.self_attn(self.input_layernorm(x), mask, periods)
        return x + self.mlp(self.post_attention_layernorm(x))


class Qwen3Model(nn.Module):
    """The decoder stack. Hidden-state indices follow transformers' `output_hidden_states`: 0 is the
    embeddings, i the output of layer i, and the last (num_hidden_layers) has the final norm applied."""

    def __init__(self, config: Qwen3Config):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = [Qwen3DecoderLayer(config) for _ in range(config.num_hidden_layers)]
        self.norm = nn.RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self._periods = rope_periods(config.head_dim, config.theta)

    @property
    def quantized(self) -> bool:
        """Whether any layer holds quantized weights."""
        return any(isinstance(m, nn.QuantizedLinear) for m in self.layers[0].modules()) if self.layers else False

    def sanitize(self, weights: dict[str, mx.array]) -> dict[str, mx.array]:
        """Strip Qwen3ForCausalLM's `model.` prefix and drop its head (absent anyway when tied to the embedding)."""
        return {k.removeprefix("model."): v for k, v in weights.items() if not k.startswith("lm_head.")}

    def resolve_layers(self, layers: Sequence[int]) -> list[int]:
        """Hidden-state indices in [0, num_hidden_layers]; negative ones count from the end (-1 = last)."""
        count = len(self.layers) + 1
        bad = [i for i in layers if not -count <= i < count]
        if bad:
            raise ValueError(f"hidden-state indices {bad} out of range for {count} hidden states")
        return [i % count for i in layers]

    def forward_with_layer_outputs(
        self, input_ids: mx.array, attention_mask: mx.array | None, layers: Sequence[int]
    ) -> list[mx.array]:
        """Hidden states [B, L, D] of the asked indices (in the asked order); runs no layer past the last one.

        input_ids: [B, L] ints; attention_mask: [B, L] (1/True = real token) or None. Positions are 0..L-1
        for every row, as transformers uses them for right-padded batches."""
        wanted = self.resolve_layers(layers)
        last = max(wanted)
        x = self.embed_tokens(input_ids)
        # causal AND key is a real token: [B or 1, 1, L, L]; right padding leaves no row fully masked. One mask over
        # the padded length, not mask-free calls split at the prompt's length: those were faster per call, but each
        # new prompt length is a new attention shape, ~65 ms of cuDNN planning on an H200.
        pad = padding_mask(attention_mask) if attention_mask is not None else None
        mask = combine_masks(causal_mask(input_ids.shape[1])[None, None], pad)
        states = {0: x} if 0 in wanted else {}
        # quantized: one layer in flight, or the dense temporaries of their weights (imagegen.nn.quantized_linear)
        # pile up over the stack in the GPU's command batches; unquantized, one graph (pacing cost a bf16 Klein
        # prompt 5 ms on an H200)
        pace = Pacer(1 if self.quantized else 0)
        for i, layer in enumerate(self.layers[:last]):
            x = layer(x, mask, self._periods)
            pace(x)
            if i + 1 in wanted:
                states[i + 1] = x
        if last == len(self.layers):
            states[last] = self.norm(x)
        return [states[i] for i in wanted]

    def __call__(self, input_ids: mx.array, attention_mask: mx.array | None = None) -> mx.array:
        """The last hidden state (final norm applied), [B, L, D]."""
        return self.forward_with_layer_outputs(input_ids, attention_mask, [-1])[0]


def load_qwen3(
    folder: str | Path,
    dtype: str | mx.Dtype = "bfloat16",
    quantize: str | None = None,
    layers: Sequence[int] | None = None,
) -> Qwen3Model:
    """A Qwen3 text encoder from a checkpoint folder (config.json + safetensors), optionally quantized.

    `layers`: the hidden-state indices the caller will ask for. Weights of later layers stay on disk
    (lazily mapped) until a caller runs them: FLUX.2 stops at 27 of 36, so a quarter is never read."""
    config = Qwen3Config.from_file(Path(folder) / "config.json")
    defer = None
    if layers is not None:
        count = config.num_hidden_layers
        needed = max(i % (count + 1) for i in layers)
        deferred = {f"layers.{i}." for i in range(needed, count)} | ({"norm."} if needed < count else set())
        defer = lambda name: any(name.startswith(d) for d in deferred)  # noqa: E731
    model = load_model(Qwen3Model, Qwen3Config, folder, dtype, quantize, quant_predicate, defer=defer)
    return model
