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
from ..image import generation_metadata, load_image, read_metadata, save_png
from ..lora import parse_cli_lora, read_adapter, replay_loras
from ..memory import preflight
from ..pipeline import check_size
from . import app, handle_errors
from .progress import RunProgress

# CLI flag -> the generate() option it needs the model to accept
FLAG_OPTIONS = {"--negative": "negative_prompt", "--image": "images", "--guidance": "guidance", "--tile": "tile"}


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
    lora: list[str] = typer.Option(None, "--lora", help="A LoRA / LyCORIS .safetensors file, PATH[:SCALE] (scale "
                                   "1.0 by default); repeatable, the adapters add up."),
    lora_partial: bool = typer.Option(False, "--lora-partial", help="Apply what maps of a LoRA file whose other "
                                      "keys this model does not know (default: refuse the file)."),
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
    loras = tuple(parse_cli_lora(text) for text in lora or ())
    if not loras and saved.get("loras"):  # replay the recorded adapters: found again and checked by hash
        loras, notes = replay_loras(saved["loras"], [from_image.parent])
        lora_partial = lora_partial or bool(saved.get("lora_partial"))
        for note in notes:
            typer.secho(f"Warning: {note}", fg=typer.colors.YELLOW, err=True)
    if loras and spec.lora_targets is None:
        raise InvalidOptionError(f"Model '{spec.id}' does not support --lora.")
    for adapter in loras:  # a missing or unreadable file fails before the model loads
        read_adapter(adapter.path)
    unknown = sorted(set(extra) - set(spec.extra_options))
    if unknown:
        raise InvalidOptionError(f"Model '{spec.id}' does not support --option {unknown[0]}.")

    given = {"--negative": negative is not None, "--image": bool(image), "--guidance": guidance is not None,
             "--tile": tile}
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
    check_size(spec, width, height)
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
        options: dict[str, Any] = {"width": width, "height": height, "steps": steps, "seed": seed,
                                   "num_images": count}
        optional = {"guidance": guidance, "negative_prompt": negative, "images": references or None,
                    "tile": tile or None, "loras": loras or None, "lora_partial": lora_partial or None}
        options.update({k: v for k, v in optional.items() if v is not None}, **extra)
        result = pipe.generate(prompt, on_step=progress.on_step, **options)

    for i, (img, path_out) in enumerate(zip(result.images, paths)):
        # image i of a batch is image 0 of a run with seed + i: --from reproduces it alone
        save_png(img, path_out, generation_metadata(pipe, result, i, images=[str(p) for p in image], options=extra))
    if as_json:
        typer.echo(json.dumps({"model": spec.id, "images": [str(p) for p in paths], "seeds": result.seeds,
                               "steps": result.request.steps, "width": width, "height": height,
                               "timings": result.timings}))
    else:
        for p, s in zip(paths, result.seeds):
            typer.echo(f"{p}  (seed {s})")


def _saved_weights(saved: dict[str, Any]) -> str | None:
    source = (saved.get("weights") or {}).get("source", "")
    if not source or source.startswith(("bundled:", "procedural")):
        return None
    return source
