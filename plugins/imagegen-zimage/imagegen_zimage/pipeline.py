"""Z-Image pipeline: Qwen3 features (thinking template, valid tokens only) -> flow-match Euler over the
transformer (CFG with normalization and truncation for the base model) -> AutoencoderKL; img2img and inpainting
from an init image. Follows diffusers 0.42.1 ZImagePipeline, ZImageImg2ImgPipeline and ZImageInpaintPipeline
(pipelines/z_image/)."""

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
from imagegen.errors import InvalidOptionError, WeightsError
from imagegen.image import to_pil
from imagegen.img2img import Start, downsample_mask, image_pixels, mask_pixels
from imagegen.memory import pipeline_weight_bytes
from imagegen.nn import AutoencoderKL
from imagegen.text import load_text_encoder
from imagegen.weights import load_model, to_dtype

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


class ZImagePipeline(imagegen.Pipeline):
    def __init__(self, spec: imagegen.ModelSpec, weights: Path, dtype: str = "bfloat16",
                 quantize: str | None = None, on_load=None, compile: bool = True, pace: int = 1):
        """`pace`: see `pace()`; on an H100 at 1024x1024, pace 1 takes a step's peak from 8.2 to 1.2 GB above the
        weights for +0.8% time."""
        super().__init__(spec, weights, dtype, quantize, on_load)
        root = Path(weights)
        if not (root / "model_index.json").is_file():
            raise WeightsError(f"{root} is not a Z-Image diffusers folder: model_index.json is missing.")
        with self.loading("text encoder"):
            self.text_encoder = load_text_encoder(root / "text_encoder", root / "tokenizer", dtype, quantize,
                                                  TEXT_LAYERS)
        with self.loading("transformer"):
            self.transformer = load_model(ZImageTransformer, ZImageTransformerConfig, root / "transformer", dtype,
                                          quantize, quant_predicate)
        with self.loading("vae"):
            self.vae = AutoencoderKL.from_folder(root / "vae", dtype)
        self.scheduler = scheduler.FlowMatchEulerConfig.from_file(root / "scheduler" / "scheduler_config.json")
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

    # 2. initial noise, in diffusers' `latents=` layout [B, 16, H/8, W/8]; or the noised init image
    def latent_shape(self, request: imagegen.Request) -> tuple[int, int, int, int]:
        f = self.vae.scale_factor
        return (request.batch_size, self.latent_channels, request.height // f, request.width // f)

    def noise_dtype(self, request: imagegen.Request) -> str:
        # diffusers draws text-to-image noise in float32, img2img / inpainting noise at the prompt embeddings' dtype
        return "float32" if request.init is None else self.dtype

    def default_strength(self, masked: bool) -> float:
        return 1.0 if masked else 0.6  # ZImageInpaintPipeline / ZImageImg2ImgPipeline

    def prepare_latents(self, request: imagegen.Request) -> mx.array | Start:
        if request.init is not None:
            return self.start(request)
        latents = self.initial_latents(request, self.latent_shape(request), "(B, C, H/8, W/8)")
        return latents.transpose(0, 2, 3, 1)  # NHWC, float32 as diffusers keeps them

    def start(self, request: imagegen.Request) -> Start:
        """The init image's latents (a VAE posterior sample, drawn first) noised to the first step's sigma with
        noise drawn next; the mask on the latent grid (nearest)."""
        if request.latents is not None:
            raise InvalidOptionError("Give either latents or an init image, not both.")
        b, c, h, w = self.latent_shape(request)
        draws = request.draws()
        pixels = image_pixels(request.init.image, request.width, request.height).astype(self.vae.dtype)
        mean, logvar = self.vae.encode_moments(pixels)
        sample = draws.sample((1, c, h, w), self.dtype).transpose(0, 2, 3, 1).astype(mean.dtype)
        image_latents = self.vae.normalize_latents(mean + mx.exp(0.5 * logvar) * sample).astype(mx.float32)
        image_latents = mx.broadcast_to(image_latents, (b, h, w, c))
        noise = draws.latents((b, c, h, w), self.noise_dtype(request)).transpose(0, 2, 3, 1)
        mask = None
        if request.init.mask is not None:
            pixels_mask = mask_pixels(request.init.mask, request.width, request.height)
            mask = mx.array(downsample_mask(pixels_mask, h, w, "nearest"))[None, :, :, None]
        return Start(image_latents, noise, mask, request.first_step)

    def schedule(self, request: imagegen.Request, h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
        """(sigmas, the transformer's time input per step) for a latent grid of h x w."""
        cfg = self.scheduler
        mu = scheduler.linear_mu((h // 2) * (w // 2), cfg.base_image_seq_len, cfg.max_image_seq_len,
                                 cfg.base_shift if cfg.base_shift is not None else 0.5,
                                 cfg.max_shift if cfg.max_shift is not None else 1.15)
        custom = np.linspace(1.0, 1.0 / request.steps, request.steps, dtype=np.float32)  # torch.linspace
        sigmas = scheduler.sigmas(cfg, request.steps, custom, mu)
        timesteps = scheduler.timesteps(sigmas, cfg.num_train_timesteps)
        return sigmas, (np.float32(1000) - timesteps) / np.float32(1000)

    # 3. Euler steps; CFG per step unless truncated; inpainting blends the kept region back after each step
    def denoise_steps(self, request: imagegen.Request, cond: Conditioning, latents: mx.array | Start
                      ) -> Iterator[mx.array]:
        start = latents if isinstance(latents, Start) else None
        b, h, w, _ = (start.noise if start else latents).shape
        sigmas, t_norms = self.schedule(request, h, w)
        latents = start.begin(sigmas) if start else latents
        forward = self.forward(self.transformer.layout(cond.lengths, h, w))
        if cond.negative is not None:
            width = max(cond.text.shape[1], cond.negative.shape[1])
            pad = [mx.pad(t, [(0, 0), (0, width - t.shape[1]), (0, 0)]) for t in (cond.text, cond.negative)]
            both = mx.concatenate(pad)
            forward_cfg = self.forward(self.transformer.layout(cond.lengths + cond.negative_lengths, h, w))
        truncation = request.option("cfg_truncation", 1.0)
        normalization = request.option("cfg_normalization", 0.0)
        for i in range(request.first_step, request.steps):
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
            if start is not None:
                latents = start.after_step(latents, i, sigmas)
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
