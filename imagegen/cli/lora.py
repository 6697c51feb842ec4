"""`imagegen lora inspect` (what a LoRA file's keys become in a model) and `imagegen convert` (adapters merged into a
weights folder that loads like any other)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import typer

from .. import hub, registry
from ..errors import InvalidOptionError, LoraError
from ..lora import parse_cli_lora, read_adapter
from ..quantize import scheme
from ..weights import random_weights, save_module
from . import app, handle_errors

lora_app = typer.Typer(help="Inspect LoRA / LyCORIS adapter files.", no_args_is_help=True)
app.add_typer(lora_app, name="lora")


def _pipeline(model: str, weights: str | None, random: bool):
    spec = registry.get(model)
    if spec.lora_targets is None:
        raise InvalidOptionError(f"Model '{spec.id}' does not support LoRA adapters.")
    path = hub.resolve_weights(spec, weights)
    if random:  # shapes and names only: no weights are read
        with random_weights(lazy=True):
            return spec.pipeline(weights=path, dtype="float32")
    return spec.pipeline(weights=path)


@lora_app.command("inspect")
@handle_errors
def inspect(
    file: Path = typer.Argument(..., help="A .safetensors adapter file."),
    model: str = typer.Option(..., "--model", "-m", help="Model id, alias or family."),
    weights: str = typer.Option(
        None,
        "--weights",
        help="Weights folder or Hugging Face repo id (its configs and "
        "layer shapes are what the file is checked against).",
    ),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """The layout a file is in and, per key: mapped (onto which layers), ignored (why) or unknown (why)."""
    read_adapter(file)
    pipe = _pipeline(model, weights, random=True)
    plan = pipe.loras().plan(parse_cli_lora(str(file)), partial=True)
    parsed = plan.parsed
    counts = {s: sum(r.status == s for r in parsed.report) for s in ("mapped", "ignored", "unknown")}
    if as_json:
        typer.echo(
            json.dumps(
                {
                    "file": str(file),
                    "model": pipe.spec.id,
                    "layout": parsed.layout,
                    "sha256": parsed.file.sha256,
                    "counts": counts,
                    "keys": [{"key": r.key, "status": r.status, "detail": r.detail} for r in parsed.report],
                }
            )
        )
        return
    typer.echo(f"{file.name}: {parsed.layout}")
    typer.echo(
        f"  {counts['mapped']} mapped, {counts['ignored']} ignored, {counts['unknown']} unknown "
        f"of {len(parsed.report)} keys for {pipe.spec.id}"
    )
    for r in parsed.report:
        typer.echo(f"  {r.status:<8} {r.key}  ->  {r.detail}")


@app.command()
@handle_errors
def convert(
    model: str = typer.Option(..., "--model", "-m", help="Model id, alias or family."),
    weights: str = typer.Option(None, "--weights", help="Weights folder or Hugging Face repo id."),
    lora: list[str] = typer.Option(..., "--lora", help="PATH[:SCALE]; repeatable, the adapters add up."),
    lora_partial: bool = typer.Option(False, "--lora-partial", help="Skip keys the model does not know."),
    quantize: str = typer.Option(None, "--quantize", "-q", help="Also quantize the merged transformer."),
    output: Path = typer.Option(..., "--output", "-o", help="The new weights folder (must not exist)."),
) -> None:
    """Write a weights folder with LoRA adapters merged into the transformer (and quantized): it loads like any
    other, with no adapter at run time."""
    spec = registry.get(model)
    quantize = spec.check_quantize(quantize)
    loras = [parse_cli_lora(text) for text in lora]
    for adapter in loras:
        read_adapter(adapter.path)
    if output.exists():
        raise InvalidOptionError(f"{output} already exists: convert writes a new folder.")
    source = hub.resolve_weights(spec, weights)
    pipe = _pipeline(model, weights, random=False)
    pipe.request("", loras=loras, lora_partial=lora_partial)  # maps and checks every file
    if any("text_encoder" in pipe.loras().plan(a, lora_partial).terms for a in loras):
        raise LoraError(
            "convert merges transformer adapters only; text-encoder adapters apply per request (imagegen run --lora)."
        )
    pipe.loras().use(loras, lora_partial)
    partial = output.with_name(output.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    shutil.copytree(source, partial, ignore=shutil.ignore_patterns("transformer"))
    config = json.loads((Path(source) / "transformer" / "config.json").read_text())
    save_module(pipe.transformer, partial / "transformer", config)
    del pipe
    if quantize is not None:  # the family's own quantization choices, applied by loading the merged folder
        merged = spec.pipeline(weights=partial, quantize=quantize)
        shutil.rmtree(partial / "transformer")
        save_module(merged.transformer, partial / "transformer", config, {"quantization": quantize, **scheme(quantize)})
    partial.rename(output)  # nothing half written under the asked name
    typer.echo(f"{output}  ({len(loras)} adapter(s) merged{f', quantized {quantize}' if quantize else ''})")
