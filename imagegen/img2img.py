"""Image to image, shared by the families: strength -> steps, init image and mask preparation, noising and
blending, outpainting. Follows diffusers 0.42.1 (ZImageImg2ImgPipeline, ZImageInpaintPipeline,
Flux2KleinInpaintPipeline and VaeImageProcessor)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np
from PIL import Image, UnidentifiedImageError

from .errors import InvalidImageError, InvalidOptionError


@dataclass(frozen=True)
class InitImage:
    """The picture to start from, and the mask of what to repaint (None: all of it, plain img2img)."""

    image: Image.Image  # RGB
    mask: Image.Image | None  # as given (any mode); white = repaint, black = keep
    strength: float


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


def check_strength(value: Any) -> float:
    try:
        strength = float(value)
    except (TypeError, ValueError):
        raise InvalidOptionError(f"strength must be a number in (0, 1], got {value!r}.") from None
    if not 0 < strength <= 1:
        raise InvalidOptionError(f"strength must be in (0, 1], got {strength}.")
    return strength


def first_step(steps: int, strength: float) -> int:
    """Index of the first of `steps` scheduled steps that runs (diffusers' get_timesteps: t_start). In floating
    point only a vanishing strength leaves none."""
    start = int(max(steps - min(steps * strength, steps), 0))
    if steps - start < 1:
        needed = max(steps + 1, math.ceil(1 / strength))
        raise InvalidOptionError(f"strength {strength} leaves no step out of {steps}: use at least {needed} steps.")
    return start


def open_image(source: Any, what: str) -> Image.Image:
    """A PIL image, a path or an array (H, W[, C]: uint8, or floats in [0, 1]) -> PIL, mode as given."""
    if isinstance(source, Image.Image):
        return source
    if isinstance(source, np.ndarray) or hasattr(source, "__array__") and not isinstance(source, (str, Path)):
        array = np.asarray(source)
        if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] not in (1, 3, 4)):
            raise InvalidImageError(f"{what} array must be (H, W), (H, W, 1|3|4), got {array.shape}.")
        if array.dtype != np.uint8:
            array = (np.clip(array.astype(np.float64), 0, 1) * 255).round().astype(np.uint8)
        return Image.fromarray(array[..., 0] if array.ndim == 3 and array.shape[2] == 1 else array)
    path = Path(source)
    try:
        with Image.open(path) as img:
            img.load()
            return img
    except FileNotFoundError:
        raise InvalidImageError(f"{what} not found: {path}") from None
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise InvalidImageError(f"Cannot read {what} {path} as an image ({type(e).__name__}).") from None


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


def parse_outpaint(value: Any) -> tuple[int, int, int, int]:
    """"LEFT,TOP,RIGHT,BOTTOM" pixels (or a sequence of four) -> four non-negative ints, not all zero."""
    parts = value.split(",") if isinstance(value, str) else list(value)
    try:
        pads = tuple(int(p) for p in parts)
    except (TypeError, ValueError):
        pads = ()
    if len(pads) != 4 or min(pads) < 0 or not any(pads):
        raise InvalidOptionError(f"outpaint must be LEFT,TOP,RIGHT,BOTTOM pixels (>= 0, not all 0), got {value!r}.")
    return pads  # type: ignore[return-value]


def outpaint(image: Image.Image, pads: tuple[int, int, int, int]) -> tuple[Image.Image, Image.Image]:
    """Grow the canvas by (left, top, right, bottom) pixels: the new border repeats the edge pixels (a neutral
    start for the VAE), and the mask is white exactly there."""
    left, top, right, bottom = pads
    pixels = np.asarray(image.convert("RGB"))
    grown = np.pad(pixels, ((top, bottom), (left, right), (0, 0)), mode="edge")
    mask = np.full(grown.shape[:2], 255, np.uint8)
    mask[top : top + pixels.shape[0], left : left + pixels.shape[1]] = 0
    return Image.fromarray(grown), Image.fromarray(mask)
