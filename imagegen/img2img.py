"""Image to image, shared by the families: strength -> steps, init image and mask preparation, noising and
blending, outpainting. Follows diffusers 0.42.1 (ZImageImg2ImgPipeline, ZImageInpaintPipeline,
Flux2KleinInpaintPipeline and VaeImageProcessor)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING, Any

import mlx.core as mx
import numpy as np
from PIL import Image

from .errors import InvalidOptionError

if TYPE_CHECKING:
    from .registry import ModelSpec


@dataclass(frozen=True)
class InitImage:
    """The picture to start from, what to repaint (mask: white = repaint; None: all of it, plain img2img), the
    strength, and the outpaint border. `image` and `mask` are what the pipelines use (the border added)."""

    source: Image.Image  # as given (RGB; remembers its file name and hash for the metadata)
    mask_source: Image.Image | None
    strength: float
    outpaint: tuple[int, int, int, int] | None = None

    @cached_property
    def _grown(self) -> tuple[Image.Image, Image.Image | None]:
        return outpaint(self.source, self.outpaint) if self.outpaint else (self.source, self.mask_source)

    @property
    def image(self) -> Image.Image:
        return self._grown[0]

    @property
    def mask(self) -> Image.Image | None:
        return self._grown[1]


def init_request(spec: ModelSpec, values: dict[str, Any]) -> InitImage | None:
    """Pop the img2img options from checked request values: the InitImage, or None without an init image."""
    image, mask = values.pop("init_image", None), values.pop("mask", None)
    strength, pads = values.pop("strength", None), values.pop("outpaint", None)
    if image is None:
        given = next((n for n, v in (("mask", mask), ("strength", strength), ("outpaint", pads)) if v is not None), "")
        if given:
            raise InvalidOptionError(f"{given} needs an init image (init_image, --init-image).")
        return None
    if mask is not None and pads is not None:
        raise InvalidOptionError("Give either a mask or outpaint, not both.")
    if strength is None:
        # the family's diffusers default; outpainting's new border starts from pure noise
        strength = 1.0 if pads is not None else spec.default_strength[mask is not None]
    return InitImage(image, mask, strength, pads)


def init_size(spec: ModelSpec, image: Image.Image) -> tuple[int, int]:
    """(width, height) to draw from an init image when no size is given: the spec's `init_size` (Klein caps the
    area), else the image's own size rounded down to the size step."""
    if spec.init_size is not None:
        return spec.init_size(image)
    m = spec.size_multiple
    return image.width // m * m, image.height // m * m


@dataclass(frozen=True)
class Start:
    """Where img2img denoising starts and what each step blends back (inpainting), in the family's latent layout."""

    image_latents: mx.array | None  # clean init image latents (a family may fill them in at denoise time)
    noise: mx.array  # the noise added to them (the blend re-noises with it)
    mask: mx.array | None  # 1 = repaint; None for plain img2img
    first: int  # index of the first scheduled step that runs

    def begin(self, sigmas: Any) -> mx.array:
        """The init latents at the first step's noise level."""
        return add_noise(self.image_latents, self.noise, float(sigmas[self.first]))

    def after_step(self, latents: mx.array, index: int, sigmas: Any) -> mx.array:
        """Blend after scheduled step `index`: the unmasked region follows the init image."""
        if self.mask is None:
            return latents
        last = index == len(sigmas) - 2
        return blend(latents, self.image_latents, self.noise, self.mask, None if last else float(sigmas[index + 1]))


def first_step(steps: int, strength: float) -> int:
    """Index of the first of `steps` scheduled steps that runs (diffusers' get_timesteps: t_start). In floating
    point only a vanishing strength leaves none."""
    start = int(max(steps - min(steps * strength, steps), 0))
    if steps - start < 1:
        needed = max(steps + 1, math.ceil(1 / strength))
        raise InvalidOptionError(f"strength {strength} leaves no step out of {steps}: use at least {needed} steps.")
    return start


def image_pixels(image: Image.Image, width: int, height: int) -> mx.array:
    """VaeImageProcessor.preprocess: LANCZOS resize, RGB, [-1, 1] -> NHWC float32 [1, H, W, 3]."""
    resized = image.resize((width, height), Image.Resampling.LANCZOS).convert("RGB")
    return mx.array(np.asarray(resized, dtype=np.float32) / 255.0 * 2.0 - 1.0)[None]


def mask_pixels(mask: Image.Image, width: int, height: int) -> np.ndarray:
    """The mask processor: LANCZOS resize (a mask of another size is stretched to the output), grayscale,
    binarized at 0.5 -> float32 [H, W], 1 = repaint."""
    gray = np.asarray(mask.resize((width, height), Image.Resampling.LANCZOS).convert("L"), dtype=np.float32) / 255.0
    return (gray >= 0.5).astype(np.float32)


def downsample_mask(mask: np.ndarray, height: int, width: int, mode: str) -> np.ndarray:
    """torch.nn.functional.interpolate of an [H, W] mask to [height, width], "nearest" or "bilinear"
    (align_corners=False), as the inpaint pipelines bring the mask to the latent grid."""

    def axis(size_in: int, size_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        scale = np.float32(size_in / size_out)
        out = np.arange(size_out, dtype=np.float32)
        if mode == "nearest":
            low = np.minimum(np.floor(out * scale).astype(np.int64), size_in - 1)
            return low, low, np.zeros(size_out, np.float32)
        source = np.maximum((out + np.float32(0.5)) * scale - np.float32(0.5), np.float32(0))
        low = np.minimum(np.floor(source).astype(np.int64), size_in - 1)
        return low, np.minimum(low + 1, size_in - 1), (source - low).astype(np.float32)

    r0, r1, rl = axis(mask.shape[0], height)
    c0, c1, cl = axis(mask.shape[1], width)
    top = mask[r0][:, c0] * (1 - cl) + mask[r0][:, c1] * cl
    bottom = mask[r1][:, c0] * (1 - cl) + mask[r1][:, c1] * cl
    return (top * (1 - rl[:, None]) + bottom * rl[:, None]).astype(np.float32)


def add_noise(latents: mx.array, noise: mx.array, sigma: float) -> mx.array:
    """FlowMatchEulerDiscreteScheduler.scale_noise: the clean latents moved to noise level sigma."""
    sigma = mx.array(sigma, dtype=mx.float32)
    return sigma * noise + (1.0 - sigma) * latents


def blend(latents: mx.array, image_latents: mx.array, noise: mx.array, mask: mx.array, sigma: float | None) -> mx.array:
    """After a step: keep the unmasked region on the init image's trajectory (noised to the next sigma;
    clean after the last step), the masked region from the denoiser."""
    known = image_latents if sigma is None else add_noise(image_latents, noise, sigma)
    return (1 - mask) * known + mask * latents


def outpaint(image: Image.Image, pads: tuple[int, int, int, int]) -> tuple[Image.Image, Image.Image]:
    """Grow the canvas by (left, top, right, bottom) pixels: the new border repeats the edge pixels (a neutral
    start for the VAE), and the mask is white exactly there."""
    left, top, right, bottom = pads
    pixels = np.asarray(image.convert("RGB"))
    grown = np.pad(pixels, ((top, bottom), (left, right), (0, 0)), mode="edge")
    mask = np.full(grown.shape[:2], 255, np.uint8)
    mask[top : top + pixels.shape[0], left : left + pixels.shape[1]] = 0
    return Image.fromarray(grown), Image.fromarray(mask)
