"""Images in and out: read user images, latents-decoder output -> PIL, PNG metadata."""

from __future__ import annotations

import io
import json
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import mlx.core as mx
import numpy as np
from PIL import Image, PngImagePlugin, UnidentifiedImageError

from .errors import InvalidImageError, InvalidOptionError

if TYPE_CHECKING:
    from .pipeline import GenerationResult, Pipeline

METADATA_KEY = "imagegen"  # PNG text chunk holding our JSON metadata
EXIF_DESCRIPTION = 0x010E  # ImageDescription: where JPEG and WebP files keep it
JPEG_EXIF_LIMIT = 65_533  # a JPEG APP1 segment holds 65,535 bytes less its 2-byte length
FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}


def load_image(source: Any) -> Image.Image:
    """A PIL image (RGB) from a PIL image, a path or an array ((H, W) or (H, W, 1|3|4); uint8, or floats in
    [0, 1]); unreadable input raises InvalidImageError."""
    if isinstance(source, Image.Image):
        return source.convert("RGB")
    if isinstance(source, np.ndarray):
        return from_array(source).convert("RGB")
    if not isinstance(source, str | Path):
        raise InvalidImageError(f"Expected an image, a path or an array, got {type(source).__name__}.")
    path = Path(source)
    try:
        with Image.open(path) as img:
            return img.convert("RGB")
    except FileNotFoundError:
        raise InvalidImageError(f"Image not found: {path}") from None
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise InvalidImageError(f"Cannot read {path} as an image ({type(e).__name__})") from None


def from_array(array: np.ndarray) -> Image.Image:
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] not in (1, 3, 4)):
        raise InvalidImageError(f"An image array must be (H, W) or (H, W, 1|3|4), got {array.shape}.")
    if array.dtype != np.uint8:
        array = (np.clip(array.astype(np.float64), 0, 1) * 255).round().astype(np.uint8)
    return Image.fromarray(array[..., 0] if array.ndim == 3 and array.shape[2] == 1 else array)


def to_bytes(images: mx.array) -> mx.array:
    """NHWC images in [-1, 1] (decoder output) -> uint8 pixels, rounded as diffusers' postprocess does: its
    (x * 255).round() in float32 (half to even, as numpy), on the device, so bytes, not floats, reach the host and
    the host does no per-pixel work (~10 ms of a 1024 px image). Lazy: evaluate it with the decode, one graph."""
    x = mx.clip(images.astype(mx.float32) / 2 + 0.5, 0.0, 1.0)
    return mx.round(x * 255).astype(mx.uint8)


def to_pil(images: mx.array) -> list[Image.Image]:
    """NHWC images in [-1, 1] (decoder output) or their `to_bytes` -> PIL."""
    pixels = np.array(images if images.dtype == mx.uint8 else to_bytes(images))
    return [Image.fromarray(a) for a in pixels]


def from_pil(image: Image.Image) -> mx.array:
    """PIL RGB -> NHWC float32 in [-1, 1], batch of one."""
    arr = (np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0) * 2.0 - 1.0  # diffusers' exact arithmetic
    return mx.array(arr)[None]


def png_info(metadata: dict[str, Any] | None) -> PngImagePlugin.PngInfo:
    """PNG text chunks: our JSON metadata, and the prompt where most image viewers look."""
    info = PngImagePlugin.PngInfo()
    if metadata:
        info.add_text(METADATA_KEY, json.dumps(metadata, sort_keys=True))
        if "prompt" in metadata:
            info.add_text("parameters", str(metadata["prompt"]))
    return info


def png_bytes(image: Image.Image, metadata: dict[str, Any] | None = None) -> bytes:
    """A PNG file with the generation metadata, in memory (the server's b64_json and image URLs)."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=png_info(metadata))
    return buffer.getvalue()


def write_atomic(path: str | Path, data: bytes) -> Path:
    """Temp file + rename, so an interrupted run never leaves a partial file under the real name. The file gets
    the permissions open() would give it (mkstemp's are 0600 whatever the umask)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=".imagegen-", suffix=path.suffix, dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o666 & ~current_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def current_umask() -> int:
    mask = os.umask(0o022)  # reading the umask means setting it; put it straight back
    os.umask(mask)
    return mask


def image_format(path: str | Path) -> str:
    """The Pillow format a file name asks for: .png, .jpg/.jpeg or .webp; anything else is refused."""
    suffix = Path(path).suffix.lower()
    if suffix not in FORMATS:
        raise InvalidOptionError(f"Cannot write '{Path(path).name}': use a .png, .jpg, .jpeg or .webp file name.")
    return FORMATS[suffix]


def encode_image(image: Image.Image, metadata: dict[str, Any] | None = None, format: str = "PNG") -> bytes:
    """The file's bytes: PNG keeps the metadata in text chunks, JPEG and WebP in EXIF ImageDescription."""
    if format == "PNG":
        return png_bytes(image, metadata)
    buffer = io.BytesIO()
    exif = Image.Exif()
    if metadata:
        exif[EXIF_DESCRIPTION] = json.dumps(metadata, sort_keys=True)  # ASCII: json escapes the rest
    data = exif.tobytes()
    if format == "JPEG" and len(data) > JPEG_EXIF_LIMIT:
        raise InvalidOptionError(
            f"The settings ({len(data)} bytes, mostly the prompt) do not fit a JPEG's 64 KB "
            "EXIF segment: write a .png or .webp."
        )
    image.save(buffer, format=format, quality=95, exif=data)
    return buffer.getvalue()


def save_image(image: Image.Image, path: str | Path, metadata: dict[str, Any] | None = None) -> Path:
    """Write a PNG, JPEG or WebP (by the file name's extension) atomically, with the generation metadata."""
    return write_atomic(path, encode_image(image, metadata, image_format(path)))


def generation_metadata(pipe: Pipeline, result: GenerationResult, index: int = 0, **fields: Any) -> dict[str, Any]:
    """The metadata of image `index` of a result, as `imagegen run` writes it (so `imagegen run --from`
    reproduces that image alone); `fields` add to it or override it (a source, batch details)."""
    from . import __version__, hub
    from .plugins import plugin_info
    from .request import metadata_entries

    spec, request = pipe.spec, result.request
    plugin = plugin_info(spec.plugin)
    metadata = {
        "prompt": request.prompts[index],
        "model": spec.id,
        "weights": hub.weights_identity(spec, pipe.weights),
        "quantize": pipe.quantize,
        "dtype": pipe.dtype,
        **metadata_entries(spec, request, index),
        "components": dict(pipe.components),
        "imagegen": __version__,
        "plugin": f"{plugin.distribution} {plugin.version}" if plugin else spec.plugin,
        "timings": {k: round(v, 4) for k, v in result.timings.items()},
    }
    return {**metadata, **fields}


def read_metadata(path: str | Path) -> dict[str, Any]:
    """The imagegen metadata of an image we wrote (PNG text chunk, or EXIF in JPEG/WebP); InvalidImageError if
    there is none or it is not a JSON object."""
    path = Path(path)
    try:
        with Image.open(path) as img:
            text = getattr(img, "text", {}).get(METADATA_KEY) or img.getexif().get(EXIF_DESCRIPTION)
    except FileNotFoundError:
        raise InvalidImageError(f"Image not found: {path}") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise InvalidImageError(f"Cannot read {path} as an image ({type(e).__name__})") from None
    if not text:
        raise InvalidImageError(f"{path} carries no imagegen metadata.")
    try:
        metadata = json.loads(text)
    except (json.JSONDecodeError, TypeError):
        raise InvalidImageError(f"{path}: its imagegen metadata is not valid JSON.") from None
    if not isinstance(metadata, dict):
        raise InvalidImageError(f"{path}: its imagegen metadata is not a JSON object.")
    return metadata
