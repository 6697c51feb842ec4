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

from .errors import InvalidImageError

if TYPE_CHECKING:
    from .pipeline import GenerationResult, Pipeline

METADATA_KEY = "imagegen"  # PNG text chunk holding our JSON metadata


def load_image(source: Any) -> Image.Image:
    """A PIL image (RGB) from a PIL image or a path; unreadable input raises InvalidImageError."""
    if isinstance(source, Image.Image):
        return source.convert("RGB")
    path = Path(source)
    try:
        with Image.open(path) as img:
            return img.convert("RGB")
    except FileNotFoundError:
        raise InvalidImageError(f"Image not found: {path}") from None
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise InvalidImageError(f"Cannot read {path} as an image ({type(e).__name__})") from None


def to_pil(images: mx.array) -> list[Image.Image]:
    """NHWC images in [-1, 1] (decoder output) -> PIL, rounded as diffusers' postprocess does."""
    x = mx.clip(images.astype(mx.float32) / 2 + 0.5, 0.0, 1.0)
    arr = np.array(x)
    return [Image.fromarray((a * 255).round().astype(np.uint8)) for a in arr]


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
    """The PNG file save_png would write, in memory (the server's b64_json and image URLs)."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=png_info(metadata))
    return buffer.getvalue()


def save_png(image: Image.Image, path: str | Path, metadata: dict[str, Any] | None = None) -> Path:
    """Write atomically (temp file + rename) so an interrupted run never leaves a partial file."""
    path = Path(path)
    info = png_info(metadata)
    fd, tmp = tempfile.mkstemp(prefix=".imagegen-", suffix=".png", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            image.save(f, format="PNG", pnginfo=info)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def generation_metadata(pipe: Pipeline, result: GenerationResult, index: int = 0, **fields: Any) -> dict[str, Any]:
    """The metadata of image `index` of a result, as `imagegen run` writes it (so `imagegen run --from`
    reproduces that image alone); `fields` add to it or override it (a source, batch details)."""
    from . import __version__, hub
    from .plugins import plugin_info
    from .request import metadata_entries

    spec, request = pipe.spec, result.request
    plugin = plugin_info(spec.plugin)
    metadata = {
        "prompt": request.prompts[index], "model": spec.id, "weights": hub.weights_identity(spec, pipe.weights),
        "quantize": pipe.quantize, "dtype": pipe.dtype, **metadata_entries(spec, request, index),
        "components": dict(pipe.components),
        "imagegen": __version__, "plugin": f"{plugin.distribution} {plugin.version}" if plugin else spec.plugin,
        "timings": {k: round(v, 4) for k, v in result.timings.items()},
    }
    return {**metadata, **fields}


def read_metadata(path: str | Path) -> dict[str, Any]:
    """The imagegen metadata of a PNG we wrote; InvalidImageError if none."""
    path = Path(path)
    try:
        with Image.open(path) as img:
            text = getattr(img, "text", {}).get(METADATA_KEY)
    except FileNotFoundError:
        raise InvalidImageError(f"Image not found: {path}") from None
    except (UnidentifiedImageError, OSError) as e:
        raise InvalidImageError(f"Cannot read {path} as an image ({type(e).__name__})") from None
    if not text:
        raise InvalidImageError(f"{path} carries no imagegen metadata.")
    return json.loads(text)
