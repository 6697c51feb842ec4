"""The HTTP face of `imagegen serve`: a FastAPI app speaking OpenAI's images API (generations, edits,
models, streaming as server-sent events) with OpenAI-style error bodies."""

from __future__ import annotations

import asyncio
import base64
import hmac
import ipaddress
import json
import logging
import os
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from io import BytesIO
from pathlib import Path
from typing import Any

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
from ..errors import ImagegenError, InvalidImageError
from ..image import png_bytes
from ..options import OPTIONS, family_options, image_input
from ..registry import IMAGE_EDIT, TEXT_TO_IMAGE, ModelSpec
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
    form_schema,
)
from .service import ImageService, Outcome, Plan
from .settings import Limits, parse_duration
from .worker import Cancelled, Job, QueueFullError

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
        self.key = f"Bearer {api_key}".encode() if api_key else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        authorized = self.key is None or hmac.compare_digest(headers.get(b"authorization", b""), self.key)
        if not authorized and not _is_page(scope):
            error = APIError(401, "Incorrect or missing API key: send 'Authorization: Bearer <key>'.",
                             code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
            return await _error_response(error)(scope, receive, send)
        length = headers.get(b"content-length", b"0")
        if not length.isdigit() or int(length) > self.max_body:
            error = BodyTooLarge(self.max_body) if length.isdigit() else APIError(400, "Bad Content-Length header.")
            return await _error_response(api_error_of(error))(scope, receive, send)
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


def _is_page(scope: Scope) -> bool:
    """The page's own files load without the key: the page then asks the person for it."""
    return scope["method"] in ("GET", "HEAD") and (scope["path"] == "/" or scope["path"].startswith("/static/"))


# ---- errors --------------------------------------------------------------------------------
def api_error_of(e: Exception) -> APIError:
    if isinstance(e, HTTPException):
        codes = {404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}
        return APIError(e.status_code, str(e.detail), param=None, code=codes.get(e.status_code))
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
        return APIError(400, "We could not parse the JSON body of your request: it is not valid JSON.",
                        code="invalid_json")
    if kind == "extra_forbidden":
        return APIError(400, f"Unrecognized request argument supplied: {param}.", param=param,
                        code="unknown_parameter")
    if kind == "missing":
        what = f"Missing required parameter: '{param}'." if param else "The request has no body."
        return APIError(400, what, param=param, code="missing_required_parameter")
    if kind in ("model_attributes_type", "dict_type") and not param:
        return APIError(400, "The request body must be a JSON object, sent as 'Content-Type: application/json'.",
                        code="invalid_json")
    return APIError(400, f"Invalid value for '{param}': {first.get('msg', 'invalid')}.", param=param,
                    code="invalid_value")


def _install_error_handlers(app: FastAPI) -> None:
    async def on_api_error(request: Request, e: Exception) -> JSONResponse:
        return _error_response(api_error_of(e))

    async def on_validation(request: Request, e: Exception) -> JSONResponse:
        assert isinstance(e, RequestValidationError)
        return _error_response(validation_error(e.errors()))

    async def on_unexpected(request: Request, e: Exception) -> JSONResponse:
        log.exception("unexpected error on %s", request.url.path)
        return _error_response(APIError(500, f"Internal error: {type(e).__name__}: {e}", "server_error"))

    for kind in (APIError, ImagegenError, HTTPException, QueueFullError):
        app.add_exception_handler(kind, on_api_error)
    app.add_exception_handler(RequestValidationError, on_validation)
    app.add_exception_handler(Exception, on_unexpected)


# ---- requests -> plans ---------------------------------------------------------------------
def _decode_image(data: bytes, name: str) -> Image.Image:
    try:
        with Image.open(BytesIO(data)) as img:
            img.load()
            return image_input(img.convert("RGB"), name=Path(name).name, data=data)  # remembered by name + sha256
    except Exception as e:  # PIL raises many kinds (incl. DecompressionBombError) for bad uploads
        raise InvalidImageError(f"Upload '{name}' is not a readable image ({type(e).__name__}).") from None


Uploads = dict[str, list[Image.Image]]


async def _read_edit_form(request: Request, limits: Limits) -> tuple[EditRequest, list[Image.Image], list[str],
                                                                    Uploads]:
    """The multipart body of an edit: the images (decoded off the event loop), the uploads of declared image
    options (imagegen.options, e.g. a mask) by field name, and the other fields."""
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        raise APIError(400, "Edits take multipart/form-data: the image file(s) and the fields.",
                       code="invalid_content_type")
    try:
        async with request.form(max_files=limits.max_images_in, max_fields=64) as form:
            fields: dict[str, Any] = {}
            uploads: list[UploadFile] = []
            declared: list[tuple[str, UploadFile]] = []
            for name, value in form.multi_items():
                if name in UPLOADS and isinstance(value, UploadFile):
                    declared.append((name, value))
                elif name in IMAGE_FIELDS:
                    if not isinstance(value, UploadFile):
                        raise APIError(400, f"'{name}' must be a file upload.", param="image", code="invalid_image")
                    uploads.append(value)
                elif isinstance(value, UploadFile):
                    hint = " (masks are not supported)" if name == "mask" else ""
                    raise APIError(400, f"Unexpected file field '{name}'{hint}.", param=name,
                                   code="unknown_parameter")
                elif name in fields:
                    raise APIError(400, f"Field '{name}' given twice.", param=name, code="invalid_value")
                else:
                    fields[name] = value
            blobs = [(await u.read(), u.filename or f"image {i}") for i, u in enumerate(uploads)]
            option_blobs = [(field, await u.read(), u.filename or field) for field, u in declared]
    except (MultiPartException, HTTPException) as e:  # Starlette reports parser errors as a 400 HTTPException
        if isinstance(e, HTTPException) and e.status_code != 400:
            raise
        detail = e.message if isinstance(e, MultiPartException) else e.detail
        raise APIError(400, f"Bad multipart body: {detail}", code="invalid_multipart") from None
    if "options" in fields:  # a form carries the model's own options as JSON text
        try:
            fields["options"] = json.loads(fields["options"])
        except json.JSONDecodeError:
            raise APIError(400, "Field 'options' must be a JSON object.", param="options",
                           code="invalid_value") from None
    try:
        options = EditRequest.model_validate(fields)
    except ValidationError as e:
        raise validation_error(e.errors()) from None
    images = [await asyncio.to_thread(_decode_image, data, name) for data, name in blobs]
    files: Uploads = {}
    for field, data, name in option_blobs:
        files.setdefault(field, []).append(await asyncio.to_thread(_decode_image, data, name))
    return options, images, [name for _, name in blobs], files


def _client(request: Request, options: ImageOptions) -> str:
    return options.user or (request.client.host if request.client else "local")


# ---- outcomes -> responses -----------------------------------------------------------------
def _sse(event: str, data: dict[str, Any]) -> bytes:
    return f"event: {event}\ndata: {json.dumps(data)}\n\n".encode()


def _image_event(size: str, b64: str) -> dict[str, Any]:
    """The fields OpenAI's partial_image / completed events carry (ours are PNG, opaque)."""
    return {"b64_json": b64, "created_at": int(time.time()), "size": size, "output_format": "png",
            "background": "opaque", "quality": "auto"}


def _size(plan: Plan, outcome: Outcome | None = None) -> str:
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
        job = self.service.submit(plan, _client(request, options))
        outcome = await self._wait(request, job)
        if outcome is None:
            return Response(status_code=499)  # the client left; nobody reads this
        url = options.response_format == "url"
        data = await asyncio.to_thread(self._encode, outcome, str(request.base_url) if url else None)
        return JSONResponse(ImagesResponse(
            created=int(time.time()), data=data, model=plan.spec.id, size=_size(plan, outcome),
            timings={k: round(v, 4) for k, v in outcome.timings.items()},
        ).model_dump(exclude_none=True))

    def _encode(self, outcome: Outcome, base_url: str | None) -> list[ImageData]:
        data = []
        for i, seed in enumerate(outcome.seeds):
            png = outcome.png(i)
            if base_url is None:
                data.append(ImageData(b64_json=base64.b64encode(png).decode(), seed=seed))
            else:
                image_id = self.service.store.put(png)
                data.append(ImageData(url=f"{base_url.rstrip('/')}/v1/files/images/{image_id}.png", seed=seed))
        return data

    async def _wait(self, request: Request, job: Job) -> Outcome | None:
        """The job's outcome; polls for a disconnect so an abandoned request leaves the queue."""
        future = asyncio.wrap_future(job.future)
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
        if error.status >= 500:  # a bug or a crash in a model: logged with its traceback, server stays up
            log.error("generation failed: %s", error.message, exc_info=e)
        return error

    def _stream(self, request: Request, plan: Plan, options: ImageOptions, kind: str) -> StreamingResponse:
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[Any] = asyncio.Queue()
        job = self.service.submit(plan, _client(request, options),
                                  lambda event: loop.call_soon_threadsafe(events.put_nowait, event))
        future = asyncio.wrap_future(job.future)
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
                    outcome: Outcome = future.result()
                except Exception as e:
                    error = self._failure(e)
                    yield _sse("error", error.body())
                    return
                size = _size(plan, outcome)
                for i, seed in enumerate(outcome.seeds):
                    b64 = base64.b64encode(await asyncio.to_thread(outcome.png, i)).decode()
                    yield _sse(f"{kind}.completed", {
                        "type": f"{kind}.completed", **_image_event(size, b64),
                        "image_index": i, "seed": seed, "model": plan.spec.id,
                        "usage": {"input_tokens": 0, "output_tokens": 0, "total_tokens": 0,
                                  "input_tokens_details": {"image_tokens": 0, "text_tokens": 0}},
                    })
            finally:
                if not future.done():
                    job.cancel()

        return StreamingResponse(stream(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    def _progress(self, kind: str, plan: Plan, event: dict[str, Any]) -> bytes:
        if event["stage"] == "partial":
            name = f"{kind}.partial_image"
            b64 = base64.b64encode(event["png"]).decode()
            return _sse(name, {"type": name, **_image_event(_size(plan), b64),
                               "partial_image_index": event["partial_image_index"],
                               "image_index": event["image_index"]})
        name = f"{kind}.progress"  # imagegen's own event: OpenAI has none for step progress
        return _sse(name, {"type": name, **event})


# ---- the app -------------------------------------------------------------------------------
def _card(spec: ModelSpec, loaded: bool, default: bool) -> ModelCard:
    w, h = spec.default_size
    return ModelCard(id=spec.id, owned_by=spec.plugin or "imagegen", aliases=list(spec.aliases),
                     description=spec.description, tasks=list(spec.tasks), default_size=f"{w}x{h}",
                     size_multiple=spec.size_multiple, max_pixels=spec.max_pixels, default_steps=spec.default_steps,
                     default_guidance=spec.default_guidance, default_dtype=spec.default_dtype,
                     options=sorted(o.name for o in OPTIONS if o.gated and spec.accepts(o.name)),
                     quantize_modes=list(spec.quantize_modes), loaded=loaded,
                     family_options=[OptionCard(name=o.name, kind=o.kind, help=o.help, minimum=o.minimum,
                                                maximum=o.maximum, choices=list(o.choices))
                                     for o in family_options(spec.extra_options) if "server" in o.fronts],
                     available=not spec.needs_weights or hub.weights_present(spec) is not None, default=default)


def _default_id(service: ImageService) -> str | None:
    """The model a request that names none gets (None when that name does not resolve)."""
    try:
        return registry.get(service.default_model()).id
    except ImagegenError:
        return None


def create_app(models: Sequence[str] = (), keep_alive: str | float | None = "5m", api_key: str | None = None,
               **limits: Any) -> FastAPI:
    """The server app. `models` are loaded at start (the first is the default); `keep_alive` ("5m",
    "30s", 0 = unload after each request, -1 = never) keeps idle models warm; `limits` are Limits fields."""
    settings = Limits.from_options(**limits)
    service = ImageService(settings, parse_duration(keep_alive), models)
    responder = Responder(service)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        service.start()
        try:
            yield
        finally:
            await asyncio.to_thread(service.stop)

    app = FastAPI(title="imagegen", version=__version__, lifespan=lifespan, responses=ERRORS,
                  description="OpenAI-compatible images API served by imagegen: generations, edits, models.")
    app.state.service = service
    app.add_middleware(Guard, api_key=api_key, max_body=settings.max_body_bytes)
    _install_error_handlers(app)

    @app.post("/v1/images/generations", response_model=ImagesResponse, tags=["images"],
              summary="Create images from a prompt (stream: true for server-sent events)")
    async def generations(body: GenerationRequest, request: Request) -> Response:
        plan = service.plan(body, TEXT_TO_IMAGE)
        return await responder.answer(request, plan, body, "image_generation")

    @app.post("/v1/images/edits", response_model=ImagesResponse, tags=["images"], openapi_extra=form_schema(),
              summary="Edit or combine images following a prompt (multipart/form-data)")
    async def edits(request: Request) -> Response:
        options, images, names, files = await _read_edit_form(request, settings)
        plan = service.plan(options, IMAGE_EDIT, images, names, files)
        return await responder.answer(request, plan, options, "image_edit")

    @app.get("/v1/files/images/{name}", tags=["images"], summary="An image made with response_format='url'",
             response_class=Response, responses={200: {"content": {"image/png": {}}}})
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

    @app.get("/health", tags=["server"], summary="Liveness, queue and resident models")
    async def health() -> dict[str, Any]:
        return service.health()

    return app


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def run_server(host: str = "127.0.0.1", port: int = 8000, models: Sequence[str] = (),
               keep_alive: str | float | None = "5m", api_key: str | None = None, log_level: str = "info",
               **limits: Any) -> None:
    """Serve until interrupted (Ctrl-C). The key falls back to $IMAGEGEN_API_KEY; bad settings raise
    ImagegenError before anything binds."""
    import uvicorn

    api_key = api_key or os.environ.get("IMAGEGEN_API_KEY") or None
    app = create_app(models, keep_alive, api_key, **limits)
    if not is_loopback(host) and not api_key:
        log.warning("imagegen serve: listening on %s without an API key; anyone who can reach it can use it", host)
    uvicorn.run(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=5)
