"""Images uploaded to /v1/images/edits: sized from the header before a pixel is decoded, scaled down to the
model's working size on arrival, and recorded by content hash and file name (never as a server path)."""

from __future__ import annotations

import math
import re
from io import BytesIO
from pathlib import PurePosixPath

from PIL import Image

from ..errors import InvalidImageError
from ..options import image_input
from ..registry import ModelSpec

# An upload may hold this many times the model's largest output (twice its side): a phone photo for a
# 2048x2048 model. It is scaled down on arrival, so no request holds more than one such image decoded.
UPLOAD_AREA_FACTOR = 4
_UNSAFE_NAME = re.compile(r"[\x00-\x1f\x7f\u202a-\u202e\u2066-\u2069]")  # control and bidi-override characters


def pixel_budget(spec: ModelSpec) -> int:
    return UPLOAD_AREA_FACTOR * spec.max_pixels


def safe_name(filename: str | None, index: int) -> str:
    """The last part of a client's file name, without control characters; a stand-in when none is left."""
    name = _UNSAFE_NAME.sub("", PurePosixPath((filename or "").replace("\\", "/")).name)[:128]
    return name if name.strip(" .") else f"image-{index}.png"


def open_upload(data: bytes, name: str, spec: ModelSpec) -> Image.Image:
    """The image lazily opened, its size checked: Pillow has read the header and decoded nothing yet."""
    try:
        image = Image.open(BytesIO(data))
    except Image.DecompressionBombError:  # Pillow's own, far larger limit
        raise InvalidImageError(f"Upload '{name}' is {_too_large(spec)}") from None
    except Exception as e:  # PIL raises many kinds for bad uploads
        raise InvalidImageError(f"Upload '{name}' is not a readable image ({type(e).__name__}).") from None
    width, height = image.size
    if width * height > pixel_budget(spec):
        image.close()
        raise InvalidImageError(f"Upload '{name}' is {width}x{height}: {_too_large(spec)}")
    return image


def _too_large(spec: ModelSpec) -> str:
    side = math.isqrt(pixel_budget(spec))
    return (
        f"larger than '{spec.id}' takes ({pixel_budget(spec)} pixels at most, e.g. {side}x{side}). Scale it down first."
    )


def working_size(width: int, height: int, max_pixels: int) -> tuple[int, int]:
    """(width, height) scaled down, aspect kept, to at most max_pixels; unchanged when already within."""
    if width * height <= max_pixels:
        return width, height
    scale = math.sqrt(max_pixels / (width * height))
    return max(1, int(width * scale)), max(1, int(height * scale))


def decode(data: bytes, filename: str | None, index: int, spec: ModelSpec) -> Image.Image:
    """Check, decode and scale one upload (CPU work: run it off the event loop); the image remembers the
    upload's file name and the sha256 of its bytes for the metadata (imagegen.options.image_input)."""
    name = safe_name(filename, index)
    with open_upload(data, name, spec) as img:
        target = working_size(*img.size, spec.max_pixels)
        try:
            img.draft("RGB", target)  # JPEG decodes straight at a reduced scale (>= target); others ignore it
            img.load()
            rgb = img.convert("RGB")
        except Exception as e:  # truncated or corrupt data
            raise InvalidImageError(f"Upload '{name}' is not a readable image ({type(e).__name__}).") from None
    target = working_size(*rgb.size, spec.max_pixels)  # the draft may have done part of the way
    if rgb.size != target:
        rgb = rgb.resize(target, Image.Resampling.LANCZOS)  # as FLUX.2 scales its references
    return image_input(rgb, name=name, data=data)


def check_all(blobs: list[tuple[bytes, str | None]], spec: ModelSpec) -> None:
    """Every upload's header, before any is decoded: a request with one oversized image costs nothing."""
    for index, (data, filename) in enumerate(blobs):
        name = safe_name(filename, index)
        open_upload(data, name, spec).close()
