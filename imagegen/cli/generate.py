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
from ..errors import InvalidImageError, InvalidOptionError
from ..image import (
    encode_image,
    generation_metadata,
    image_digest,
    image_format,
    load_image,
    read_metadata,
    save_image,
)
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
    """Where images go. Without -o: new names in the current folder that never overwrite. A file name's
    extension picks the format (.png, .jpg/.jpeg, .webp); any other extension is refused before generating."""
    suffix = ".png"
    if output is not None and (output.is_dir() or not output.suffix):
        folder, stem, explicit = output, f"{model}-{seed}", False
    elif output is not None:
        image_format(output)
        folder, stem, explicit, suffix = output.parent, output.stem, True, output.suffix
    else:
        folder, stem, explicit = Path.cwd(), f"{model}-{seed}", False
    if explicit and count == 1:
        return [output]
    paths, n = [], 0
    for i in range(count):
        base = stem if count == 1 else f"{stem}-{i + 1}"
        path = folder / f"{base}{suffix}"
        while not explicit and (path.exists() or path in paths):
            n += 1
            path = folder / f"{base}-{n}{suffix}"
        paths.append(path)
    return paths


# What a PNG's metadata may hold for --from, and the JSON types each field must have (a PNG is untrusted input).
SAVED_FIELDS: dict[str, tuple[type, ...]] = {
    "prompt": (str,), "negative_prompt": (str,), "model": (str,), "seed": (int,), "steps": (int,),
    "guidance": (int, float), "width": (int,), "height": (int,), "quantize": (str,), "dtype": (str,),
    "options": (dict,), "images": (list,), "weights": (dict,),
}


def read_saved(path: Path) -> dict[str, Any]:
    """The settings of `--from PNG`, each field checked for its type: one clear line for damaged metadata."""
    saved = read_metadata(path)
    for name, kinds in SAVED_FIELDS.items():
        value = saved.get(name)
        if value is not None and (not isinstance(value, kinds) or isinstance(value, bool)):
            raise InvalidImageError(f"{path}: its metadata field '{name}' is not usable: {json.dumps(value)[:80]}.")
    return saved


def replay_references(path: Path, saved: dict[str, Any], given: list[Path]) -> None:
    """A PNG never makes imagegen open files: reference images it names must be passed with --image (and are
    checked against the recorded content hashes)."""
    recorded = [r if isinstance(r, dict) else {"name": str(r)} for r in saved.get("images") or []]
    if not recorded:
        return
    names = ", ".join(str(r.get("name") or "unnamed") for r in recorded)
    if not given:
        raise InvalidOptionError(f"{path} was made with {len(recorded)} reference image(s) ({names}); pass them "
                                 "with --image to reproduce it (paths inside a PNG are never opened).")
    digests = [r.get("sha256") for r in recorded]
    if len(given) != len(recorded) or any(d and d != image_digest(load_image(p)) for d, p in zip(digests, given)):
        typer.secho(f"Note: {path} was made with reference image(s) {names}; the --image files differ, so the "
                    "result will too.", err=True)


def replay_weights(path: Path, saved: dict[str, Any], spec: Any, weights: str | None) -> None:
    """Use the local model, never a folder or repo a PNG names; say so when the PNG was made with other weights."""
    source = (saved.get("weights") or {}).get("source")
    if weights is not None or not isinstance(source, str) or source.startswith(("bundled:", "procedural")):
        return
    local = hub.weights_present(spec)
    here = hub.weights_identity(spec, local) if local is not None else {}
    if source != here.get("source") or saved["weights"].get("config_sha256") != here.get("config_sha256"):
        shown = "".join(c if c.isprintable() else "?" for c in source)[:200]
        typer.secho(f"Note: {path} was made with the weights '{shown}'; using the local '{spec.id}' weights "
                    "(pass --weights to choose).", err=True)


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
    output: Path = typer.Option(None, "--output", "-o", help="Image file (.png, .jpg, .webp), folder, or - for "
                                "standard output (default: a new PNG here)."),
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
    dtype: str = typer.Option(None, "--dtype", help="bfloat16, float16 or float32 (default: the model's; "
                              "float32 for flux2-demo)."),
    tile: bool = typer.Option(False, "--tile", help="Decode the image in tiles (less memory)."),
    option: list[str] = typer.Option(None, "--option", "-O", help="A model-specific option NAME=VALUE, e.g. "
                                     "cfg_truncation=0.9 (zimage); repeatable."),
    from_image: Path = typer.Option(None, "--from", help="Reuse the settings saved in an imagegen PNG."),
    force: bool = typer.Option(False, "--force", help="Run even if the memory estimate says it will not fit."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
    quiet: bool = typer.Option(False, "--quiet", help="No progress output."),
) -> None:
    """Generate images from a text prompt."""
    saved: dict[str, Any] = read_saved(from_image) if from_image is not None else {}
    prompt = read_prompt(prompt) or saved.get("prompt")
    if not prompt:
        raise InvalidOptionError("Give a prompt (or '-' to read it from standard input).")
    spec = registry.get(model or saved.get("model") or registry.default_model() or "")
    if size is not None and (width is not None or height is not None):
        raise InvalidOptionError("Give --size or --width/--height, not both.")
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
    image = image or []
    if from_image is not None:
        replay_weights(from_image, saved, spec, weights)
        replay_references(from_image, saved, image)
    extra = {**saved.get("options", {}), **parse_options(option or [])}
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
    to_stdout = output is not None and str(output) == "-"
    if to_stdout and count != 1:
        raise InvalidOptionError("-o - writes one PNG to standard output: use it with --count 1.")
    if to_stdout and sys.stdout.isatty():
        raise InvalidOptionError("-o - would write a PNG to the terminal: pipe it to a file or a program.")
    paths = [Path("-")] if to_stdout else output_paths(output, spec.id, seed, count)
    if not to_stdout:
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
                    "tile": tile or None}
        options.update({k: v for k, v in optional.items() if v is not None}, **extra)
        result = pipe.generate(prompt, on_step=progress.on_step, **options)

    for i, (img, path_out) in enumerate(zip(result.images, paths)):
        # image i of a batch is image 0 of a run with seed + i: --from reproduces it alone
        metadata = generation_metadata(pipe, result, i, image_names=[p.name for p in image], options=extra)
        if to_stdout:
            sys.stdout.buffer.write(encode_image(img, metadata))
            sys.stdout.buffer.flush()
        else:
            save_image(img, path_out, metadata)
    if as_json:
        typer.echo(json.dumps({"model": spec.id, "images": [str(p) for p in paths], "seeds": result.seeds,
                               "steps": result.request.steps, "width": width, "height": height,
                               "timings": result.timings}), err=to_stdout)
    else:
        for p, s in zip(paths, result.seeds):
            typer.echo(f"{'(standard output)' if to_stdout else p}  (seed {s})", err=to_stdout)
