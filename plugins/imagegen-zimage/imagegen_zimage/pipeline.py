"""Z-Image pipeline: Qwen3 features (thinking template, valid tokens only) -> flow-match Euler over the
transformer (CFG with normalization and truncation for the base model) -> AutoencoderKL. Follows diffusers
0.42.1 ZImagePipeline (pipelines/z_image/pipeline_z_image.py)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np

import imagegen
from imagegen import block_loop, scheduler
from imagegen.diffusers_pipeline import DiffusersPipeline
from imagegen.diffusers_pipeline import estimate_memory as diffusers_estimate
from imagegen.nn import AutoencoderKL

from .config import ZImageTransformerConfig
from .transformer import Layout, ZImageTransformer, quant_predicate

TEXT_LAYERS = (-2,)  # the second-to-last hidden state of the Qwen3 encoder
MAX_SEQUENCE_LENGTH = 512


@dataclass(frozen=True)
class Conditioning:
    text: mx.array  # [B, L, D]: each prompt's valid tokens first (then padding the transformer ignores)
    lengths: tuple[int, ...]
    negative: mx.array | None
    negative_lengths: tuple[int, ...] = ()


def _off_or_number(value: Any) -> Any:
    return float(value) if isinstance(value, bool) else value  # diffusers takes a bool or a float


OPTIONS = (
    imagegen.Option("cfg_normalization", "float", "Cap the CFG prediction's norm at this times the conditional's "
                    "(0 or false: off; true: 1).", minimum=0, convert=_off_or_number),
    imagegen.Option("cfg_truncation", "float", "Stop CFG once the normalized time (1 - sigma) passes this "
                    "(1: never).", minimum=0, maximum=1),
)


class ZImagePipeline(DiffusersPipeline):
    family_name = "Z-Image"
    transformer_class, transformer_config, vae_class = ZImageTransformer, ZImageTransformerConfig, AutoencoderKL
    quant_predicate = staticmethod(quant_predicate)
    text_layers = TEXT_LAYERS

    def __init__(self, *args: Any, **kwargs: Any):
        self._compiled: dict[int, Any] = {}  # id(layout) -> (layout, compiled step); layouts are cached per shape
        super().__init__(*args, **kwargs)

    def forward(self, layout: Layout, wrapper: block_loop.LoopWrapper | None = None):
        """The transformer for one layout: paced, or compiled once per layout (the layout holds no arrays
        mx.compile could take as inputs, so it is closed over); uncompiled around a plugin's block-loop wrapper."""
        if self.paced or wrapper is not None:
            return lambda x, t, c: self.transformer(x, t, c, layout, wrapper)
        if id(layout) not in self._compiled:
            self._compiled[id(layout)] = (layout, mx.compile(lambda x, t, c: self.transformer(x, t, c, layout)))
        return self._compiled[id(layout)][1]

    # 1. prompts -> Qwen3 features
    def encode(self, request: imagegen.Request) -> Conditioning:
        text, lengths = self.embed_prompts(request.prompts)
        if not self.uses_cfg(request):
            return Conditioning(text, lengths, None)
        negative, negative_lengths = self.embed_prompts(request.negative_prompts or ("",) * request.batch_size)
        return Conditioning(text, lengths, negative, negative_lengths)

    def uses_cfg(self, request: imagegen.Request) -> bool:
        return request.guidance is not None and request.guidance > 0  # diffusers: guidance_scale > 0

    def embed_prompts(self, prompts: Sequence[str]) -> tuple[mx.array, tuple[int, ...]]:
        features = self.text_encoder.encode(prompts, TEXT_LAYERS, MAX_SEQUENCE_LENGTH, enable_thinking=True)
        longest = max(f.length for f in features)
        text = mx.stack([f.hidden[0, :longest] for f in features]).astype(self.model_dtype)
        return text, tuple(f.length for f in features)

    # 2. initial noise, in diffusers' `latents=` layout [B, 16, H/8, W/8]
    def latent_shape(self, request: imagegen.Request) -> tuple[int, int, int, int]:
        f = self.vae.scale_factor
        return (request.batch_size, self.latent_channels, request.height // f, request.width // f)

    def prepare_latents(self, request: imagegen.Request) -> mx.array:
        latents = self.initial_latents(request, self.latent_shape(request), "(B, C, H/8, W/8)")
        return latents.transpose(0, 2, 3, 1)  # NHWC, float32 as diffusers keeps them

    # 3. Euler steps; CFG per step unless truncated
    def denoise_steps(self, request: imagegen.Request, cond: Conditioning, latents: mx.array) -> Iterator[mx.array]:
        b, h, w, _ = latents.shape
        cfg = self.scheduler
        mu = scheduler.linear_mu((h // 2) * (w // 2), cfg.base_image_seq_len, cfg.max_image_seq_len,
                                 cfg.base_shift if cfg.base_shift is not None else 0.5,
                                 cfg.max_shift if cfg.max_shift is not None else 1.15)
        custom = np.linspace(1.0, 1.0 / request.steps, request.steps, dtype=np.float32)  # torch.linspace
        sigmas = scheduler.sigmas(cfg, request.steps, custom, mu)
        timesteps = scheduler.timesteps(sigmas, cfg.num_train_timesteps)
        t_norms = (np.float32(1000) - timesteps) / np.float32(1000)  # the transformer's time input
        wrapper = block_loop.start(request)
        forward = self.forward(self.transformer.layout(cond.lengths, h, w), wrapper)
        if cond.negative is not None:
            width = max(cond.text.shape[1], cond.negative.shape[1])
            pad = [mx.pad(t, [(0, 0), (0, width - t.shape[1]), (0, 0)]) for t in (cond.text, cond.negative)]
            both = mx.concatenate(pad)
            forward_cfg = self.forward(self.transformer.layout(cond.lengths + cond.negative_lengths, h, w), wrapper)
        truncation = request.option("cfg_truncation", 1.0)
        normalization = request.option("cfg_normalization", 0.0)
        for i in range(request.steps):
            t = mx.full((b,), float(t_norms[i]))
            x = latents.astype(self.model_dtype)
            guidance = request.guidance if cond.negative is not None and t_norms[i] <= truncation else 0.0
            if guidance > 0:
                out = forward_cfg(mx.concatenate([x, x]), mx.concatenate([t, t]), both)
                pos, neg = out[:b].astype(mx.float32), out[b:].astype(mx.float32)
                prediction = pos + guidance * (pos - neg)
                if normalization > 0:
                    prediction = renormalize(prediction, pos, normalization)
            else:
                prediction = forward(x, t, cond.text).astype(mx.float32)
            latents = scheduler.euler_step(latents, -prediction, float(sigmas[i]), float(sigmas[i + 1]))
            yield latents


def renormalize(prediction: mx.array, conditional: mx.array, factor: float) -> mx.array:
    """Per sample: scale the CFG prediction down so its norm is at most `factor` times the conditional's."""
    axes = tuple(range(1, prediction.ndim))
    limit = mx.sqrt(mx.sum(conditional * conditional, axis=axes, keepdims=True)) * factor
    norm = mx.sqrt(mx.sum(prediction * prediction, axis=axes, keepdims=True))
    return mx.where(norm > limit, prediction * (limit / norm), prediction)


def estimate_memory(spec: imagegen.ModelSpec, weights: Path | None, dtype: str, quantize: str | None,
                    width: int, height: int, batch: int) -> int:
    """Peak bytes: weights plus the larger of the transformer's (CFG doubles its batch) and the VAE's activations."""
    cfg = 2 if spec.accepts("guidance") else 1
    return diffusers_estimate(weights, dtype, quantize, width, height, batch, hidden_size, cfg)


def hidden_size(root: Path) -> int:
    return ZImageTransformerConfig.from_file(root / "transformer" / "config.json").dim
