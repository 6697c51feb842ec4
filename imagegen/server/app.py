"""The HTTP face of `imagegen serve`: a FastAPI app speaking OpenAI's images API (generations, edits,
models, streaming as server-sent events) with OpenAI-style error bodies."""

from __future__ import annotations

import asyncio
import base64
import errno
import hmac
import ipaddress
import json
import logging
import os
import socket
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from io import BytesIO
from pathlib import Path
from typing import Any

import numpy as np
import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from PIL import Image
from pydantic import ValidationError
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.formparsers import MultiPartException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .. import __version__, hub, registry
from ..errors import ImagegenError, InvalidImageError, InvalidOptionError
from ..image import png_bytes
from ..options import OPTIONS, family_options, image_input
from ..registry import IMAGE_EDIT, TEXT_TO_IMAGE, ModelSpec
from . import uploads
from .errors import APIError, api_error
from .schemas import (
    UPLOADS,
    EditRequest,
    ErrorResponse,
    GenerationRequest,
    ImageData,
    ImageOptions,
    ImagesResponse,
    ModelCard,
    ModelList,
    OptionCard,
    family_uploads,
    form_schema,
    json_schema,
)
from .service import ImageService, JobResult, Plan
from .settings import Limits, parse_duration
from .worker import Cancelled, Job, QueueFullError, ShuttingDown

log = logging.getLogger("imagegen.server")
ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorResponse} for status in (400, 401, 404, 413, 429, 500)
}
IMAGE_FIELDS = ("image", "image[]")
PAGE = Path(__file__).parent / "static"  # the web page served at "/": plain HTML/CSS/JS, no secrets in it
_DONE = object()


# ---- guards: API key and body size, for every request -------------------------------------
class BodyTooLarge(HTTPException):
    def __init__(self, limit: int):
        super().__init__(413, f"Request body is larger than the server accepts ({limit} bytes).")


class Guard:
    """ASGI middleware: checks the Bearer key (when one is set) and caps the body, streamed or not."""

    def __init__(self, app: ASGIApp, api_key: str | None, max_body: int):
        self.app, self.max_body = app, max_body
        self.key = api_key.encode() if api_key else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        error = self._auth_error([v for k, v in scope["headers"] if k == b"authorization"])
        if error is not None and not _is_page(scope):  # the page's own files hold no data: it asks for the key
            return await _error_response(error)(scope, receive, send)
        length = headers.get(b"content-length", b"0")
        if not length.isdigit() or int(length) > self.max_body:
            bad = APIError(400, "Bad Content-Length header.", code="invalid_request")
            error = api_error_of(BodyTooLarge(self.max_body)) if length.isdigit() else bad
            return await _error_response(error)(scope, receive, send)
        received = 0

        async def limited() -> Message:  # chunked uploads carry no Content-Length: count as they come
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body:
                    raise BodyTooLarge(self.max_body)
            return message

        await self.app(scope, limited, send)

    def _auth_error(self, values: list[bytes]) -> APIError | None:
        """The scheme is case-insensitive (RFC 9110); two Authorization headers are ambiguous: refused."""
        if len(values) > 1:
            return APIError(400, "Send one Authorization header, not several.", code="invalid_authorization")
        if self.key is None:
            return None
        scheme, _, token = (values[0] if values else b"").strip().partition(b" ")
        if scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self.key):
            return None
        return APIError(
            401,
            "Incorrect or missing API key: send 'Authorization: Bearer <key>'.",
            code="invalid_api_key",
            headers={"WWW-Authenticate": "Bearer"},
        )


def _is_page(scope: Scope) -> bool:
    """The page's own files load without the key: the page then asks the person for it."""
    return scope["method"] in ("GET", "HEAD") and (scope["path"] == "/" or scope["path"].startswith("/static/"))


# ---- errors --------------------------------------------------------------------------------
def api_error_of(e: Exception) -> APIError:
    if isinstance(e, HTTPException):
        codes = {404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}
        fallback = "invalid_request" if e.status_code < 500 else "server_error"
        return APIError(e.status_code, str(e.detail), param=None, code=codes.get(e.status_code, fallback))
    return api_error(e)


def _error_response(error: APIError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status, headers=error.headers)


def validation_error(errors: Sequence[Any]) -> APIError:
    """Pydantic's first complaint, in OpenAI's words where OpenAI has them."""
    first = dict(errors[0]) if errors else {"type": "", "loc": (), "msg": "Invalid request."}
    loc = [str(part) for part in first.get("loc", ()) if part != "body"]
    param = ".".join(loc) or None
    kind = first.get("type", "")
    if kind == "json_invalid":
        return APIError(
            400, "We could not parse the JSON body of your request: it is not valid JSON.", code="invalid_json"
        )
    if kind == "extra_forbidden":
        return APIError(400, f"Unrecognized request argument supplied: {param}.", param=param, code="unknown_parameter")
    if kind == "missing":
        what = f"Missing required parameter: '{param}'." if param else "The request has no body."
        return APIError(400, what, param=param, code="missing_required_parameter")
    if kind in ("model_attributes_type", "dict_type") and not param:
        return APIError(
            400,
            "The request body must be a JSON object, sent as 'Content-Type: application/json'.",
            code="invalid_json",
        )
    reason = str(first.get("msg", "invalid")).removeprefix("Value error, ")  # pydantic's prefix for our checks
    return APIError(400, f"Invalid value for '{param}': {reason}.", param=param, code="invalid_value")


def _install_error_handlers(app: FastAPI) -> None:
    async def on_api_error(request: Request, e: Exception) -> JSONResponse:
        return _error_response(api_error_of(e))

    async def on_validation(request: Request, e: Exception) -> JSONResponse:
        assert isinstance(e, RequestValidationError)
        return _error_response(validation_error(e.errors()))

    async def on_unexpected(request: Request, e: Exception) -> JSONResponse:
        log.exception("unexpected error on %s", request.url.path)
        return _error_response(APIError(500, f"Internal error: {type(e).__name__}: {e}", "server_error"))

    for kind in (APIError, ImagegenError, HTTPException, QueueFullError, ShuttingDown):
        app.add_exception_handler(kind, on_api_error)
    app.add_exception_handler(RequestValidationError, on_validation)
    app.add_exception_handler(Exception, on_unexpected)


# ---- requests -> plans ---------------------------------------------------------------------
def _parse(read: Callable[[], Any]) -> Any:
    """A request model from its body; pydantic's complaints become OpenAI-style 400s."""
    try:
        return read()
    except ValidationError as e:
        raise validation_error(e.errors()) from None


def _decode_mask(data: bytes, name: str) -> Image.Image:
    """OpenAI's mask, whose fully transparent pixels mark where to edit -> imagegen's (white = repaint)."""
    try:
        with Image.open(BytesIO(data)) as img:
            img.load()
            transparent = "A" in img.getbands() or (img.mode == "P" and "transparency" in img.info)
            alpha = np.asarray(img.convert("RGBA"))[..., 3] if transparent else None
    except Exception as e:
        raise InvalidImageError(f"Upload '{name}' is not a readable image ({type(e).__name__}).") from None
    if alpha is None:
        raise APIError(
            400,
            f"Mask '{name}' has no transparency: its fully transparent pixels mark where to edit.",
            param="mask",
            code="invalid_image",
        )
    mask = Image.fromarray(np.where(alpha == 0, 255, 0).astype(np.uint8))
    return image_input(mask, name=Path(name).name, data=data)


Uploads = dict[str, list[Image.Image]]


async def _read_edit_form(request: Request, service: ImageService) -> tuple[EditRequest, list[Image.Image], Uploads]:
    """The multipart body of an edit: the other fields, the images and the uploads of declared image options
    (imagegen.options, e.g. a mask) by field name. Every upload is checked from its header before any is
    decoded, then decoded and scaled down off the event loop."""
    limits = service.limits
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        raise APIError(
            400, "Edits take multipart/form-data: the image file(s) and the fields.", code="invalid_content_type"
        )
    try:
        async with request.form(max_files=limits.max_images_in, max_fields=64) as form:
            fields: dict[str, Any] = {}
            files: list[tuple[str, UploadFile]] = []  # (field, file); field "" for the images to edit
            uploadable = UPLOADS | family_uploads() | {"mask"}
            for name, value in form.multi_items():
                if name in uploadable and isinstance(value, UploadFile):
                    files.append((name, value))
                elif name in IMAGE_FIELDS:
                    if not isinstance(value, UploadFile):
                        raise APIError(400, f"'{name}' must be a file upload.", param="image", code="invalid_image")
                    files.append(("", value))
                elif isinstance(value, UploadFile):
                    raise APIError(400, f"Unexpected file field '{name}'.", param=name, code="unknown_parameter")
                elif name in fields:
                    raise APIError(400, f"Field '{name}' given twice.", param=name, code="duplicate_key")
                else:
                    fields[name] = value
            blobs = [(field, await f.read(), f.filename) for field, f in files]
    except (MultiPartException, HTTPException) as e:  # Starlette reports parser errors as a 400 HTTPException
        if isinstance(e, HTTPException) and e.status_code != 400:
            raise
        detail = e.message if isinstance(e, MultiPartException) else e.detail
        raise APIError(400, f"Bad multipart body: {detail}", code="invalid_multipart") from None
    if "options" in fields:  # a form carries the model's own options as JSON text
        try:
            fields["options"] = json.loads(fields["options"])
        except json.JSONDecodeError:
            raise APIError(
                400, "Field 'options' must be a JSON object.", param="options", code="invalid_value"
            ) from None
    options = _parse(lambda: EditRequest.from_form(fields))
    spec = registry.get(options.model or service.default_model())
    uploads.check_all([(data, name) for _, data, name in blobs], spec)
    decoded: Uploads = {}
    for i, (field, data, name) in enumerate(blobs):
        if field == "mask":  # OpenAI's convention: transparent = edit
            decoded.setdefault(field, []).append(
                await asyncio.to_thread(_decode_mask, data, uploads.safe_name(name, i))
            )
        else:
            decoded.setdefault(field, []).append(await asyncio.to_thread(uploads.decode, data, name, i, spec))
    return options, decoded.pop("", []), decoded


def _client(request: Request) -> str:
    """Whose turn in the fair queue: the caller's address (the `user` field only divides its share)."""
    return request.client.host if request.client else "local"


def _watch(job: Job) -> asyncio.Future[Any]:
    """The job's outcome as an asyncio future whose failure is always retrieved, even when nobody awaits
    it any more (a client that left): no "Future exception was never retrieved" in the log."""
    future = asyncio.wrap_future(job.future)
    future.add_done_callback(lambda f: f.cancelled() or f.exception())
    return future


# ---- outcomes -> responses -----------------------------------------------------------------
def _sse(event: str, data: dict[str, Any]) -> bytes:
    return f"event: {event}\ndata: {json.dumps(data)}\n\n".encode()


def _image_event(size: str, b64: str) -> dict[str, Any]:
    """The fields OpenAI's partial_image / completed events carry (ours are PNG, opaque)."""
    return {
        "b64_json": b64,
        "created_at": int(time.time()),
        "size": size,
        "output_format": "png",
        "background": "opaque",
        "quality": "auto",
    }


def _size(plan: Plan, outcome: JobResult | None = None) -> str:
    if outcome is not None:
        return f"{outcome.width}x{outcome.height}"
    return f"{plan.width}x{plan.height}" if plan.width else "auto"


class Responder:
    """Runs a plan on the service and answers: JSON (b64 or URLs) or an event stream."""

    def __init__(self, service: ImageService):
        self.service = service

    async def answer(self, request: Request, plan: Plan, options: ImageOptions, kind: str) -> Response:
        if options.stream:
            return self._stream(request, plan, options, kind)
        job = self.service.submit(plan, _client(request), options.user or "")
        outcome = await self._wait(request, job)
        if outcome is None:
            return Response(status_code=499)  # the client left; nobody reads this
        url = options.response_format == "url"
        data = await asyncio.to_thread(self._encode, outcome, str(request.base_url) if url else None)
        return JSONResponse(
            ImagesResponse(
                created=int(time.time()),
                data=data,
                model=plan.spec.id,
                size=_size(plan, outcome),
                timings={k: round(v, 4) for k, v in outcome.timings.items()},
            ).model_dump(exclude_none=True)
        )

    def _encode(self, outcome: JobResult, base_url: str | None) -> list[ImageData]:
        data = []
        for i, seed in enumerate(outcome.seeds):
            png = outcome.png(i)
            if base_url is None:
                data.append(ImageData(b64_json=base64.b64encode(png).decode(), seed=seed))
            else:
                image_id = self.service.store.put(png)
                data.append(ImageData(url=f"{base_url.rstrip('/')}/v1/files/images/{image_id}.png", seed=seed))
        return data

    async def _wait(self, request: Request, job: Job) -> JobResult | None:
        """The job's outcome; polls for a disconnect so an abandoned request leaves the queue."""
        future = _watch(job)
        try:
            while not future.done():
                await asyncio.wait({future}, timeout=0.5)
                if not future.done() and await request.is_disconnected():
                    job.cancel()
                    return None
            return future.result()
        except Cancelled:
            return None
        except Exception as e:
            raise self._failure(e) from None
        finally:
            if not future.done():
                job.cancel()

    def _failure(self, e: Exception) -> APIError:
        error = api_error(e)
        if error.status == 500:  # a bug or a crash in a model: logged with its traceback, server stays up
            log.error("generation failed: %s", error.message, exc_info=e)
        elif error.status > 500:  # shutting down: expected, no traceback
            log.info("request ended: %s", error.message)
        return error

    def _stream(self, request: Request, plan: Plan, options: ImageOptions, kind: str) -> StreamingResponse:
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[Any] = asyncio.Queue()
        job = self.service.submit(
            plan,
            _client(request),
            options.user or "",
            lambda event: loop.call_soon_threadsafe(events.put_nowait, event),
        )
        future = _watch(job)
        future.add_done_callback(lambda _: events.put_nowait(_DONE))  # after every event the job emitted
        position = len(self.service.worker.queue)

        async def stream() -> AsyncIterator[bytes]:
            try:
                yield _sse(f"{kind}.queued", {"type": f"{kind}.queued", "position": position})
                while (event := await events.get()) is not _DONE:
                    if event["stage"] == "partial":  # PNG encoding off the device thread
                        event = {**event, "png": await asyncio.to_thread(png_bytes, event["image"])}
                    yield self._progress(kind, plan, event)
                try:
                    outcome: JobResult = future.result()
                except Exception as e:
                    error = self._failure(e)
                    yield _sse("error", error.body())
                    return
                size = _size(plan, outcome)
                for i, seed in enumerate(outcome.seeds):
                    b64 = base64.b64encode(await asyncio.to_thread(outcome.png, i)).decode()
                    yield _sse(
                        f"{kind}.completed",
                        {
                            "type": f"{kind}.completed",
                            **_image_event(size, b64),
                            "image_index": i,
                            "seed": seed,
                            "model": plan.spec.id,
                            "usage": {
                                "input_tokens": 0,
                                "output_tokens": 0,
                                "total_tokens": 0,
                                "input_tokens_details": {"image_tokens": 0, "text_tokens": 0},
                            },
                        },
                    )
            finally:
                if not future.done():
                    job.cancel()

        return StreamingResponse(
            stream(), media_type="text/event-stream", headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        )

    def _progress(self, kind: str, plan: Plan, event: dict[str, Any]) -> bytes:
        if event["stage"] == "partial":
            name = f"{kind}.partial_image"
            b64 = base64.b64encode(event["png"]).decode()
            return _sse(
                name,
                {
                    "type": name,
                    **_image_event(_size(plan), b64),
                    "partial_image_index": event["partial_image_index"],
                    "image_index": event["image_index"],
                },
            )
        name = f"{kind}.progress"  # imagegen's own event: OpenAI has none for step progress
        return _sse(name, {"type": name, **event})


# ---- the app -------------------------------------------------------------------------------
def _card(spec: ModelSpec, loaded: bool, default: bool) -> ModelCard:
    w, h = spec.default_size
    return ModelCard(
        id=spec.id,
        owned_by=spec.plugin or "imagegen",
        aliases=list(spec.aliases),
        description=spec.description,
        tasks=list(spec.tasks),
        default_size=f"{w}x{h}",
        size_multiple=spec.size_multiple,
        max_pixels=spec.max_pixels,
        default_steps=spec.default_steps,
        default_guidance=spec.default_guidance,
        default_dtype=spec.default_dtype,
        default_strength=list(spec.default_strength) if spec.accepts("init_image") else [],
        options=sorted(o.name for o in OPTIONS if o.gated and spec.accepts(o.name)),
        quantize_modes=list(spec.quantize_modes),
        loaded=loaded,
        family_options=[
            OptionCard(
                name=o.name, kind=o.kind, help=o.help, minimum=o.minimum, maximum=o.maximum, choices=list(o.choices)
            )
            for o in family_options(spec.extra_options)
            if "server" in o.fronts
        ],
        available=not spec.needs_weights or hub.weights_present(spec) is not None,
        default=default,
    )


def _default_id(service: ImageService) -> str | None:
    """The model a request that names none gets (None when that name does not resolve)."""
    try:
        return registry.get(service.default_model()).id
    except ImagegenError:
        return None


def create_app(
    models: Sequence[str] = (),
    keep_alive: str | float | None = "5m",
    api_key: str | None = None,
    lora_dir: str | Path | None = None,
    controlnet: str | None = None,
    **limits: Any,
) -> FastAPI:
    """The server app. `models` are loaded at start (the first is the default); `keep_alive` ("5m",
    "30s", 0 = unload after each request, -1 = never) keeps idle models warm; `lora_dir` holds the adapters
    requests may name; `controlnet` is loaded with the models that take one; `limits` are Limits fields."""
    settings = Limits.from_options(**limits)
    if lora_dir is not None and not Path(lora_dir).is_dir():
        raise InvalidOptionError(f"--lora-dir {lora_dir} is not a folder.")
    service = ImageService(settings, parse_duration(keep_alive), models, lora_dir, controlnet)
    responder = Responder(service)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        service.start()
        try:
            yield
        finally:
            await asyncio.to_thread(service.stop)

    app = FastAPI(
        title="imagegen",
        version=__version__,
        lifespan=lifespan,
        responses=ERRORS,
        description="OpenAI-compatible images API served by imagegen: generations, edits, models.",
    )
    app.state.service = service
    app.add_middleware(Guard, api_key=api_key, max_body=settings.max_body_bytes)
    _install_error_handlers(app)

    @app.post(
        "/v1/images/generations",
        response_model=ImagesResponse,
        tags=["images"],
        openapi_extra=json_schema(),
        summary="Create images from a prompt (stream: true for server-sent events)",
    )
    async def generations(request: Request) -> Response:
        raw = await request.body()
        body = _parse(lambda: GenerationRequest.from_json(raw, request.headers.get("content-type")))
        plan = service.plan(body, TEXT_TO_IMAGE)
        return await responder.answer(request, plan, body, "image_generation")

    @app.post(
        "/v1/images/edits",
        response_model=ImagesResponse,
        tags=["images"],
        openapi_extra=form_schema(),
        summary="Edit or combine images following a prompt (multipart/form-data)",
    )
    async def edits(request: Request) -> Response:
        options, images, files = await _read_edit_form(request, service)
        plan = await asyncio.to_thread(service.plan, options, IMAGE_EDIT, images, files)  # sizes the references
        return await responder.answer(request, plan, options, "image_edit")

    @app.get(
        "/v1/files/images/{name}",
        tags=["images"],
        summary="An image made with response_format='url'",
        response_class=Response,
        responses={200: {"content": {"image/png": {}}}},
    )
    async def image_file(name: str) -> Response:
        png = service.store.get(name.removesuffix(".png"))
        if png is None:
            raise APIError(404, "No such image: it expired or never existed.", param="name", code="not_found")
        return Response(png, media_type="image/png", headers={"Cache-Control": "private, max-age=3600"})

    def card(spec: ModelSpec) -> ModelCard:
        return _card(spec, service.residency.is_loaded(spec.id), default=spec.id == _default_id(service))

    @app.get("/v1/models", response_model=ModelList, tags=["models"], summary="Models this server can run")
    async def list_models() -> ModelList:
        return ModelList(data=[card(s) for s in registry.all_specs()])

    @app.get("/v1/models/{model_id}", response_model=ModelCard, tags=["models"], summary="One model")
    async def get_model(model_id: str) -> ModelCard:
        return card(registry.get(model_id))

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(PAGE / "index.html", headers={"Cache-Control": "no-cache"})

    app.mount("/static", StaticFiles(directory=PAGE), name="static")

    @app.get("/v1/loras", tags=["models"], summary="LoRA adapters requests may name (the --lora-dir files)")
    async def list_loras() -> dict[str, Any]:
        return {"object": "list", "data": await asyncio.to_thread(service.loras.listing)}

    @app.get("/health", tags=["server"], summary="Liveness, queue and resident models")
    async def health() -> dict[str, Any]:
        return service.health()

    return app


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def listen(host: str, port: int) -> socket.socket:
    """The listening socket, bound before any model is touched: a bad port or one in use is one line."""
    if not 1 <= port <= 65535:
        raise InvalidOptionError(f"--port must be between 1 and 65535, got {port}.")
    try:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET  # as uvicorn binds
        return socket.create_server((host, port), family=family, backlog=2048)
    except OSError as e:  # includes unknown host names (gaierror)
        why = (
            "the port is already in use (is another server running there?)"
            if e.errno == errno.EADDRINUSE
            else e.strerror or str(e)
        )
        raise ImagegenError(f"Cannot listen on {host}:{port}: {why}.") from None


class DrainingServer(uvicorn.Server):
    """uvicorn, whose shutdown (SIGTERM, Ctrl-C) first drains the service: the listening socket closes,
    requests in flight get the grace period, then what is left is answered with a 503 / an SSE error."""

    def __init__(self, config: uvicorn.Config, service: ImageService):
        super().__init__(config)
        self.service = service

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        grace = self.service.limits.shutdown_grace
        busy = len(self.service.worker.queue) + (self.service.worker.running is not None)
        log.info("imagegen serve: shutting down; %d request(s) in flight get %gs to finish", busy, grace)
        self.service.drain(grace)
        await super().shutdown(sockets)


def run_server(
    host: str = "127.0.0.1",
    port: int = 8000,
    models: Sequence[str] = (),
    keep_alive: str | float | None = "5m",
    api_key: str | None = None,
    log_level: str = "info",
    lora_dir: str | Path | None = None,
    controlnet: str | None = None,
    **limits: Any,
) -> None:
    """Serve until SIGTERM or Ctrl-C (then drain for `shutdown_grace`). The key falls back to
    $IMAGEGEN_API_KEY; bad settings, a bad port or one in use raise ImagegenError before a model loads."""
    api_key = api_key or os.environ.get("IMAGEGEN_API_KEY") or None
    Limits.from_options(**limits)  # bad limits are reported before the port is taken
    listener = listen(host, port)
    try:
        app = create_app(models, keep_alive, api_key, lora_dir, controlnet, **limits)
        if not is_loopback(host) and not api_key:
            log.warning("imagegen serve: listening on %s without an API key; anyone who can reach it can use it", host)
        service: ImageService = app.state.service
        # uvicorn's own limit comes after ours: the requests that were answered with an error still get written
        config = uvicorn.Config(app, log_level=log_level, timeout_graceful_shutdown=service.limits.shutdown_grace + 5)
        DrainingServer(config, service).run(sockets=[listener])
    finally:
        listener.close()
