"""`imagegen run`: generate images from the terminal, with PNG metadata and `--from` to reproduce."""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

import typer

from .. import hub, registry
from ..errors import InvalidOptionError
from ..image import file_record, find_recorded, generation_metadata, load_image, read_metadata, save_png
from ..img2img import check_strength, open_image, parse_outpaint
from ..memory import preflight
from ..noise import check_noise
from ..pipeline import check_size
from . import app, handle_errors
from .progress import RunProgress

# CLI flag -> the generate() option it needs the model to accept
FLAG_OPTIONS = {"--negative": "negative_prompt", "--image": "images", "--guidance": "guidance", "--tile": "tile",
                "--init-image": "init_image"}


def parse_size(size: str) -> tuple[int, int]:
    try:
        w, h = size.lower().split("x")
        return int(w), int(h)
    except ValueError:
        raise InvalidOptionError(f"--size must look like 1024x768, got '{size}'.") from None


def output_paths(output: Path | None, model: str, seed: int, count: int) -> list[Path]:
    """Where images go. Without -o: new names in the current folder that never overwrite."""
    if output is not None and output.suffix.lower() != ".png" and (output.is_dir() or not output.suffix):
        folder, stem, explicit = output, f"{model}-{seed}", False
    elif output is not None:
        folder, stem, explicit = output.parent, output.stem, True
    else:
        folder, stem, explicit = Path.cwd(), f"{model}-{seed}", False
    if explicit and count == 1:
        return [output]
    paths, n = [], 0
    for i in range(count):
        base = stem if count == 1 else f"{stem}-{i + 1}"
        path = folder / f"{base}.png"
        while not explicit and (path.exists() or path in paths):
            n += 1
            path = folder / f"{base}-{n}.png"
        paths.append(path)
    return paths


def parse_options(pairs: list[str]) -> dict[str, Any]:
    """NAME=VALUE pairs; values are JSON where they parse (numbers, true/false), else strings."""
    options = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not name.strip():
            raise InvalidOptionError(f"--option must look like NAME=VALUE, got '{pair}'.")
        try:
            options[name.strip()] = json.loads(value)
        except json.JSONDecodeError:
            options[name.strip()] = value
    return options


def check_writable(folder: Path) -> None:
    if not folder.exists():
        try:
            folder.mkdir(parents=True)
        except OSError as e:
            raise InvalidOptionError(f"Cannot create output folder {folder}: {e.strerror}") from None
    try:
        with tempfile.NamedTemporaryFile(dir=folder):
            pass
    except OSError:
        raise InvalidOptionError(f"Output folder {folder} is not writable.") from None


def read_prompt(prompt: str | None) -> str | None:
    if prompt == "-":
        text = sys.stdin.read().strip()
        if not text:
            raise InvalidOptionError("No prompt on standard input.")
        return text
    return prompt


@app.command()
@handle_errors
def run(
    prompt: str = typer.Argument(None, help="What to draw; '-' reads it from standard input."),
    model: str = typer.Option(None, "--model", "-m", help="Model id, alias or family (default: $IMAGEGEN_MODEL "
                              "or flux2-demo)."),
    output: Path = typer.Option(None, "--output", "-o", help="PNG file or folder (default: a new file here)."),
    size: str = typer.Option(None, "--size", help="WIDTHxHEIGHT, multiples of 16."),
    width: int = typer.Option(None, "--width", "-W", help="Width in pixels."),
    height: int = typer.Option(None, "--height", "-H", help="Height in pixels."),
    steps: int = typer.Option(None, "--steps", "-s", help="Denoising steps (default: the model's)."),
    guidance: float = typer.Option(None, "--guidance", "-g", help="Guidance scale (models with CFG)."),
    seed: int = typer.Option(None, "--seed", help="Random seed (default: random; always printed and saved)."),
    count: int = typer.Option(1, "--count", "-n", help="Number of images."),
    negative: str = typer.Option(None, "--negative", help="Negative prompt (models that accept one)."),
    image: list[Path] = typer.Option(None, "--image", "-i", help="Reference image for editing models; repeatable."),
    weights: str = typer.Option(None, "--weights", help="Weights folder or Hugging Face repo id (cached)."),
    quantize: str = typer.Option(None, "--quantize", "-q", help="Quantize weights: 4, 8, mxfp8, mxfp4, nvfp4, ..."),
    dtype: str = typer.Option(None, "--dtype", help="bfloat16 (default), float16 or float32."),
    tile: bool = typer.Option(False, "--tile", help="Decode the image in tiles (less memory)."),
    option: list[str] = typer.Option(None, "--option", "-O", help="A model-specific option NAME=VALUE, e.g. "
                                     "cfg_truncation=0.9 (zimage); repeatable."),
    init_image: Path = typer.Option(None, "--init-image", help="Start from this picture (img2img; with --mask: "
                                    "inpainting)."),
    strength: float = typer.Option(None, "--strength", help="How much of --init-image to redo, in (0, 1] "
                                   "(default: the model's)."),
    mask: Path = typer.Option(None, "--mask", help="Inpainting mask for --init-image: white = repaint, black = keep."),
    outpaint: str = typer.Option(None, "--outpaint", help="LEFT,TOP,RIGHT,BOTTOM pixels to add around --init-image "
                                 "and paint."),
    noise: str = typer.Option(None, "--noise", help="mlx (default) or torch: the noise diffusers draws for the seed."),
    from_image: Path = typer.Option(None, "--from", help="Reuse the settings saved in an imagegen PNG."),
    force: bool = typer.Option(False, "--force", help="Run even if the memory estimate says it will not fit."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
    quiet: bool = typer.Option(False, "--quiet", help="No progress output."),
) -> None:
    """Generate images from a text prompt."""
    saved: dict[str, Any] = read_metadata(from_image) if from_image is not None else {}
    prompt = read_prompt(prompt) or saved.get("prompt")
    if not prompt:
        raise InvalidOptionError("Give a prompt (or '-' to read it from standard input).")
    spec = registry.get(model or saved.get("model") or registry.default_model() or "")
    if size is not None:
        width, height = parse_size(size)
    folders = [Path.cwd()] + ([from_image.resolve().parent] if from_image is not None else [])
    if init_image is None and saved.get("init_image"):
        init_image = find_recorded(saved["init_image"], folders, "init image")
        mask = mask or (find_recorded(saved["mask"], folders, "mask") if saved.get("mask") else None)
    outpaint = outpaint if outpaint is not None else saved.get("outpaint")
    strength = strength if strength is not None else saved.get("strength")
    noise = check_noise(noise or saved.get("noise") or "mlx")
    noise_slot = saved.get("noise_slot") if noise == "torch" and count == 1 else None
    init = check_init(init_image, mask, strength, outpaint)
    if init is not None and width is None and height is None and "width" not in saved:
        width, height = init  # the estimate below; the pipeline derives the exact size from the image
        natural_size = True
    else:
        natural_size = False
    width = width if width is not None else saved.get("width", spec.default_size[0])
    height = height if height is not None else saved.get("height", spec.default_size[1])
    steps = steps if steps is not None else saved.get("steps")
    guidance = guidance if guidance is not None else (saved.get("guidance") if "guidance" in spec.options else None)
    negative = negative if negative is not None else saved.get("negative_prompt")
    seed = seed if seed is not None else saved.get("seed")
    quantize = quantize or saved.get("quantize")
    dtype = dtype or saved.get("dtype")
    weights = weights or _saved_weights(saved)
    image = image or [Path(p) for p in saved.get("images", [])]
    extra = {**saved.get("options", {}), **parse_options(option or [])}
    unknown = sorted(set(extra) - set(spec.extra_options))
    if unknown:
        raise InvalidOptionError(f"Model '{spec.id}' does not support --option {unknown[0]}.")

    given = {"--negative": negative is not None, "--image": bool(image), "--guidance": guidance is not None,
             "--tile": tile, "--init-image": init_image is not None}
    for flag, used in given.items():
        if used and not spec.accepts(FLAG_OPTIONS[flag]):
            raise InvalidOptionError(f"Model '{spec.id}' does not support {flag}.")
    quantize = spec.check_quantize(quantize)
    if count < 1:
        raise InvalidOptionError(f"--count must be >= 1, got {count}.")
    if steps is not None and steps < 1:
        raise InvalidOptionError(f"--steps must be >= 1, got {steps}.")
    if seed is not None and seed < 0:
        raise InvalidOptionError(f"--seed must be >= 0, got {seed}.")
    check_size(spec, width // spec.size_multiple * spec.size_multiple if natural_size else width,
               height // spec.size_multiple * spec.size_multiple if natural_size else height)
    references = [load_image(p) for p in image]
    seed = seed if seed is not None else int.from_bytes(os.urandom(4), "little") % 2**31
    paths = output_paths(output, spec.id, seed, count)
    check_writable(paths[0].parent)

    path = hub.resolve_weights(spec, weights)
    if spec.estimate_memory is not None:
        needed = spec.estimate_memory(spec, path, dtype or spec.default_dtype, quantize, width, height, count)
        preflight(needed, spec.id, force)

    with RunProgress(quiet or as_json) as progress:
        pipe = spec.pipeline(weights=path, dtype=dtype, quantize=quantize, on_load=progress.on_load)
        options: dict[str, Any] = {"width": None if natural_size else width, "height": None if natural_size else height,
                                   "steps": steps, "seed": seed, "num_images": count}
        optional = {"guidance": guidance, "negative_prompt": negative, "images": references or None,
                    "tile": tile or None, "init_image": init_image, "mask": mask, "strength": strength,
                    "outpaint": outpaint, "noise": noise, "noise_slot": noise_slot}
        options.update({k: v for k, v in optional.items() if v is not None}, **extra)
        result = pipe.generate(prompt, on_step=progress.on_step, **options)

    inputs = {name: file_record(path.read_bytes(), path.name) for name, path in
              (("init_image", init_image), ("mask", mask)) if path is not None}
    if outpaint is not None:
        inputs["outpaint"] = list(parse_outpaint(outpaint))
    for i, (img, path_out) in enumerate(zip(result.images, paths)):
        # image i of a batch is image 0 of a run with seed + i (torch noise: noise_slot): --from reproduces it alone
        save_png(img, path_out, generation_metadata(pipe, result, i, images=[str(p) for p in image], options=extra,
                                                    **inputs))
    if as_json:
        typer.echo(json.dumps({"model": spec.id, "images": [str(p) for p in paths], "seeds": result.seeds,
                               "steps": result.request.steps, "width": result.request.width,
                               "height": result.request.height, "timings": result.timings}))
    else:
        for p, s in zip(paths, result.seeds):
            typer.echo(f"{p}  (seed {s})")


def check_init(init_image: Path | None, mask: Path | None, strength: float | None,
               outpaint: Any) -> tuple[int, int] | None:
    """The init-image flags checked before any weights load; the (width, height) they lead to."""
    if init_image is None:
        for flag, value in (("--mask", mask), ("--strength", strength), ("--outpaint", outpaint)):
            if value is not None:
                raise InvalidOptionError(f"{flag} needs --init-image.")
        return None
    if mask is not None and outpaint is not None:
        raise InvalidOptionError("Give either --mask or --outpaint, not both.")
    if strength is not None:
        check_strength(strength)
    width, height = open_image(init_image, "init image").size
    if mask is not None:
        open_image(mask, "mask")
    if outpaint is not None:
        left, top, right, bottom = parse_outpaint(outpaint)
        width, height = width + left + right, height + top + bottom
    return width, height


def _saved_weights(saved: dict[str, Any]) -> str | None:
    source = (saved.get("weights") or {}).get("source", "")
    if not source or source.startswith(("bundled:", "procedural")):
        return None
    return source
