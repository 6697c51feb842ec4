"""`imagegen serve`: a resident server with the OpenAI images API (needs the `serve` extra)."""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path

import typer

from .. import distributed, ranks, registry
from ..errors import InvalidOptionError
from . import app, handle_errors


@app.command()
@handle_errors
def serve(
    host: str = typer.Option("127.0.0.1", "--host", help="Address to bind (localhost by default)."),
    port: int = typer.Option(8000, "--port", help="TCP port."),
    model: list[str] = typer.Option(
        None,
        "--model",
        "-m",
        help="Model to load at start; repeatable. The first is the default for requests that name none.",
    ),
    keep_alive: str = typer.Option(
        "5m",
        "--keep-alive",
        help="How long an idle model stays loaded: 30s, 5m, 1h, 0 (unload after each request) or forever.",
    ),
    api_key: str = typer.Option(
        None, "--api-key", envvar="IMAGEGEN_API_KEY", help="Require 'Authorization: Bearer KEY' on every request."
    ),
    max_memory: str = typer.Option(
        None, "--max-memory", help="Memory budget for loaded models, e.g. 24GB (default: what is available at start)."
    ),
    max_queue: int = typer.Option(None, "--max-queue", help="Requests waiting at most; more get HTTP 429."),
    grace: str = typer.Option(
        "30s",
        "--grace",
        help="On SIGTERM or Ctrl-C: how long requests in flight may "
        "finish (e.g. 10s, 1m); then they are answered with HTTP 503.",
    ),
    ray: str = typer.Option(
        None,
        "--ray",
        help="Serve on Ray: 'local' starts a cluster on this machine, 'auto' joins "
        "the one `ray start` runs, or a cluster address (needs the ray extra: "
        "pip install 'imagegen-mlx\\[ray]').",
    ),
    replicas: int = typer.Option(
        None,
        "--replicas",
        help="With --ray: replicas, each with its own device and resident models (default: one per GPU).",
    ),
    min_replicas: int = typer.Option(None, "--min-replicas", help="With --ray: autoscale from this many replicas."),
    max_replicas: int = typer.Option(None, "--max-replicas", help="With --ray: autoscale up to this many replicas."),
    lora_dir: Path = typer.Option(
        None,
        "--lora-dir",
        help="Folder of LoRA .safetensors files requests may name (field 'loras'); GET /v1/loras lists them.",
    ),
    controlnet: str = typer.Option(
        None,
        "--controlnet",
        help="A ControlNet (diffusers folder or cached repo id) "
        "loaded with the models that take one (Z-Image); edits upload 'control_image'.",
    ),
    gpus: int = typer.Option(
        1,
        "--gpus",
        help="Spread each image over N GPUs of this host, one process each, "
        "every model held on all of them (FLUX.2 models; not with --ray).",
    ),
) -> None:
    """Serve models over HTTP: POST /v1/images/generations and /v1/images/edits, GET /v1/models."""
    from ..server import run_server

    if gpus != 1 and distributed.WORLD_ENV not in os.environ:
        distributed.check_count(gpus)
        if ray is not None:
            raise InvalidOptionError("--gpus does not combine with --ray: a Ray replica holds one GPU.")
        for name in model or ():
            spec = registry.get(name)
            if not spec.extra.get("sequence_parallel"):
                raise InvalidOptionError(f"Model '{spec.id}' cannot spread one image over several GPUs (--gpus).")
        raise typer.Exit(distributed.launch([sys.executable, "-m", "imagegen", *sys.argv[1:]], gpus))
    if gpus != 1 and ranks.rank() != 0:  # a rank that mirrors rank 0's pipelines
        return ranks.follow()
    # what both servers take
    common = dict(
        host=host,
        port=port,
        models=model or (),
        keep_alive=keep_alive,
        api_key=api_key,
        max_memory=max_memory,
        max_queue=max_queue,
    )
    if ray is not None:
        if lora_dir is not None or controlnet is not None:
            flag = "--lora-dir" if lora_dir is not None else "--controlnet"
            raise InvalidOptionError(f"{flag} is not available with --ray yet: serve without --ray.")
        from ..scaleout import require_ray

        require_ray(serve=True)
        from ..scaleout.serve import run_serve

        return run_serve(ray, replicas=replicas, min_replicas=min_replicas, max_replicas=max_replicas, **common)
    if (replicas, min_replicas, max_replicas) != (None, None, None):
        raise InvalidOptionError("--replicas, --min-replicas and --max-replicas need --ray.")

    with ranks.lead(gpus) if gpus != 1 else contextlib.nullcontext():
        run_server(shutdown_grace=grace, lora_dir=lora_dir, controlnet=controlnet, **common)
