"""`imagegen models | plugins | info | pull | rm`: what is installed, what is cached, what made an image."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Column, Table

from .. import hub, plugins, registry
from ..image import read_metadata
from . import app, handle_errors


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return ""


def _model_rows() -> list[dict]:
    rows = []
    for spec in registry.all_specs():
        path = hub.weights_present(spec)
        missing = hub.missing_files(path) if path is not None else []
        state = "present" if path and not missing else ("incomplete" if path else "missing")
        rows.append(
            {
                "id": spec.id,
                "family": spec.family,
                "aliases": list(spec.aliases),
                "plugin": spec.plugin,
                "tasks": list(spec.tasks),
                "description": spec.description,
                "hf_repo": spec.hf_repo,
                "weights": "not needed" if not spec.needs_weights else state,
                "weights_path": str(path) if path else None,
                "missing_files": missing,
                "weights_bytes": hub.folder_size(path) if path else None,
                "default_steps": spec.default_steps,
                "default_guidance": spec.default_guidance,
                "options": sorted(spec.options),
                "quantize": list(spec.quantize_modes),
            }
        )
    return rows


@app.command()
@handle_errors
def models(as_json: bool = typer.Option(False, "--json", help="Print JSON.")) -> None:
    """List the models that plugins provide and whether their weights are here."""
    rows = _model_rows()
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    table = Table(Column("id", no_wrap=True), "aliases", "family", "tasks", "weights", "plugin")
    for r in rows:
        weights = r["weights"] + (f" ({_size(r['weights_bytes'])})" if r["weights_bytes"] else "")
        if r["missing_files"]:
            weights += f": no {', '.join(r['missing_files'][:3])}{' ...' if len(r['missing_files']) > 3 else ''}"
        table.add_row(
            *(
                escape(str(v))
                for v in (r["id"], ", ".join(r["aliases"]), r["family"], ", ".join(r["tasks"]), weights, r["plugin"])
            )
        )
    console = Console()
    console.print(table)
    for r in rows:  # what each model is and draws: too long for a table column
        console.print(f"[bold]{escape(r['id'])}[/bold]: {escape(r['description'])}", highlight=False)


@app.command(name="plugins")
@handle_errors
def plugins_command(as_json: bool = typer.Option(False, "--json", help="Print JSON.")) -> None:
    """List installed plugins, their hooks and the models they register."""
    rows = [
        {
            "name": i.name,
            "distribution": i.distribution,
            "version": i.version,
            "hooks": i.hooks,
            "models": i.models,
            "error": i.error,
        }
        for i in plugins.plugin_infos()
    ]
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    table = Table("name", "distribution", "version", "hooks", "models")
    for r in rows:
        models = ", ".join(r["models"]) if not r["error"] else f"[red]failed: {r['error']}[/red]"
        table.add_row(r["name"], r["distribution"], r["version"], ", ".join(r["hooks"]), models)
    Console().print(table)


@app.command()
@handle_errors
def info(
    image: Path = typer.Argument(..., help="A PNG written by imagegen."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Show the settings an image was made with (reproduce it with `imagegen run --from IMAGE`)."""
    meta = read_metadata(image)
    if as_json:
        typer.echo(json.dumps(meta, indent=2))  # ensure_ascii: control and bidi characters come out escaped
        return
    for key, value in meta.items():
        text = json.dumps(value, ensure_ascii=False) if isinstance(value, dict | list) else str(value)
        typer.echo(f"{printable(str(key)):>16}: {printable(text)}")


def printable(text: str) -> str:
    """Metadata is untrusted: control characters (ESC sequences, CR, NUL) and invisible formatting characters
    (bidi overrides) are shown as escapes instead of acting on the terminal."""
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)


@app.command()
@handle_errors
def pull(
    model: str = typer.Argument(..., help="Model id or alias."),
    repo: str = typer.Option(None, "--repo", help="Another Hugging Face repo holding the same layout."),
) -> None:
    """Download the files imagegen reads of a model's repo into the Hugging Face cache.

    Needs the hub extra: pip install "imagegen-mlx\\[hub]" (in a checkout: pip install -e ".\\[hub]")."""
    spec = registry.get(model)
    path = hub.pull(spec, repo)
    typer.echo(f"{spec.id}: {path} ({_size(hub.folder_size(path))})")


@app.command()
@handle_errors
def rm(
    model: str = typer.Argument(..., help="Model id or alias."),
    yes: bool = typer.Option(False, "--yes", "-y", help="Do not ask for confirmation."),
) -> None:
    """Delete a model's cached weights."""
    spec = registry.get(model)
    if not spec.hf_repo or not hub.repo_cache_dir(spec.hf_repo).is_dir():
        hub.remove(spec)  # raises the "no cached weights" error
    folder = hub.repo_cache_dir(spec.hf_repo)
    if not yes and not typer.confirm(f"Delete {folder} ({_size(hub.folder_size(folder))})?"):
        raise typer.Abort()
    hub.remove(spec)
    typer.echo(f"Removed {folder}")
