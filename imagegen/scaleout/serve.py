"""`imagegen serve --ray`: the app of `imagegen serve` (imagegen.server.create_app) in every replica of a
Ray Serve deployment, one replica per GPU, behind a thin ingress that retries a request on another
replica when its replica dies before answering.

    client -> Serve proxy -> Gateway (ingress, no device) -> ImageServer replica (the app, resident pipelines)

Serve routes each request to the replica with the fewest requests in flight; with min/max replicas it
scales on requests waiting per replica. Images behind response_format="url" go to one store actor
that every replica shares, so any replica can hand them out.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import AsyncIterator, Sequence
from typing import Any

import ray
from ray import serve
from ray.exceptions import RayActorError
from ray.serve.handle import DeploymentHandle
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from ..errors import InvalidOptionError
from ..server.settings import Limits, parse_duration
from ..server.store import ImageStore
from . import PluginRef, connect, forwarded_plugins, runtime_env, setup_worker

APP_NAME = "imagegen"
STORE_NAME, STORE_NAMESPACE = "imagegen-images", "imagegen"
SCOPE_KEYS = (
    "type",
    "asgi",
    "http_version",
    "method",
    "scheme",
    "path",
    "raw_path",
    "query_string",
    "root_path",
    "headers",
    "client",
    "server",
)  # the plain data of an HTTP scope: what a replica needs
MAX_ONGOING = 4  # requests one replica holds (running + queued on its device); more wait for a free replica
log = logging.getLogger("imagegen.server")


# ---- the replica -----------------------------------------------------------------------------
class SharedStore:
    """The ImageStore interface over one detached store actor shared by all replicas."""

    def __init__(self, ttl: float, max_bytes: int):
        actor = ray.remote(ImageStore).options(
            name=STORE_NAME, namespace=STORE_NAMESPACE, get_if_exists=True, lifetime="detached", num_cpus=0
        )
        self.actor = actor.remote(ttl, max_bytes)

    def put(self, png: bytes) -> str:
        return ray.get(self.actor.put.remote(png))

    def get(self, image_id: str) -> bytes | None:
        return ray.get(self.actor.get.remote(image_id))


class ImageServer:
    """One replica: the server app, with its own device worker and resident pipelines, started once."""

    async def __init__(self, options: dict[str, Any], plugins: list[PluginRef]):
        setup_worker(plugins)
        from ..server import create_app

        self.app = create_app(**options)
        service = self.app.state.service
        service.store = SharedStore(service.limits.url_ttl, service.limits.max_stored_bytes)
        self.running: set[asyncio.Task[None]] = set()
        self.lifespan = self.app.router.lifespan_context(self.app)
        await self.lifespan.__aenter__()  # starts the device worker and preloads the models

    async def forward(self, request: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        """Run one HTTP request (scope + body) through the app; yields its ASGI response messages."""
        messages: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()
        gone = asyncio.Event()
        body = [{"type": "http.request", "body": request["body"], "more_body": False}]

        async def receive() -> dict[str, Any]:
            if body:
                return body.pop()
            await gone.wait()  # the app polls this to notice a client that left
            return {"type": "http.disconnect"}

        async def run() -> None:
            try:
                await self.app(request["scope"], receive, messages.put)
            finally:
                messages.put_nowait(None)

        task = asyncio.create_task(run())
        self.running.add(task)  # the app finishes even if the caller stops reading (it cancels the job)
        task.add_done_callback(self._finished)
        try:
            while (message := await messages.get()) is not None:
                yield message
        finally:
            gone.set()

    def _finished(self, task: asyncio.Task[None]) -> None:
        self.running.discard(task)
        if not task.cancelled():
            task.exception()  # the app has answered (500) and logged it; mark it seen for asyncio

    async def __del__(self) -> None:
        if hasattr(self, "lifespan"):  # not when __init__ failed
            await self.lifespan.__aexit__(None, None, None)


# ---- the ingress -----------------------------------------------------------------------------
async def _read_body(request: Request, limit: int) -> bytes:
    """The request body, cut just past `limit` (the replica's guard then refuses it with a 413)."""
    chunks, size = [], 0
    async for chunk in request.stream():
        if size <= limit:
            chunks.append(chunk[: limit + 1 - size])
        size += len(chunk)
    return b"".join(chunks)


def _server_error(status: int, message: str, code: str) -> JSONResponse:
    return JSONResponse(
        {"error": {"message": message, "type": "server_error", "param": None, "code": code}}, status_code=status
    )


class Relay(Response):
    """A replica's answer as it streams: its response start, then its body messages."""

    def __init__(self, start: dict[str, Any], rest: Any):
        super().__init__(status_code=start["status"])
        self.start, self.rest = start, rest

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        await send(self.start)
        try:
            async for message in self.rest:
                await send(message)
        except asyncio.CancelledError:  # the client left mid-answer (a stream): stop the replica's work too
            self.rest.cancel()
            raise


class Gateway:
    """The HTTP ingress: forwards each request to a replica, and again to another one (up to `retries`
    times) if its replica dies before its answer starts (a JSON answer starts once its images are made)."""

    def __init__(self, replicas: DeploymentHandle, retries: int, max_body: int):
        self.replicas, self.retries, self.max_body = replicas.options(stream=True), retries, max_body

    async def __call__(self, request: Request) -> Response:
        scope = request.scope
        forwarded = {
            "scope": {k: scope[k] for k in SCOPE_KEYS if k in scope},
            "body": await _read_body(request, self.max_body),
        }
        error: Exception | None = None
        for attempt in range(self.retries + 1):
            stream = self.replicas.forward.remote(forwarded)
            try:
                start = await stream.__anext__()
            except RayActorError as e:
                error = e
                log.warning(
                    "imagegen: a replica died under %s %s (attempt %d of %d)",
                    request.method,
                    request.url.path,
                    attempt + 1,
                    self.retries + 1,
                )
                continue
            except asyncio.CancelledError:  # the client left: stop the replica's work too
                stream.cancel()
                raise
            except Exception as e:
                log.exception("imagegen: forwarding %s failed", request.url.path)
                return _server_error(500, f"Internal error: {type(e).__name__}: {e}", "server_error")
            if attempt:  # tell the client (and the logs) that another replica answered
                start = {**start, "headers": [*start["headers"], (b"x-imagegen-retries", str(attempt).encode())]}
            return Relay(start, stream)
        return _server_error(503, f"No replica could answer: {type(error).__name__}.", "replica_unavailable")


# ---- the application -------------------------------------------------------------------------
def scaling(replicas: int | None, min_replicas: int | None, max_replicas: int | None, gpus: float) -> dict[str, Any]:
    """Serve's replica options: a fixed count (default one per GPU), or autoscaling between min and max
    on the requests waiting per replica."""
    if replicas is not None and (min_replicas is not None or max_replicas is not None):
        raise InvalidOptionError("Give --replicas, or --min-replicas/--max-replicas, not both.")
    if min_replicas is None and max_replicas is None:
        count = max(1, int(gpus)) if replicas is None else replicas
        if count < 1:
            raise InvalidOptionError(f"--replicas must be >= 1, got {count}.")
        return {"num_replicas": count}
    low, high = min_replicas or 0, max_replicas if max_replicas is not None else max(1, int(gpus), min_replicas or 0)
    if low < 0 or high < max(1, low):
        raise InvalidOptionError(
            f"Need 0 <= --min-replicas <= --max-replicas and --max-replicas >= 1, got {low} and {high}."
        )
    return {
        "autoscaling_config": {
            "min_replicas": low,
            "max_replicas": high,
            "initial_replicas": max(1, low),
            "target_ongoing_requests": 1,
        }
    }  # one image job per device at a time


def build_app(
    models: Sequence[str] = (),
    keep_alive: str | float | None = "5m",
    api_key: str | None = None,
    replicas: int | None = None,
    min_replicas: int | None = None,
    max_replicas: int | None = None,
    retries: int = 2,
    max_ongoing: int = MAX_ONGOING,
    **limits: Any,
) -> serve.Application:
    """The Serve application (needs a connected Ray). `limits` are imagegen.server.settings.Limits fields."""
    settings = Limits.from_options(**limits)  # bad values fail here, before any replica starts
    parse_duration(keep_alive)
    gpus = ray.cluster_resources().get("GPU", 0.0)
    device = {"num_gpus": 1, "num_cpus": 1} if gpus >= 1 else {"num_cpus": 1}
    env = runtime_env()
    server = serve.deployment(ImageServer).options(
        name="ImageServer",
        max_ongoing_requests=max_ongoing,
        graceful_shutdown_timeout_s=30,
        ray_actor_options={**device, **({"runtime_env": env} if env else {})},
        **scaling(replicas, min_replicas, max_replicas, gpus),
    )
    options = {"models": list(models), "keep_alive": keep_alive, "api_key": api_key, **limits}
    gateway = serve.deployment(Gateway).options(
        name="Gateway",
        num_replicas=1,
        max_ongoing_requests=10_000,
        ray_actor_options={"num_cpus": 0},
    )
    return gateway.bind(server.bind(options, forwarded_plugins()), retries, settings.max_body_bytes)


def app_builder(args: dict[str, Any]) -> serve.Application:
    """For Serve config files and KubeRay's RayService: `import_path: imagegen.scaleout.serve:app_builder`, with
    `args` the keyword arguments of build_app (models, keep_alive, api_key, replicas, ... and limits)."""
    return build_app(**args)


def run_serve(
    address: str | None,
    host: str = "127.0.0.1",
    port: int = 8000,
    models: Sequence[str] = (),
    api_key: str | None = None,
    **deployment: Any,
) -> None:
    """Deploy on a Ray cluster (see imagegen.scaleout.connect for `address`) and serve until Ctrl-C; `deployment`
    are build_app's other arguments (keep_alive, replicas, min_replicas, max_replicas and limits)."""
    from .. import registry
    from ..server import require_serve_extra
    from ..server.app import is_loopback

    require_serve_extra()
    api_key = api_key or os.environ.get("IMAGEGEN_API_KEY") or None
    for model in models:  # unknown names fail before a cluster starts
        registry.get(model)
    started = connect(address)
    try:
        serve.start(http_options={"host": host, "port": port})
        app = build_app(models, api_key=api_key, **deployment)
        serve.run(app, name=APP_NAME, route_prefix="/")
        if not is_loopback(host) and not api_key:
            log.warning("imagegen serve: listening on %s without an API key; anyone who can reach it can use it", host)
        print(f"imagegen serve on Ray: http://{host}:{port} (Ctrl-C stops it)", flush=True)
        while True:
            time.sleep(1)
    except KeyboardInterrupt:
        pass
    finally:
        shutdown(started)


def shutdown(started_cluster: bool) -> None:
    """Remove the app and the shared image store; stop Serve and Ray if this process started them."""
    try:
        serve.delete(APP_NAME)
        ray.kill(ray.get_actor(STORE_NAME, namespace=STORE_NAMESPACE))
    except ValueError:  # no store: no replica got far enough to make one
        pass
    if started_cluster:
        serve.shutdown()
        ray.shutdown()
