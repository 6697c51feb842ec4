"""Z-Image pipeline: Qwen3 features (thinking template, valid tokens only) -> flow-match Euler over the
transformer (CFG with normalization and truncation for the base model) -> AutoencoderKL; img2img and inpainting
from an init image; a ControlNet steering the transformer. Follows diffusers 0.42.1 ZImagePipeline,
ZImageImg2ImgPipeline, ZImageInpaintPipeline, ZImageControlNetPipeline and ZImageControlNetInpaintPipeline
(pipelines/z_image/)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np

import imagegen
from imagegen import block_loop, hub, scheduler
from imagegen.diffusers_pipeline import DiffusersPipeline
from imagegen.diffusers_pipeline import estimate_memory as diffusers_estimate
from imagegen.errors import InvalidOptionError, WeightsError
from imagegen.img2img import Start, downsample_mask, image_pixels, mask_pixels
from imagegen.nn import AutoencoderKL

from .config import ZImageTransformerConfig
from .control import CONTROL_SCALE, check_control, control_context
from .controlnet import ControlInput, ZImageControlNet, load_controlnet
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
    control: mx.array | None = None  # the ControlNet's context [B, h, w, control_in_dim] (imagegen_zimage.control)


def _off_or_number(value: Any) -> Any:
    return float(value) if isinstance(value, bool) else value  # diffusers takes a bool or a float


OPTIONS = (
    imagegen.Option(
        "cfg_normalization",
        "float",
        "Cap the CFG prediction's norm at this times the conditional's (0 or false: off; true: 1).",
        minimum=0,
        convert=_off_or_number,
    ),
    imagegen.Option(
        "cfg_truncation",
        "float",
        "Stop CFG once the normalized time (1 - sigma) passes this (1: never).",
        minimum=0,
        maximum=1,
    ),
)


class ZImagePipeline(DiffusersPipeline):
    family_name = "Z-Image"
    pipeline_classes = ("ZImagePipeline",)
    transformer_class, transformer_config, vae_class = ZImageTransformer, ZImageTransformerConfig, AutoencoderKL
    quant_predicate = staticmethod(quant_predicate)
    text_layers = TEXT_LAYERS

    def configure(self, root: Path) -> None:
        """Turbo and base share every shape; their scheduler configs tell them apart (shift 3.0 vs 6.0, no dynamic
        shifting), as is_distilled does for FLUX.2 Klein. Folders with other schedulers (fine-tunes) pass."""
        config = scheduler.FlowMatchEulerConfig.from_file(root / "scheduler" / "scheduler_config.json")
        other = (
            None
            if config.use_dynamic_shifting
            else {TURBO_SHIFT: "zimage-turbo", BASE_SHIFT: "zimage"}.get(config.shift)
        )
        if other is not None and other != self.spec.id and self.spec.id in ("zimage-turbo", "zimage"):
            kind = "Z-Image Turbo" if other == "zimage-turbo" else "Z-Image base"
            raise WeightsError(
                f"{root} holds a {kind} checkpoint (scheduler shift {config.shift}), which does not "
                f"fit '{self.spec.id}': use --model {other}."
            )

    def __init__(self, *args: Any, controlnet: str | Path | None = None, **kwargs: Any):
        """`controlnet`: a ZImageControlNetModel folder in diffusers' layout, or a cached repo id (recorded in
        `components`); requests then take control_image, control_scale and canny."""
        super().__init__(*args, **kwargs)
        self.controlnet: ZImageControlNet | None = None
        if controlnet is not None:
            self.components["controlnet"] = str(controlnet)
            with self.loading("controlnet"):
                self.controlnet = load_controlnet(
                    hub.resolve_component(controlnet, "--controlnet"), self.transformer, self.dtype, self.quantize
                )
            self.controlnet.pace(self.paced)

    def weights_changed(self) -> None:
        super().weights_changed()
        if self.controlnet is not None:  # its compiled blocks captured the transformer's borrowed layers too
            self.controlnet.compiled_blocks.clear()

    def pace(self, every: int) -> None:
        super().pace(every)
        if getattr(self, "controlnet", None) is not None:  # its blocks are paced like the transformer's
            self.controlnet.pace(every)

    def forward(
        self,
        layout: Layout,
        wrapper: block_loop.LoopWrapper | None = None,
        control: mx.array | None = None,
        scale: float = 1.0,
    ):
        """The transformer for one layout: paced, or compiled once per layout (the layout holds no arrays
        mx.compile could take as inputs, so it is closed over; its captions and grid are the key); uncompiled around
        a plugin's block-loop wrapper. `control`: the ControlNet's context for these rows, steering with `scale`."""
        net = self.controlnet

        def step(x: mx.array, t: mx.array, c: mx.array, context: mx.array | None, s: mx.array | None) -> mx.array:
            steer = None if context is None else ControlInput(net, context, s)
            return self.transformer(x, t, c, layout, wrapper, steer)

        inputs = () if control is None else (control, mx.array(scale, dtype=self.model_dtype))
        if self.paced or wrapper is not None:
            return lambda x, t, c: step(x, t, c, *(inputs or (None, None)))
        run = step if control is not None else (lambda x, t, c: step(x, t, c, None, None))
        compiled = self.compiled(("step", layout.cap_lens, layout.height, layout.width, control is not None), run)
        return lambda x, t, c: compiled(x, t, c, *inputs)

    def run(self, prompt: str | Sequence[str] | imagegen.Request, **options: Any) -> imagegen.Run:
        """Checks a request's control options against the loaded ControlNet before any work."""
        if not isinstance(prompt, imagegen.Request):
            prompt, options = self.request(prompt, **options), {}
        check_control(prompt, self.controlnet, self.latent_channels)
        return super().run(prompt, **options)

    # 1. prompts -> Qwen3 features
    def encode(self, request: imagegen.Request) -> Conditioning:
        text, lengths = self.embed_prompts(request.prompts)
        control = None
        if self.controlled(request):  # the control image (and the masked init image) through the VAE encoder
            control = control_context(request, self.vae, self.controlnet.config.control_in_dim)
        if not self.uses_cfg(request):
            return Conditioning(text, lengths, None, control=control)
        negative, negative_lengths = self.embed_prompts(request.negative_prompts or ("",) * request.batch_size)
        return Conditioning(text, lengths, negative, negative_lengths, control)

    def controlled(self, request: imagegen.Request) -> bool:
        return check_control(request, self.controlnet, self.latent_channels)

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
        # diffusers draws text-to-image (and ControlNet inpainting) noise in float32, img2img / inpainting noise at
        # the prompt embeddings' dtype
        return "float32" if request.init is None or self.controlled(request) else self.dtype

    def default_strength(self, masked: bool) -> float:
        return 1.0 if masked else 0.6  # ZImageInpaintPipeline / ZImageImg2ImgPipeline

    def prepare_latents(self, request: imagegen.Request) -> mx.array | Start:
        # ControlNet inpainting starts from noise: the init image and the mask reach the ControlNet only
        if request.init is not None and not self.controlled(request):
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
        mu = scheduler.linear_mu(
            (h // 2) * (w // 2),
            cfg.base_image_seq_len,
            cfg.max_image_seq_len,
            cfg.base_shift if cfg.base_shift is not None else 0.5,
            cfg.max_shift if cfg.max_shift is not None else 1.15,
        )
        custom = np.linspace(1.0, 1.0 / request.steps, request.steps, dtype=np.float32)  # torch.linspace
        sigmas = scheduler.sigmas(cfg, request.steps, custom, mu)
        timesteps = scheduler.timesteps(sigmas, cfg.num_train_timesteps)
        return sigmas, (np.float32(1000) - timesteps) / np.float32(1000)

    # 3. Euler steps; CFG per step unless truncated; inpainting blends the kept region back after each step
    def denoise_steps(
        self, request: imagegen.Request, cond: Conditioning, latents: mx.array | Start
    ) -> Iterator[mx.array]:
        start = latents if isinstance(latents, Start) else None
        b, h, w, _ = (start.noise if start else latents).shape
        sigmas, t_norms = self.schedule(request, h, w)
        latents = start.begin(sigmas) if start else latents
        wrapper = block_loop.start(request)
        scale = request.option("control_scale", CONTROL_SCALE)
        forward = self.forward(self.transformer.layout(cond.lengths, h, w), wrapper, cond.control, scale)
        if cond.negative is not None:
            width = max(cond.text.shape[1], cond.negative.shape[1])
            pad = [mx.pad(t, [(0, 0), (0, width - t.shape[1]), (0, 0)]) for t in (cond.text, cond.negative)]
            both = mx.concatenate(pad)
            control = None if cond.control is None else mx.concatenate([cond.control, cond.control])
            forward_cfg = self.forward(
                self.transformer.layout(cond.lengths + cond.negative_lengths, h, w), wrapper, control, scale
            )
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


def renormalize(prediction: mx.array, conditional: mx.array, factor: float) -> mx.array:
    """Per sample: scale the CFG prediction down so its norm is at most `factor` times the conditional's."""
    axes = tuple(range(1, prediction.ndim))
    limit = mx.sqrt(mx.sum(conditional * conditional, axis=axes, keepdims=True)) * factor
    norm = mx.sqrt(mx.sum(prediction * prediction, axis=axes, keepdims=True))
    return mx.where(norm > limit, prediction * (limit / norm), prediction)


def hidden_size(root: Path) -> int:
    return ZImageTransformerConfig.from_file(root / "transformer" / "config.json").dim


# Peak bytes: weights plus the larger of the transformer's (CFG doubles its batch) and the VAE's activations.
estimate_memory = partial(diffusers_estimate, hidden_size=hidden_size, cfg_doubles=True)
