"""The image service: validate a request into a plan, run it on the device worker, report progress.

Everything here is framework-free; app.py only translates HTTP to plans and outcomes back to HTTP.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from .. import __version__, hub, memory, ranks, registry
from ..errors import ImagegenError, InvalidOptionError
from ..image import generation_metadata, png_bytes
from ..options import OPTIONS, OptionError, UnsupportedOptionError, family_options, image_input
from ..pipeline import Pipeline, Request, Step, check_size
from ..registry import IMAGE_EDIT, ModelSpec
from .errors import APIError
from .loras import LoraFolder
from .residency import Residency
from .schemas import FIELDS, ImageOptions, parse_size
from .settings import Limits
from .store import ImageStore
from .worker import DeviceWorker, Job

Emit = Callable[[dict[str, Any]], None]
log = logging.getLogger("imagegen.server")


@dataclass(frozen=True)
class Plan:
    """A validated request: everything the device needs (the shared request check has run)."""

    spec: ModelSpec
    request: Request  # all n images; the device runs it in parts that fit memory
    quantize: str | None = None
    partial_images: int = 0

    @property
    def n(self) -> int:
        return self.request.batch_size

    @property
    def width(self) -> int:
        return self.request.width

    @property
    def height(self) -> int:
        return self.request.height


@dataclass
class JobResult:
    images: list[Image.Image]
    seeds: list[int]
    width: int
    height: int
    steps: int
    guidance: float | None
    metadata: dict[str, Any] = field(default_factory=dict)  # shared by every image; each adds its seed
    timings: dict[str, float] = field(default_factory=dict)
    slots: list[list[int]] | None = None  # torch noise, n > 1: image i is row i of the call's draw

    def png(self, i: int) -> bytes:
        own = {"seed": self.seeds[i], **({"noise_slot": self.slots[i]} if self.slots else {})}
        return png_bytes(self.images[i], {**self.metadata, **own})


def _partial_steps(total: int, count: int) -> set[int]:
    """Denoising steps after which a preview is streamed: evenly spaced, never the last one."""
    return {round(total * (k + 1) / (count + 1)) for k in range(count)} - {0, total}


class ImageService:
    """Owns the residency, the device worker and the URL image store."""

    def __init__(
        self,
        limits: Limits,
        keep_alive: float | None,
        models: Sequence[str] = (),
        lora_dir: str | Path | None = None,
        controlnet: str | None = None,
    ):
        self.limits = limits
        self.loras = LoraFolder(lora_dir)
        specs = [registry.get(m) for m in models]  # unknown names and missing weights fail at start
        for spec in specs:
            hub.resolve_weights(spec)
        self.models = [s.id for s in specs]
        components = {"controlnet": controlnet} if controlnet is not None else {}
        if controlnet is not None:  # a missing folder, or models none of which take it, fail at start
            hub.resolve_component(controlnet, "--controlnet")
            if specs and not any("controlnet" in s.components for s in specs):
                raise InvalidOptionError(
                    f"--controlnet: none of the served models ({', '.join(self.models)}) takes a ControlNet."
                )
        budget = limits.max_memory if limits.max_memory is not None else memory.available_memory()
        self.residency = Residency(keep_alive, budget, strict=limits.max_memory is not None, components=components)
        for spec in specs:
            self.residency.check_fits(spec)
        self.worker = DeviceWorker(
            limits.max_queue,
            between=self._housekeeping,  # unloads on the device thread
            max_per_client=limits.max_queue_per_client,
        )
        self.store = ImageStore(limits.url_ttl, limits.max_stored_bytes)
        self.started = time.time()

    def start(self) -> None:
        """Start the worker and queue the preloads, so the first request finds its model warm."""
        self.worker.start()
        for model in self.models:
            spec = registry.get(model)
            self.worker.submit("preload", lambda job, spec=spec: self._warm(spec), limit=False)

    def drain(self, grace: float) -> None:
        """Shutting down: no new requests; those in flight finish within `grace` seconds or end with a 503."""
        self.worker.drain(grace)

    def stop(self) -> None:
        self.worker.stop()
        self.residency.unload_all()

    def _housekeeping(self) -> None:
        self.residency.expire()
        leader = ranks.leader()
        if leader is not None:  # the other ranks (serve --gpus N) free what rank 0 unloaded
            leader.sync()

    def _warm(self, spec: ModelSpec) -> None:
        try:
            with self.residency.use(spec):
                pass
        except Exception as e:  # the server still runs; requests for this model will report the error
            log.error("could not preload %s: %s: %s", spec.id, type(e).__name__, e)

    # ---- validation ----------------------------------------------------------------------
    def default_model(self) -> str:
        name = self.models[0] if self.models else registry.default_model()
        if name is None:
            raise APIError(400, "No model given and none installed.", param="model", code="model_not_found")
        return name

    def plan(
        self,
        options: ImageOptions,
        task: str,
        images: Sequence[Image.Image] = (),
        files: dict[str, list[Image.Image]] | None = None,
    ) -> Plan:
        """Check everything that can be checked before the request waits in the queue. `images` and `files`
        (uploads of declared image options by field name, one each unless the option is repeatable) carry
        their file name and sha256 (imagegen.options.image_input), which the metadata records."""
        spec = registry.get(options.model or self.default_model())
        if ranks.leader() is not None and not spec.extra.get("sequence_parallel"):
            raise APIError(
                400,
                f"Model '{spec.id}' cannot spread one image over several GPUs, as this server does (serve --gpus).",
                param="model",
                code="model_not_supported",
            )
        if task not in spec.tasks:
            able = [s.id for s in registry.all_specs() if task in s.tasks]
            what = "image edits" if task == IMAGE_EDIT else "text-to-image generation"
            raise APIError(
                400,
                f"Model '{spec.id}' does not support {what}. Models that do: {', '.join(able) or 'none installed'}.",
                param="model",
                code="model_not_supported",
            )
        for name in ("prompt", "negative_prompt"):
            text = getattr(options, name)
            if text is not None and len(text) > self.limits.max_prompt_chars:
                raise APIError(
                    400,
                    f"{name} is {len(text)} characters long; this server takes at most "
                    f"{self.limits.max_prompt_chars} (models read about 512 tokens of it).",
                    param=name,
                    code="prompt_too_long",
                )
        n = options.n or 1
        if n > self.limits.max_n:
            raise APIError(400, f"n must be at most {self.limits.max_n}, got {n}.", param="n", code="invalid_value")
        width, height = _checked(lambda: parse_size(options.size), "size")
        if width is not None and height is not None:
            _checked(lambda: check_size(spec, width, height), "size")
        if options.steps is not None and options.steps > self.limits.max_steps:
            raise APIError(
                400,
                f"steps must be at most {self.limits.max_steps}, got {options.steps}.",
                param="steps",
                code="invalid_value",
            )
        family_files = {o.name: o for o in family_options(spec.extra_options) if o.name in (files or {})}
        if task == IMAGE_EDIT and not images and not family_files:  # a control image alone steers a new picture
            raise APIError(
                400,
                "Give at least one image to edit (multipart field 'image' or 'image[]').",
                param="image",
                code="missing_image",
            )
        if len(images) > self.limits.max_images_in:
            raise APIError(
                400,
                f"At most {self.limits.max_images_in} images per request, got {len(images)}.",
                param="image",
                code="invalid_value",
            )
        family = options.options or {}
        declared = {o.name: o for o in family_options(spec.extra_options)}
        unknown = sorted(set(family) - set(declared))
        if unknown:
            raise APIError(
                400,
                f"Model '{spec.id}' does not support the option '{unknown[0]}'.",
                param="options",
                code="unsupported_option",
            )
        paths = sorted(n for n in family if declared[n].kind in ("file", "image"))
        if paths:  # a client must not name files on the server
            raise APIError(
                400,
                f"The option '{paths[0]}' takes a file, which cannot be given over HTTP.",
                param="options",
                code="unsupported_option",
            )
        values = {o.name: getattr(options, o.name) for o in FIELDS}
        values["loras"] = self.loras.resolve(options.loras)
        unknown = sorted(set(files or {}) - {o.name for o in OPTIONS} - set(family_files))
        if unknown:  # another model's image option
            raise APIError(
                400,
                f"Model '{spec.id}' does not support the option '{unknown[0]}'.",
                param=unknown[0],
                code="unsupported_option",
            )
        for option in (o for o in [*OPTIONS, *family_files.values()] if o.name in (files or {})):
            uploaded = files[option.name]
            if len(uploaded) > 1 and not option.repeatable:
                raise APIError(400, f"Give one '{option.name}' file.", param=option.name, code="invalid_value")
            values[option.name] = uploaded if option.repeatable else uploaded[0]
        images = [image_input(i) for i in images]  # uploads are recorded by base name and sha256, never as a path
        if task == IMAGE_EDIT and images and repaints(spec, values):  # img2img / inpainting: the first is repainted
            values["init_image"], images = images[0], images[1:]
        with request_errors():
            request = spec.request(
                options.prompt, width=width, height=height, num_images=n, images=list(images), **values, **family
            )
        return Plan(
            spec=spec,
            request=request,
            quantize=_checked(lambda: _quantize(spec, options.quantize), "quantize"),
            partial_images=(options.partial_images or 0) if options.stream else 0,
        )

    # ---- running -------------------------------------------------------------------------
    def submit(self, plan: Plan, client: str, user: str = "", emit: Emit | None = None) -> Job:
        """Queue the plan for the device (in `client`'s line, `user`'s turn); the job's future resolves to
        a JobResult."""
        return self.worker.submit(client, lambda job: self._run(plan, job, emit or (lambda event: None)), user=user)

    def _run(self, plan: Plan, job: Job, emit: Emit) -> JobResult:
        """On the device worker: load if needed, then generate in parts that fit memory. A client that left
        stops the job before the load, after it, and before each part's encoding."""
        job.check()
        spec, request = plan.spec, plan.request

        def on_load(model: str) -> None:
            job.check()
            emit({"stage": "load", "model": model})

        with self.residency.use(spec, plan.quantize, on_load=on_load) as pipe:
            job.check()  # the load can take long
            batch = self.residency.fit_batch(
                spec, plan.quantize, request.width, request.height, plan.n, self.limits.max_batch
            )
            images: list[Image.Image] = []
            timings: dict[str, float] = {}
            for first in range(0, plan.n, batch):
                job.check()
                part = request.part(first, min(batch, plan.n - first))
                result = pipe.generate(part, on_step=self._on_step(pipe, plan, part, job, emit, first))
                images.extend(result.images)
                for stage, seconds in result.timings.items():
                    timings[stage] = timings.get(stage, 0.0) + seconds
            metadata = generation_metadata(
                pipe, result, 0, source="imagegen serve", timings={k: round(v, 4) for k, v in timings.items()}
            )
            slots = [[i, plan.n] for i in range(plan.n)] if request.noise == "torch" and plan.n > 1 else None
            return JobResult(
                images,
                list(request.seeds),
                request.width,
                request.height,
                request.steps,
                request.guidance,
                metadata,
                timings,
                slots,
            )

    def _on_step(
        self, pipe: Pipeline, plan: Plan, part: Request, job: Job, emit: Emit, first: int
    ) -> Callable[[Step], None]:
        previews = _partial_steps(part.run_steps, plan.partial_images) if plan.partial_images else set()
        sent = 0

        def on_step(step: Step) -> None:
            nonlocal sent
            job.check()  # a cancelled request stops here and frees the device
            emit(
                {
                    "stage": step.stage,
                    "step": step.index,
                    "total": step.total,
                    "first_image": first,
                    "images": part.batch_size,
                    "seconds": round(step.seconds, 4),
                }
            )
            if step.stage == "denoise" and step.index in previews and step.latents is not None:
                for i, preview in enumerate(pipe.decode(part, step.latents)):
                    # the PIL image: the stream encodes it on a thread while the device goes on denoising
                    emit({"stage": "partial", "image_index": first + i, "partial_image_index": sent, "image": preview})
                sent += 1

        return on_step

    # ---- reporting -----------------------------------------------------------------------
    def health(self) -> dict[str, Any]:
        return {
            "status": "shutting_down" if self.worker.draining else "ok",
            "version": __version__,
            "uptime_seconds": round(time.time() - self.started, 1),
            "queue": {
                "waiting": len(self.worker.queue),
                "running": self.worker.running is not None,
                "max": self.limits.max_queue,
                **self.worker.counts,
            },
            "memory": {"budget_bytes": self.residency.budget, "resident_bytes": self.residency.used()},
            "keep_alive_seconds": self.residency.keep_alive,
            "loaded": self.residency.snapshot(),
        }


def repaints(spec: ModelSpec, values: dict[str, Any]) -> bool:
    """Whether an edit repaints its first image: with a mask, a strength or an outpaint border, or always for
    models that take an init image but no reference images (Z-Image)."""
    asked = any(values.get(name) is not None for name in ("mask", "strength", "outpaint"))
    return asked or (spec.accepts("init_image") and not spec.accepts("images"))


def _quantize(spec: ModelSpec, mode: str | None) -> str | None:
    if mode is None or mode.strip().lower() in ("", "none"):
        return None
    return spec.check_quantize(mode)


@contextmanager
def request_errors() -> Iterator[None]:
    """The shared request check's errors as 400s naming the JSON field."""
    try:
        yield
    except UnsupportedOptionError as e:
        raise APIError(400, str(e), param=e.name, code="unsupported_option") from None
    except OptionError as e:
        raise APIError(400, str(e), param=e.name, code="invalid_value") from None
    except ImagegenError as e:
        raise APIError(400, str(e), code="invalid_value") from None


def _checked(check: Callable[[], Any], param: str) -> Any:
    """Run a library check; its ImagegenError becomes a 400 naming the request field."""
    try:
        return check()
    except ImagegenError as e:
        raise APIError(400, str(e), param=param, code="invalid_value") from None
