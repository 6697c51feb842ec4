"""`imagegen run`: generate images from the terminal, with PNG metadata and `--from` to reproduce."""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

import typer

from .. import distributed, hub, registry
from ..errors import InvalidOptionError
from ..image import generation_metadata, read_metadata, save_png
from ..memory import preflight
from ..options import family_options, parse_size
from ..request import given, replayed
from . import app, handle_errors
from .options import cli_options, flag_errors, with_flags
from .progress import RunProgress


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
@with_flags(cli_options())
def run(
    prompt: str = typer.Argument(None, help="What to draw; '-' reads it from standard input."),
    model: str = typer.Option(None, "--model", "-m", help="Model id, alias or family (default: $IMAGEGEN_MODEL "
                              "or the bundled demo model)."),
    output: Path = typer.Option(None, "--output", "-o", help="PNG file or folder (default: a new file here)."),
    size: str = typer.Option(None, "--size", help="WIDTHxHEIGHT, multiples of 16 (default: the model's, or the "
                             "first --image's for editing models)."),
    weights: str = typer.Option(None, "--weights", help="Weights folder or Hugging Face repo id (cached)."),
    quantize: str = typer.Option(None, "--quantize", "-q", help="Quantize weights: 4, 8, mxfp8, mxfp4, nvfp4, ..."),
    dtype: str = typer.Option(None, "--dtype", help="bfloat16 (default), float16 or float32."),
    option: list[str] = typer.Option(None, "--option", "-O", help="A model-specific option NAME=VALUE, e.g. "
                                     "cfg_truncation=0.9 (zimage); repeatable."),
    cache: str = typer.Option(None, "--cache", help="Step caching (with the imagegen-cache plugin): "
                              "first-block[:THRESHOLD], mag[:THRESHOLD],ratios=FILE, or off."),
    vae: str = typer.Option(None, "--vae", help="Another VAE: a diffusers folder or cached repo id, e.g. "
                            "black-forest-labs/FLUX.2-small-decoder for FLUX.2 models."),
    from_image: Path = typer.Option(None, "--from", help="Reuse the settings saved in an imagegen PNG."),
    force: bool = typer.Option(False, "--force", help="Run even if the memory estimate says it will not fit."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
    quiet: bool = typer.Option(False, "--quiet", help="No progress output."),
    gpus: int = typer.Option(1, "--gpus", help="Spread one image over N GPUs (one process each; FLUX.2 models)."),
    flags: dict[str, Any] | None = None,
) -> None:
    """Generate images from a text prompt."""
    saved: dict[str, Any] = read_metadata(from_image) if from_image is not None else {}
    prompt = read_prompt(prompt) or saved.get("prompt")
    if not prompt:
        raise InvalidOptionError("Give a prompt (or '-' to read it from standard input).")
    spec = registry.get(model or saved.get("model") or registry.default_model() or "")
    given_flags = {k: v for k, v in (flags or {}).items() if given(v)}
    if size is not None:
        given_flags["width"], given_flags["height"] = parse_size(size, "--size")
    family = parse_options(option or [])
    if cache is not None:  # the imagegen-cache plugin's option, as a flag of its own
        if "cache" not in {o.name for o in family_options(spec.extra_options)}:
            raise InvalidOptionError(f"Model '{spec.id}' does not support --cache (is imagegen-cache installed?).")
        family["cache"] = cache
    unknown = sorted(set(family) - {o.name for o in family_options(spec.extra_options)})
    if unknown:
        raise InvalidOptionError(f"Model '{spec.id}' does not support --option {unknown[0]}.")
    with flag_errors():
        values = replayed(spec, saved, [from_image.parent, Path.cwd()]) if saved else {}
        request = spec.request(prompt, **{**values, **family, **given_flags})  # every check, before any load
    quantize = spec.check_quantize(quantize or saved.get("quantize"))
    dtype = dtype or saved.get("dtype")
    weights = weights or _saved_weights(saved)
    vae = vae or (saved.get("components") or {}).get("vae")
    if vae is not None and "vae" not in spec.components:
        raise InvalidOptionError(f"Model '{spec.id}' does not support --vae.")
    paths = output_paths(output, spec.id, request.seeds[0], request.batch_size)
    check_writable(paths[0].parent)
    if gpus != 1 and distributed.WORLD_ENV not in os.environ:
        if gpus < 1:
            raise InvalidOptionError(f"--gpus must be >= 1, got {gpus}.")
        if not spec.extra.get("sequence_parallel"):
            raise InvalidOptionError(f"Model '{spec.id}' cannot spread one image over several GPUs (--gpus).")
        # every rank runs this command with the seed fixed here, so all draw the same noise
        argv = [sys.executable, "-m", "imagegen", *sys.argv[1:], "--seed", str(request.seeds[0])]
        raise typer.Exit(distributed.launch(argv, gpus))

    path = hub.resolve_weights(spec, weights)
    if spec.estimate_memory is not None:
        needed = spec.estimate_memory(spec, path, dtype or spec.default_dtype, quantize, request.width,
                                      request.height, request.batch_size)
        preflight(needed, spec.id, force)

    with RunProgress(quiet or as_json) as progress:
        components = {"vae": vae} if vae is not None else {}
        pipe = spec.pipeline(weights=path, dtype=dtype, quantize=quantize, on_load=progress.on_load, **components)
        result = pipe.generate(request, on_step=progress.on_step)

    for i, (img, path_out) in enumerate(zip(result.images, paths)):
        # image i of a batch is image 0 of a run with seed + i: --from reproduces it alone
        save_png(img, path_out, generation_metadata(pipe, result, i))
    if as_json:
        typer.echo(json.dumps({"model": spec.id, "images": [str(p) for p in paths], "seeds": result.seeds,
                               "steps": request.steps, "width": request.width, "height": request.height,
                               "timings": result.timings}))
    else:
        for p, s in zip(paths, result.seeds):
            typer.echo(f"{p}  (seed {s})")


def _saved_weights(saved: dict[str, Any]) -> str | None:
    source = (saved.get("weights") or {}).get("source", "")
    if not source or source.startswith(("bundled:", "procedural")):
        return None
    return source
