"""FLUX.2 Klein pipeline: Qwen3 features -> flow-match Euler over the transformer -> VAE, with reference-image
editing, CFG for the base variants, and img2img / inpainting from an init image. Follows diffusers 0.42.1
Flux2KleinPipeline (pipeline_flux2_klein.py) and Flux2KleinInpaintPipeline (pipeline_flux2_klein_inpaint.py)."""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np
from PIL import Image

import imagegen
from imagegen import block_loop, scheduler
from imagegen.config import read_json
from imagegen.diffusers_pipeline import DiffusersPipeline
from imagegen.diffusers_pipeline import estimate_memory as diffusers_estimate
from imagegen.errors import InvalidImageError, InvalidOptionError, WeightsError
from imagegen.image import from_pil
from imagegen.img2img import Start, downsample_mask, image_pixels, mask_pixels

from .config import Flux2PipelineConfig, Flux2TransformerConfig
from .transformer import Flux2Transformer, quant_predicate
from .vae import AutoencoderKLFlux2

TEXT_LAYERS = (9, 18, 27)  # diffusers' text_encoder_out_layers: Qwen3 hidden states stacked per token
MAX_SEQUENCE_LENGTH = 512  # every prompt is padded to this and all positions reach the transformer
REFERENCE_MAX_AREA = 1024 * 1024  # larger reference images are resized down to this area (LANCZOS)
REFERENCE_MIN_SIDE, REFERENCE_MAX_ASPECT = 64, 8  # Flux2ImageProcessor.check_image_input
KV_PIPELINE = "Flux2KleinKVPipeline"  # diffusers' class of the 9B-KV checkpoint (kv_pipeline.py)
SETTINGS_FILE = "imagegen.json"  # optional per-checkpoint overrides (the demo model's short prompts)


@dataclass(frozen=True)
class Conditioning:
    text: mx.array  # [B, L, len(layers) * D] prompt embeddings
    negative: mx.array | None  # the same for the negative prompts when CFG runs
    references: mx.array | None  # [1, N_ref, C] packed reference-image tokens (the init image's first)
    reference_grids: tuple[tuple[int, int], ...]
    reference_kv: list | None = None  # the KV variant: each attention layer's reference keys/values instead
    init_latents: mx.array | None = None  # [1, N, C] the init image's latents, float32


def checkpoint_settings(root: Path) -> dict[str, Any]:
    """imagegen.json beside model_index.json: max_sequence_length, text_encoder_out_layers, defaults."""
    path = Path(root) / SETTINGS_FILE
    if not path.exists() and not path.is_symlink():
        return {}
    settings = read_json(path)
    if not isinstance(settings, dict):
        raise WeightsError(f"{path} must hold a JSON object, not a {type(settings).__name__}.")
    return settings


def capped_size(width: int, height: int) -> tuple[int, int]:
    """diffusers' cap on input images: at most 1024x1024 worth of pixels, same aspect ratio."""
    if width * height <= REFERENCE_MAX_AREA:
        return width, height
    scale = math.sqrt(REFERENCE_MAX_AREA / (width * height))
    return int(width * scale), int(height * scale)


def fit_area(image: Image.Image) -> Image.Image:
    """The image LANCZOS-resized down to `capped_size`."""
    size = capped_size(*image.size)
    return image if size == image.size else image.resize(size, Image.Resampling.LANCZOS)


def prepare_reference(image: Image.Image, multiple: int) -> Image.Image:
    """Resize down to at most 1024x1024 worth of pixels, then center-crop to multiples of `multiple`."""
    width, height = image.size
    if width < REFERENCE_MIN_SIDE or height < REFERENCE_MIN_SIDE:
        raise InvalidImageError(f"Reference image too small: {width}x{height} (both sides must be >= 64).")
    if max(width / height, height / width) > REFERENCE_MAX_ASPECT:
        raise InvalidImageError(f"Reference image aspect ratio too extreme: {width}x{height} (at most 8:1).")
    image = fit_area(image)
    width, height = image.size
    w, h = width // multiple * multiple, height // multiple * multiple
    left, top = (width - w) // 2, (height - h) // 2
    return image.crop((left, top, left + w, top + h))


def pipeline_class(root: Path) -> str:
    """model_index.json's `_class_name`: which diffusers pipeline saved the folder."""
    index = read_json(Path(root) / "model_index.json")
    return str(index.get("_class_name", "")) if isinstance(index, dict) else ""


def pack(latents: mx.array) -> mx.array:
    """[B, h, w, C] -> [B, h * w, C] tokens in row-major order."""
    b, h, w, c = latents.shape
    return latents.reshape(b, h * w, c)


class Flux2Pipeline(DiffusersPipeline):
    family_name = "FLUX.2"
    # model_index.json's _class_name: Klein and Klein KV (check_kind tells them apart); FLUX.2 dev is another model
    pipeline_classes = ("Flux2KleinPipeline", KV_PIPELINE)
    transformer_class, transformer_config, vae_class = Flux2Transformer, Flux2TransformerConfig, AutoencoderKLFlux2
    quant_predicate = staticmethod(quant_predicate)

    def configure(self, root: Path) -> None:
        """The checkpoint must match the spec's kind (distilled or base); imagegen.json may change the text setup."""
        self.check_kind(root)
        settings = checkpoint_settings(root)
        self.text_layers = tuple(settings.get("text_encoder_out_layers", TEXT_LAYERS))
        self.max_sequence_length = int(settings.get("max_sequence_length", MAX_SEQUENCE_LENGTH))

    def check_kind(self, root: Path) -> None:
        index = Flux2PipelineConfig.from_file(root / "model_index.json")
        if pipeline_class(root) == KV_PIPELINE:
            raise WeightsError(f"{root} holds a FLUX.2 Klein KV checkpoint: use the model 'flux2-klein-9b-kv'.")
        self.distilled = index.is_distilled
        if self.distilled != self.spec.extra.get("distilled", self.distilled):
            kind = "step-distilled" if self.distilled else "base (CFG)"
            raise WeightsError(f"{root} holds a {kind} FLUX.2 Klein checkpoint, which does not fit '{self.spec.id}'.")

    # 1. prompts and reference images (the init image first) -> conditioning
    def encode(self, request: imagegen.Request) -> Conditioning:
        text = self.embed_prompts(request.prompts)
        negative = None
        if self.uses_cfg(request):
            negative = self.embed_prompts(request.negative_prompts or ("",) * request.batch_size)
        references, grids = None, ()
        if request.images:
            references, grids = self.encode_references(request.images)
        if request.init is None:
            return Conditioning(text, negative, references, grids)
        pixels = image_pixels(fit_area(request.init.image), request.width, request.height)
        init = self.vae.encode_latents(pixels.astype(self.vae.dtype))  # the mean ("argmax"), as diffusers
        tokens = [pack(init).astype(self.model_dtype)] + ([references] if references is not None else [])
        return Conditioning(
            text,
            negative,
            mx.concatenate(tokens, axis=1),
            (init.shape[1:3], *grids),
            init_latents=pack(init).astype(mx.float32),
        )

    def uses_cfg(self, request: imagegen.Request) -> bool:
        return not self.distilled and request.guidance is not None and request.guidance > 1

    def embed_prompts(self, prompts: Sequence[str]) -> mx.array:
        """[B, L, layers * D]: each token's hidden states of the chosen layers, concatenated."""
        features = self.text_encoder.encode(prompts, self.text_layers, self.max_sequence_length, enable_thinking=False)
        stacked = mx.stack([f.hidden for f in features])  # [B, layers, L, D]
        b, n, length, d = stacked.shape
        return stacked.transpose(0, 2, 1, 3).reshape(b, length, n * d).astype(self.model_dtype)

    def encode_references(self, images: Sequence[Image.Image]) -> tuple[mx.array, tuple[tuple[int, int], ...]]:
        tokens, grids = [], []
        for image in images:
            pixels = from_pil(prepare_reference(image, self.multiple)).astype(self.vae.dtype)
            latents = self.vae.encode_latents(pixels)  # VAE mean, patchified, BN-normalized: [1, h, w, C]
            grids.append(latents.shape[1:3])
            tokens.append(pack(latents))
        return mx.concatenate(tokens, axis=1).astype(self.model_dtype), tuple(grids)

    # 2. initial noise, in diffusers' `latents=` layout [B, C, H/16, W/16]
    def latent_shape(self, request: imagegen.Request) -> tuple[int, int, int, int]:
        return (
            request.batch_size,
            self.latent_channels,
            request.height // self.multiple,
            request.width // self.multiple,
        )

    def prepare_latents(self, request: imagegen.Request) -> mx.array | Start:
        if request.init is not None:
            return self.start(request)
        latents = self.initial_latents(request, self.latent_shape(request), "(B, C, H/16, W/16)")
        return pack(latents.transpose(0, 2, 3, 1))  # float32 state, tokens [B, N, C]

    def start(self, request: imagegen.Request) -> Start:
        """Noise for the init image (its latents come from encode) and the mask on the latent grid (bilinear)."""
        if request.latents is not None:
            raise InvalidOptionError("Give either latents or an init image, not both.")
        b, c, h, w = self.latent_shape(request)
        noise = request.draws().latents((b, c, h, w), self.noise_dtype(request))
        mask = None
        if request.init.mask is not None:
            pixels = mask_pixels(request.init.mask, request.width, request.height)
            mask = mx.array(downsample_mask(pixels, h, w, "bilinear")).reshape(1, h * w, 1)
        return Start(None, pack(noise.transpose(0, 2, 3, 1)), mask, request.first_step)

    # 3. Euler steps over the transformer's velocity; inpainting blends the kept region back after each step
    def denoise_steps(
        self, request: imagegen.Request, cond: Conditioning, latents: mx.array | Start
    ) -> Iterator[mx.array]:
        start = latents if isinstance(latents, Start) else None
        if start is not None:
            start = replace(start, image_latents=mx.broadcast_to(cond.init_latents, start.noise.shape))
        b, n, _ = (start.noise if start else latents).shape
        grid = (request.height // self.multiple, request.width // self.multiple)
        use_flow = getattr(self.scheduler, "use_flow_sigmas", False)
        custom = None if use_flow else scheduler.default_sigmas(request.steps)
        sigmas = scheduler.sigmas(self.scheduler, request.steps, custom, scheduler.empirical_mu(n, request.steps))
        timesteps = scheduler.timesteps(sigmas, self.scheduler.num_train_timesteps)
        latents = start.begin(sigmas) if start else latents
        rope = self.transformer.rope(cond.text.shape[1], grid, cond.reference_grids)
        text = cond.text if cond.negative is None else mx.concatenate([cond.text, cond.negative])
        references = None
        if cond.references is not None:
            references = mx.broadcast_to(cond.references, (text.shape[0], *cond.references.shape[1:]))
        forward = self.transformer if self.paced else self.compiled("step", self.transformer)
        wrapper = block_loop.start(request)
        if wrapper is not None:  # diffusers runs CFG as two calls, "cond" and "uncond": a wrapper sees both parts
            parts = (("cond", slice(0, b)), ("uncond", slice(b, None))) if cond.negative is not None else ()
            forward = partial(self.transformer, wrapper=wrapper, contexts=parts or (("cond", slice(None)),))
        for i in range(request.first_step, request.steps):
            x = latents.astype(self.model_dtype)
            if cond.negative is not None:
                x = mx.concatenate([x, x])
            if references is not None:
                x = mx.concatenate([x, references], axis=1)
            t = mx.full((x.shape[0],), float(np.float32(timesteps[i]) / np.float32(1000)))
            velocity = forward(x, text, t, rope, None, cond.reference_kv)[:, :n]
            if cond.negative is not None:
                pos, neg = velocity[:b], velocity[b:]
                velocity = neg + request.guidance * (pos - neg)
            # float32 between steps as diffusers keeps them (euler_step returns the velocity's dtype)
            latents = scheduler.euler_step(latents, velocity.astype(mx.float32), float(sigmas[i]), float(sigmas[i + 1]))
            if start is not None:
                latents = start.after_step(latents, i, sigmas)
            yield latents

    # 4. the VAE's latents from the token state
    def vae_latents(self, request: imagegen.Request, latents: mx.array) -> mx.array:
        return latents.reshape(latents.shape[0], request.height // self.multiple, request.width // self.multiple, -1)


def init_size(image: Image.Image) -> tuple[int, int]:
    """Flux2KleinInpaintPipeline draws at the init image's size, capped in area, rounded down to multiples of 16."""
    width, height = capped_size(*image.size)
    return width // 16 * 16, height // 16 * 16


def reference_size(image: Image.Image) -> tuple[int, int]:
    """diffusers draws at the first reference image's size after preparation (multiples of 16)."""
    return prepare_reference(image, 16).size


def hidden_size(root: Path) -> int:
    return Flux2TransformerConfig.from_file(root / "transformer" / "config.json").inner_dim


# Peak bytes: the three components' weights plus the larger of the transformer's and the VAE's activations.
estimate_memory = partial(diffusers_estimate, hidden_size=hidden_size)
