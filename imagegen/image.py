"""Images in and out: read user images, latents-decoder output -> PIL, PNG metadata."""

from __future__ import annotations

import hashlib
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
    reproduces that image alone); `fields` add to it or override it (reference image paths, a source)."""
    from . import __version__, hub
    from .plugins import plugin_info

    spec, request = pipe.spec, result.request
    plugin = plugin_info(spec.plugin)
    negatives = request.negative_prompts
    noise: dict[str, Any] = {"noise": request.noise}
    if request.noise == "torch" and (request.noise_slot or request.batch_size > 1):
        # one generator drew the whole call: replaying image i alone draws that call's noise, keeps row i
        noise["noise_slot"] = list(request.noise_slot or (index, request.batch_size))
    if request.init is not None:
        noise["strength"] = request.init.strength
    metadata = {
        "prompt": request.prompts[index], "negative_prompt": negatives[index] if negatives else None,
        "model": spec.id, "weights": hub.weights_identity(spec, pipe.weights), "seed": result.seeds[index],
        "steps": request.steps, "guidance": request.guidance, "width": request.width, "height": request.height,
        "quantize": pipe.quantize, "dtype": pipe.dtype, "images": [], "options": dict(request.extra),
        "imagegen": __version__, "plugin": f"{plugin.distribution} {plugin.version}" if plugin else spec.plugin,
        "timings": {k: round(v, 4) for k, v in result.timings.items()}, **noise,
    }
    return {**metadata, **fields}


def file_record(data: bytes, name: str) -> dict[str, str]:
    """How metadata names an input file: its name and content hash, never a path (paths leak and move)."""
    return {"file": Path(name).name, "sha256": hashlib.sha256(data).hexdigest()}


def find_recorded(record: dict[str, str], folders: list[Path], what: str) -> Path:
    """The file a `file_record` names, looked up by name in `folders` and checked by hash."""
    for folder in folders:
        path = folder / record["file"]
        if path.is_file() and hashlib.sha256(path.read_bytes()).hexdigest() == record["sha256"]:
            return path
    places = " or ".join(str(f) for f in folders)
    raise InvalidImageError(f"The {what} '{record['file']}' (sha256 {record['sha256'][:12]}...) is not in {places}; "
                            f"give it again.")


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
