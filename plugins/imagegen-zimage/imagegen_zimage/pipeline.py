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
from PIL import Image

import imagegen
from imagegen import scheduler
from imagegen.config import read_pipeline_index
from imagegen.errors import InvalidOptionError, WeightsError
from imagegen.image import to_pil
from imagegen.memory import pipeline_weight_bytes
from imagegen.nn import AutoencoderKL
from imagegen.text import load_text_encoder
from imagegen.weights import load_model, to_dtype

from .config import ZImageTransformerConfig
from .transformer import Layout, ZImageTransformer, quant_predicate

TEXT_LAYERS = (-2,)  # the second-to-last hidden state of the Qwen3 encoder
MAX_SEQUENCE_LENGTH = 512
TURBO_SHIFT, BASE_SHIFT = 3.0, 6.0  # scheduler_config.json of Tongyi-MAI/Z-Image-Turbo and Tongyi-MAI/Z-Image


@dataclass(frozen=True)
class Conditioning:
    text: mx.array  # [B, L, D]: each prompt's valid tokens first (then padding the transformer ignores)
    lengths: tuple[int, ...]
    negative: mx.array | None
    negative_lengths: tuple[int, ...] = ()


def cfg_normalization(value: Any) -> float:
    """Cap the CFG prediction's norm at `value` times the conditional's (0 or False: off; True: 1.0)."""
    value = float(value)
    if value < 0:
        raise InvalidOptionError(f"cfg_normalization must be >= 0, got {value}.")
    return value


def cfg_truncation(value: Any) -> float:
    """Stop CFG once the normalized time (1 - sigma) passes this value (1.0: never)."""
    value = float(value)
    if not 0 <= value <= 1:
        raise InvalidOptionError(f"cfg_truncation must be within [0, 1], got {value}.")
    return value


def check_variant(spec: imagegen.ModelSpec, root: Path, config: scheduler.FlowMatchEulerConfig) -> None:
    """Turbo and base share every shape; their scheduler configs tell them apart (shift 3.0 vs 6.0, no dynamic
    shifting), as is_distilled does for FLUX.2 Klein. Folders with other schedulers (fine-tunes) pass."""
    if config.use_dynamic_shifting:
        return
    other = {TURBO_SHIFT: "zimage-turbo", BASE_SHIFT: "zimage"}.get(config.shift)
    if other is not None and other != spec.id and spec.id in ("zimage-turbo", "zimage"):
        kind = "Z-Image Turbo" if other == "zimage-turbo" else "Z-Image base"
        raise WeightsError(f"{root} holds a {kind} checkpoint (scheduler shift {config.shift}), which does not fit "
                           f"'{spec.id}': use --model {other}.")


class ZImagePipeline(imagegen.Pipeline):
    def __init__(self, spec: imagegen.ModelSpec, weights: Path, dtype: str = "bfloat16",
                 quantize: str | None = None, on_load=None, compile: bool = True, pace: int = 1):
        """`pace`: see `pace()`; on an H100 at 1024x1024, pace 1 takes a step's peak from 8.2 to 1.2 GB above the
        weights for +0.8% time."""
        super().__init__(spec, weights, dtype, quantize, on_load)
        root = Path(weights)
        read_pipeline_index(root, ("ZImagePipeline",), "Z-Image")
        self.scheduler = scheduler.FlowMatchEulerConfig.from_file(root / "scheduler" / "scheduler_config.json")
        check_variant(spec, root, self.scheduler)
        with self.loading("text encoder"):
            self.text_encoder = load_text_encoder(root / "text_encoder", root / "tokenizer", dtype, quantize,
                                                  TEXT_LAYERS)
        with self.loading("transformer"):
            self.transformer = load_model(ZImageTransformer, ZImageTransformerConfig, root / "transformer", dtype,
                                          quantize, quant_predicate)
        with self.loading("vae"):
            self.vae = AutoencoderKL.from_folder(root / "vae", dtype)
        self.model_dtype = to_dtype(dtype)
        self.latent_channels = self.transformer.config.in_channels
        self.multiple = 2 * self.vae.scale_factor  # the transformer patchifies latents 2x2
        self.compile = compile
        self._compiled: dict[int, Any] = {}  # id(layout) -> compiled step (layouts are cached per shape)
        self.pace(pace)

    def pace(self, every: int) -> None:
        """every > 0: blocks compiled one by one, the host waiting every `every` blocks (imagegen.nn.pacing: bounded
        memory); 0: the whole transformer call compiled as one graph."""
        self.paced = every
        self.transformer.pace(every if self.compile else 0)

    def forward(self, layout: Layout):
        """The transformer for one layout: paced, or compiled once per layout (the layout holds no arrays
        mx.compile could take as inputs, so it is closed over)."""
        if not self.compile or self.paced:
            return lambda x, t, c: self.transformer(x, t, c, layout)
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
        forward = self.forward(self.transformer.layout(cond.lengths, h, w))
        if cond.negative is not None:
            width = max(cond.text.shape[1], cond.negative.shape[1])
            pad = [mx.pad(t, [(0, 0), (0, width - t.shape[1]), (0, 0)]) for t in (cond.text, cond.negative)]
            both = mx.concatenate(pad)
            forward_cfg = self.forward(self.transformer.layout(cond.lengths + cond.negative_lengths, h, w))
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

    # 4. latents -> images
    def decode(self, request: imagegen.Request, latents: mx.array) -> list[Image.Image]:
        images = []
        for one in latents.astype(self.vae.dtype):  # one at a time keeps the VAE's peak flat in the batch
            images.extend(to_pil(self.vae.decode_latents(one[None], tile=True if request.tile else False)))
        return images


def renormalize(prediction: mx.array, conditional: mx.array, factor: float) -> mx.array:
    """Per sample: scale the CFG prediction down so its norm is at most `factor` times the conditional's."""
    axes = tuple(range(1, prediction.ndim))
    limit = mx.sqrt(mx.sum(conditional * conditional, axis=axes, keepdims=True)) * factor
    norm = mx.sqrt(mx.sum(prediction * prediction, axis=axes, keepdims=True))
    return mx.where(norm > limit, prediction * (limit / norm), prediction)


def estimate_memory(spec: imagegen.ModelSpec, weights: Path | None, dtype: str, quantize: str | None,
                    width: int, height: int, batch: int) -> int:
    """Peak bytes: weights plus the larger of the transformer's and the VAE's activations."""
    if weights is None or not (Path(weights) / "transformer").is_dir():
        return 0
    root = Path(weights)
    config = ZImageTransformerConfig.from_file(root / "transformer" / "config.json")
    tokens = (width // 16) * (height // 16) + MAX_SEQUENCE_LENGTH
    cfg = 2 if spec.accepts("guidance") else 1
    transformer_activations = cfg * batch * tokens * config.dim * 2 * 16
    vae_activations = width * height * 128 * 2 * 6
    return int(pipeline_weight_bytes(root, dtype, quantize) + max(transformer_activations, vae_activations))
