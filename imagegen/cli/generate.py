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
from ..errors import InvalidImageError, InvalidOptionError
from ..image import encode_image, generation_metadata, image_format, read_metadata, save_image
from ..memory import preflight, weight_bytes
from ..options import BY_NAME, family_options, parse_size
from ..request import given, replayed
from . import app, handle_errors
from .options import cli_options, flag_errors, label, with_flags
from .progress import RunProgress


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
    "prompt": (str,),
    "negative_prompt": (str,),
    "model": (str,),
    "seed": (int,),
    "steps": (int,),
    "guidance": (int, float),
    "width": (int,),
    "height": (int,),
    "quantize": (str,),
    "dtype": (str,),
    "options": (dict,),
    "images": (list,),
    "inputs": (dict,),
    "weights": (dict,),
}


def read_saved(path: Path) -> dict[str, Any]:
    """The settings of `--from PNG`, each field checked for its type: one clear line for damaged metadata."""
    saved = read_metadata(path)
    for name, kinds in SAVED_FIELDS.items():
        value = saved.get(name)
        if value is not None and (not isinstance(value, kinds) or isinstance(value, bool)):
            raise InvalidImageError(f"{path}: its metadata field '{name}' is not usable: {json.dumps(value)[:80]}.")
    return saved


def replay_weights(path: Path, saved: dict[str, Any], spec: Any, weights: str | None) -> None:
    """Use the local model, never a folder or repo a PNG names; say so when the PNG was made with other weights."""
    source = (saved.get("weights") or {}).get("source")
    if weights is not None or not isinstance(source, str) or source.startswith(("bundled:", "procedural")):
        return
    local = hub.weights_present(spec)
    here = hub.weights_identity(spec, local) if local is not None else {}
    if source != here.get("source") or saved["weights"].get("config_sha256") != here.get("config_sha256"):
        shown = "".join(c if c.isprintable() else "?" for c in source)[:200]
        typer.secho(
            f"Note: {path} was made with the weights '{shown}'; using the local '{spec.id}' weights "
            "(pass --weights to choose).",
            err=True,
        )


def replay_components(path: Path, saved: dict[str, Any], given: dict[str, str | None]) -> None:
    """A VAE or ControlNet folder or repo a PNG names is not loaded either: say so, the user passes --vae /
    --controlnet to use one."""
    named = saved.get("components") if isinstance(saved.get("components"), dict) else {}
    for name, source in named.items():
        if name in given and given[name] is None and isinstance(source, str):
            shown = "".join(c if c.isprintable() else "?" for c in source)[:200]
            instead = "using the model's own VAE" if name == "vae" else "loading none"
            typer.secho(
                f"Note: {path} was made with --{name} '{shown}'; {instead} (pass --{name} to choose).", err=True
            )


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
    model: str = typer.Option(
        None, "--model", "-m", help="Model id, alias or family (default: $IMAGEGEN_MODEL or the bundled demo model)."
    ),
    output: Path = typer.Option(
        None,
        "--output",
        "-o",
        help="Image file (.png, .jpg, .webp), folder, or - for standard output (default: a new PNG here).",
    ),
    size: str = typer.Option(
        None,
        "--size",
        help="WIDTHxHEIGHT, multiples of 16 (default: the model's, or the first --image's for editing models).",
    ),
    weights: str = typer.Option(None, "--weights", help="Weights folder or Hugging Face repo id (cached)."),
    quantize: str = typer.Option(
        None, "--quantize", "-q", help="Quantize weights: 4, 8, mxfp8, mxfp4, nvfp4, fp8 (faster on CUDA), ..."
    ),
    dtype: str = typer.Option(
        None, "--dtype", help="bfloat16, float16 or float32 (default: the model's; float32 for flux2-demo)."
    ),
    option: list[str] = typer.Option(
        None, "--option", "-O", help="A model-specific option NAME=VALUE, e.g. cfg_truncation=0.9 (zimage); repeatable."
    ),
    cache: str = typer.Option(
        None,
        "--cache",
        help="Step caching (with the imagegen-cache plugin): "
        "first-block[:THRESHOLD], mag[:THRESHOLD],ratios=FILE, or off.",
    ),
    vae: str = typer.Option(
        None,
        "--vae",
        help="Another VAE: a diffusers folder or cached repo id, e.g. "
        "black-forest-labs/FLUX.2-small-decoder for FLUX.2 models.",
    ),
    controlnet: str = typer.Option(
        None,
        "--controlnet",
        help="A ControlNet (diffusers folder or cached repo id) steering the model with --control-image (Z-Image).",
    ),
    from_image: Path = typer.Option(None, "--from", help="Reuse the settings saved in an imagegen PNG."),
    force: bool = typer.Option(False, "--force", help="Run even if the memory estimate says it will not fit."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
    quiet: bool = typer.Option(False, "--quiet", help="No progress output."),
    gpus: int = typer.Option(1, "--gpus", help="Spread one image over N GPUs (one process each; FLUX.2 models)."),
    flags: dict[str, Any] | None = None,
) -> None:
    """Generate images from a text prompt."""
    saved: dict[str, Any] = read_saved(from_image) if from_image is not None else {}
    prompt = read_prompt(prompt) or saved.get("prompt")
    if not prompt:
        raise InvalidOptionError("Give a prompt (or '-' to read it from standard input).")
    spec = registry.get(model or saved.get("model") or registry.default_model() or "")
    given_flags = {k: v for k, v in (flags or {}).items() if given(v)}
    if size is not None and ("width" in given_flags or "height" in given_flags):
        raise InvalidOptionError("Give --size or --width/--height, not both.")
    if size is not None:
        given_flags["width"], given_flags["height"] = parse_size(size, "--size")
    family = parse_options(option or [])
    if cache is not None:  # the imagegen-cache plugin's option, as a flag of its own
        if "cache" not in {o.name for o in family_options(spec.extra_options)}:
            raise InvalidOptionError(f"Model '{spec.id}' does not support --cache (is imagegen-cache installed?).")
        family["cache"] = cache
    own = {o.name for o in family_options(spec.extra_options)}
    unknown = sorted(set(family) - own)
    if unknown:
        raise InvalidOptionError(f"Model '{spec.id}' does not support --option {unknown[0]}.")
    foreign = sorted(name for name in given_flags if name not in BY_NAME and name not in own)
    if foreign:  # another family's flag (e.g. Z-Image's --control-image)
        raise InvalidOptionError(f"Model '{spec.id}' does not support {label(foreign[0])}.")
    with flag_errors():
        # input images a PNG names are found by file name beside it or here, and only with the same content
        kept = {k: v for k, v in saved.items() if k not in given_flags}  # a flag replaces the saved value outright
        values = replayed(spec, kept, [from_image.parent, Path.cwd()]) if saved else {}
        request = spec.request(prompt, **{**values, **family, **given_flags})  # every check, before any load
    quantize = spec.check_quantize(quantize or saved.get("quantize"))
    dtype = dtype or saved.get("dtype")
    if from_image is not None:
        replay_weights(from_image, saved, spec, weights)
    components = {"vae": vae, "controlnet": controlnet}
    if from_image is not None:
        replay_components(from_image, saved, components)
    spec.check_components(components)
    to_stdout = output is not None and str(output) == "-"
    if to_stdout and request.batch_size != 1:
        raise InvalidOptionError("-o - writes one PNG to standard output: use it with --count 1.")
    if to_stdout and sys.stdout.isatty():
        raise InvalidOptionError("-o - would write a PNG to the terminal: pipe it to a file or a program.")
    paths = [Path("-")] if to_stdout else output_paths(output, spec.id, request.seeds[0], request.batch_size)
    if not to_stdout:
        check_writable(paths[0].parent)
    if gpus != 1 and distributed.WORLD_ENV not in os.environ:
        distributed.check_count(gpus)
        if not spec.extra.get("sequence_parallel"):
            raise InvalidOptionError(f"Model '{spec.id}' cannot spread one image over several GPUs (--gpus).")
        # every rank runs this command with the seed fixed here, so all draw the same noise
        argv = [sys.executable, "-m", "imagegen", *sys.argv[1:], "--seed", str(request.seeds[0])]
        raise typer.Exit(distributed.launch(argv, gpus))

    path = hub.resolve_weights(spec, weights)
    if spec.estimate_memory is not None:
        needed = spec.estimate_memory(
            spec, path, dtype or spec.default_dtype, quantize, request.width, request.height, request.batch_size
        )
        if needed and controlnet is not None:  # its weights come on top of the model's
            needed += weight_bytes(
                hub.resolve_component(controlnet, "--controlnet"), dtype or spec.default_dtype, quantize, quantized=True
            )
        preflight(needed, spec.id, force)

    with RunProgress(quiet or as_json) as progress:
        loaded = {name: source for name, source in components.items() if source is not None}
        pipe = spec.pipeline(weights=path, dtype=dtype, quantize=quantize, on_load=progress.on_load, **loaded)
        result = pipe.generate(request, on_step=progress.on_step)

    for i, (img, path_out) in enumerate(zip(result.images, paths)):
        # image i of a batch is image 0 of a run with seed + i: --from reproduces it alone
        metadata = generation_metadata(pipe, result, i)
        if to_stdout:
            sys.stdout.buffer.write(encode_image(img, metadata))
            sys.stdout.buffer.flush()
        else:
            save_image(img, path_out, metadata)
    if as_json:
        typer.echo(
            json.dumps(
                {
                    "model": spec.id,
                    "images": [str(p) for p in paths],
                    "seeds": result.seeds,
                    "steps": request.steps,
                    "width": request.width,
                    "height": request.height,
                    "timings": result.timings,
                }
            ),
            err=to_stdout,
        )
    else:
        for p, s in zip(paths, result.seeds):
            typer.echo(f"{'(standard output)' if to_stdout else p}  (seed {s})", err=to_stdout)
