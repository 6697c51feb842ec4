"""The image service: validate a request into a plan, run it on the device worker, report progress.

Everything here is framework-free; app.py only translates HTTP to plans and outcomes back to HTTP.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from PIL import Image

from .. import __version__, hub, memory, registry
from ..errors import ImagegenError
from ..image import generation_metadata, png_bytes
from ..pipeline import Pipeline, Step, check_size
from ..registry import IMAGE_EDIT, ModelSpec
from .errors import APIError
from .residency import Residency
from .schemas import ImageOptions, parse_size
from .settings import Limits
from .store import ImageStore
from .worker import DeviceWorker, Job

Emit = Callable[[dict[str, Any]], None]
log = logging.getLogger("imagegen.server")


@dataclass(frozen=True)
class Plan:
    """A validated request: everything the device needs, defaults still left to the model."""

    spec: ModelSpec
    prompt: str
    n: int
    width: int | None
    height: int | None
    seed: int
    steps: int | None = None
    guidance: float | None = None
    negative_prompt: str | None = None
    quantize: str | None = None
    images: tuple[Image.Image, ...] = ()
    partial_images: int = 0
    image_names: tuple[str, ...] = ()


@dataclass
class Outcome:
    images: list[Image.Image]
    seeds: list[int]
    width: int
    height: int
    steps: int
    guidance: float | None
    metadata: dict[str, Any] = field(default_factory=dict)  # shared by every image; each adds its seed
    timings: dict[str, float] = field(default_factory=dict)

    def png(self, i: int) -> bytes:
        return png_bytes(self.images[i], {**self.metadata, "seed": self.seeds[i]})


def _partial_steps(total: int, count: int) -> set[int]:
    """Denoising steps after which a preview is streamed: evenly spaced, never the last one."""
    return {round(total * (k + 1) / (count + 1)) for k in range(count)} - {0, total}


class ImageService:
    """Owns the residency, the device worker and the URL image store."""

    def __init__(self, limits: Limits, keep_alive: float | None, models: Sequence[str] = ()):
        self.limits = limits
        specs = [registry.get(m) for m in models]  # unknown names and missing weights fail at start
        for spec in specs:
            hub.resolve_weights(spec)
        self.models = [s.id for s in specs]
        budget = limits.max_memory if limits.max_memory is not None else memory.available_memory()
        self.residency = Residency(keep_alive, budget)
        self.worker = DeviceWorker(limits.max_queue, between=self.residency.expire)  # unloads on the device thread
        self.store = ImageStore(limits.url_ttl, limits.max_stored_bytes)
        self.started = time.time()

    def start(self) -> None:
        """Start the worker and queue the preloads, so the first request finds its model warm."""
        self.worker.start()
        for model in self.models:
            spec = registry.get(model)
            self.worker.submit("preload", lambda job, spec=spec: self._warm(spec), limit=False)

    def stop(self) -> None:
        self.worker.stop()
        self.residency.unload_all()

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

    def plan(self, options: ImageOptions, task: str, images: Sequence[Image.Image] = (),
             image_names: Sequence[str] = ()) -> Plan:
        """Check everything that can be checked before the request waits in the queue."""
        spec = registry.get(options.model or self.default_model())
        if task not in spec.tasks:
            able = [s.id for s in registry.all_specs() if task in s.tasks]
            what = "image edits" if task == IMAGE_EDIT else "text-to-image generation"
            raise APIError(400, f"Model '{spec.id}' does not support {what}. Models that do: "
                           f"{', '.join(able) or 'none installed'}.", param="model", code="model_not_supported")
        n = options.n or 1
        if n > self.limits.max_n:
            raise APIError(400, f"n must be at most {self.limits.max_n}, got {n}.", param="n", code="invalid_value")
        width, height = _checked(lambda: parse_size(options.size), "size")
        if width is not None and height is not None:
            _checked(lambda: check_size(spec, width, height), "size")
        if options.steps is not None and options.steps > self.limits.max_steps:
            raise APIError(400, f"steps must be at most {self.limits.max_steps}, got {options.steps}.",
                           param="steps", code="invalid_value")
        for name in ("guidance", "negative_prompt"):
            if getattr(options, name) is not None and not spec.accepts(name):
                raise APIError(400, f"Model '{spec.id}' does not support the option '{name}'.", param=name,
                               code="unsupported_option")
        if task == IMAGE_EDIT and not images:
            raise APIError(400, "Give at least one image to edit (multipart field 'image' or 'image[]').",
                           param="image", code="missing_image")
        if len(images) > self.limits.max_images_in:
            raise APIError(400, f"At most {self.limits.max_images_in} images per request, got {len(images)}.",
                           param="image", code="invalid_value")
        return Plan(
            spec=spec, prompt=options.prompt, n=n, width=width, height=height,
            seed=options.seed if options.seed is not None else random.randrange(2**31),
            steps=options.steps, guidance=options.guidance, negative_prompt=options.negative_prompt,
            quantize=_checked(lambda: _quantize(spec, options.quantize), "quantize"),
            images=tuple(images), partial_images=(options.partial_images or 0) if options.stream else 0,
            image_names=tuple(image_names),
        )

    # ---- running -------------------------------------------------------------------------
    def submit(self, plan: Plan, client: str, emit: Emit | None = None) -> Job:
        """Queue the plan for the device; the job's future resolves to an Outcome."""
        return self.worker.submit(client, lambda job: self._run(plan, job, emit or (lambda event: None)))

    def _run(self, plan: Plan, job: Job, emit: Emit) -> Outcome:
        """On the device worker: load if needed, then generate in batches that fit memory."""
        job.check()
        spec = plan.spec
        with self.residency.use(spec, plan.quantize, on_load=lambda m: emit({"stage": "load", "model": m})) as pipe:
            width, height = plan.width, plan.height
            if width is None or height is None:
                width, height = pipe.default_size(plan.images)
            batch = self.residency.fit_batch(spec, plan.quantize, width, height, plan.n, self.limits.max_batch)
            images: list[Image.Image] = []
            timings: dict[str, float] = {}
            for first in range(0, plan.n, batch):
                count = min(batch, plan.n - first)
                options = _options(plan, width, height, plan.seed + first, count)
                result = pipe.generate(plan.prompt, on_step=self._on_step(pipe, plan, job, emit, options, first),
                                       **options)
                images.extend(result.images)
                for stage, seconds in result.timings.items():
                    timings[stage] = timings.get(stage, 0.0) + seconds
            request = result.request
            return Outcome(images, [plan.seed + i for i in range(plan.n)], request.width, request.height,
                           request.steps, request.guidance, self._metadata(plan, pipe, result, timings), timings)

    def _on_step(self, pipe: Pipeline, plan: Plan, job: Job, emit: Emit, options: dict[str, Any],
                 first: int) -> Callable[[Step], None]:
        count = options["num_images"]
        previews: set[int] = set()
        request = None
        if plan.partial_images:
            request = pipe.request(plan.prompt, **options)  # the same request generate() builds: the seeds are fixed
            previews = _partial_steps(request.steps, plan.partial_images)
        sent = 0

        def on_step(step: Step) -> None:
            nonlocal sent
            job.check()  # a cancelled request stops here and frees the device
            emit({"stage": step.stage, "step": step.index, "total": step.total, "first_image": first,
                  "images": count, "seconds": round(step.seconds, 4)})
            if step.stage == "denoise" and step.index in previews and step.latents is not None:
                for i, preview in enumerate(pipe.decode(request, step.latents)):
                    emit({"stage": "partial", "image_index": first + i, "partial_image_index": sent,
                          "png": png_bytes(preview)})
                sent += 1

        return on_step

    def _metadata(self, plan: Plan, pipe: Pipeline, result: Any, timings: dict[str, float]) -> dict[str, Any]:
        """What `imagegen run` writes into its PNGs, so `imagegen run --from` reproduces a served image; each
        image adds its own seed (Outcome.png)."""
        return generation_metadata(pipe, result, 0, image_names=plan.image_names, source="imagegen serve",
                                   timings={k: round(v, 4) for k, v in timings.items()})

    # ---- reporting -----------------------------------------------------------------------
    def health(self) -> dict[str, Any]:
        return {
            "status": "ok", "version": __version__, "uptime_seconds": round(time.time() - self.started, 1),
            "queue": {"waiting": len(self.worker.queue), "running": self.worker.running is not None,
                      "max": self.limits.max_queue, **self.worker.counts},
            "memory": {"budget_bytes": self.residency.budget, "resident_bytes": self.residency.used()},
            "keep_alive_seconds": self.residency.keep_alive,
            "loaded": self.residency.snapshot(),
        }


def _options(plan: Plan, width: int, height: int, seed: int, count: int) -> dict[str, Any]:
    options: dict[str, Any] = {"width": width, "height": height, "seed": seed, "num_images": count}
    optional = {"steps": plan.steps, "guidance": plan.guidance, "negative_prompt": plan.negative_prompt,
                "images": list(plan.images) or None}
    options.update({k: v for k, v in optional.items() if v is not None})
    return options


def _quantize(spec: ModelSpec, mode: str | None) -> str | None:
    if mode is None or mode.strip().lower() in ("", "none"):
        return None
    return spec.check_quantize(mode)


def _checked(check: Callable[[], Any], param: str) -> Any:
    """Run a library check; its ImagegenError becomes a 400 naming the request field."""
    try:
        return check()
    except ImagegenError as e:
        raise APIError(400, str(e), param=param, code="invalid_value") from None
