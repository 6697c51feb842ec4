"""The pipeline contract every model family implements: validated requests, a visible step loop.

A family subclasses :class:`Pipeline` and fills in four stages; ``generate`` runs them in order:
1. ``encode(request)``             prompts (and reference images) -> conditioning
2. ``prepare_latents(request)``    seeded noise, or the caller's ``latents=``
3. ``denoise_steps(...)``          a generator yielding the latents after each step
4. ``decode(request, latents)``    latents -> PIL images
Pipelines are resident (weights stay loaded) and reusable; one lock serialises runs so threads
(the server) can share one safely.
"""

from __future__ import annotations

import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, fields, is_dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx
from PIL import Image

from .errors import InvalidOptionError
from .lora import LoraManager, TextPatch, qwen3_targets, text_adapters
from .noise import seeded_noise
from .registry import ModelSpec
from .request import Request, build_request, check_size, default_size
from .weights import to_dtype

__all__ = ["GenerationResult", "Pipeline", "Request", "Run", "Step", "check_size", "seeded_noise"]


@dataclass
class Step:
    """Progress of a run: stage is "encode", "denoise" or "decode"; index counts from 1."""

    stage: str
    index: int
    total: int
    seconds: float
    latents: mx.array | None = None


@dataclass
class GenerationResult:
    images: list[Image.Image]
    seeds: list[int]
    timings: dict[str, float]
    request: Request

    @property
    def seed(self) -> int:
        return self.seeds[0]


class Run:
    """Iterate it for :class:`Step` events; ``result`` is set once iteration has finished."""

    def __init__(self, steps: Iterator[Step], finish: Callable[[], GenerationResult]):
        self._steps, self._finish = steps, finish
        self.result: GenerationResult | None = None

    def __iter__(self) -> Iterator[Step]:
        yield from self._steps
        self.result = self._finish()


class Pipeline(ABC):
    """Base of every family pipeline. Subclasses implement the four stages."""

    def __init__(
        self,
        spec: ModelSpec,
        weights: Path | None = None,
        dtype: str = "bfloat16",
        quantize: str | None = None,
        on_load: Callable[[str, float], None] | None = None,
    ):
        self.spec, self.weights, self.dtype, self.quantize = spec, weights, dtype, quantize
        self.components: dict[str, str] = {}  # parts loaded from elsewhere than `weights` (e.g. "vae" -> its source)
        self._on_load = on_load
        self._lock = threading.Lock()
        self._loras: LoraManager | None = None

    @contextmanager
    def loading(self, component: str) -> Iterator[None]:
        """Wrap the load of one component: reports (name, seconds) to the caller's on_load."""
        start = time.perf_counter()
        yield
        if self._on_load is not None:
            self._on_load(component, time.perf_counter() - start)

    # ---- the four stages (families implement) -------------------------------------------
    @abstractmethod
    def encode(self, request: Request) -> Any: ...

    @abstractmethod
    def prepare_latents(self, request: Request) -> mx.array: ...

    @abstractmethod
    def denoise_steps(self, request: Request, conditioning: Any, latents: mx.array) -> Iterator[mx.array]: ...

    @abstractmethod
    def decode(self, request: Request, latents: mx.array) -> list[Image.Image]: ...

    def initial_latents(self, request: Request, shape: Sequence[int], layout: str = "") -> mx.array:
        """The caller's `latents=` (mx, numpy or torch; checked against `shape`) or seeded noise of that shape,
        float32. `layout` names the axes in the error message, e.g. "(B, C, H/8, W/8)"."""
        shape = tuple(shape)
        if request.latents is None:
            return request.draws().latents(shape, self.noise_dtype(request))
        latents = request.latents
        if hasattr(latents, "detach"):  # a torch tensor
            latents = latents.detach().float().cpu().numpy()
        latents = mx.array(latents) if not isinstance(latents, mx.array) else latents
        if tuple(latents.shape) != shape:
            raise InvalidOptionError(f"latents must have shape {shape} {layout}, got {tuple(latents.shape)}.".strip())
        return latents.astype(mx.float32)

    def weights_changed(self) -> None:  # noqa: B027  (optional hook, no-op by default)
        """Called after adapters replaced transformer layers: rebuild whatever captured the old weights (compiled
        graphs capture arrays as constants)."""

    def use_loras(self, request: Request) -> TextPatch | None:
        """Make the request's adapters (option `loras`) the active ones (a no-op when they already are); returns
        the text-encoder part, which applies only while this request's prompts are encoded."""
        loras = request.option("loras", ())
        if not loras and (self._loras is None or not self._loras.active):
            return None
        changed, text_patch = self.loras().use(loras, request.option("lora_partial", False))
        if changed:
            self.weights_changed()
        return text_patch

    def loras(self) -> LoraManager:
        """This pipeline's adapter manager (built on first use from the spec's key tables)."""
        if self._loras is None:
            if self.spec.lora_targets is None:
                raise InvalidOptionError(f"Model '{self.spec.id}' does not support LoRA adapters.")
            transformer = self.transformer  # families keep their denoiser here (docs/writing-a-plugin.md)
            components = {"transformer": (transformer, self.spec.lora_targets(transformer))}
            encoder = getattr(self, "text_encoder", None)
            if encoder is not None:
                components["text_encoder"] = (encoder.model, {"transformers": qwen3_targets(encoder.model)})
            self._loras = LoraManager(self.spec.id, components, to_dtype(self.dtype))
        return self._loras

    def noise_dtype(self, request: Request) -> str:
        """The dtype torch noise is drawn at: what the family's diffusers pipeline passes to randn_tensor."""
        return self.dtype

    def default_size(self, images: Sequence[Image.Image]) -> tuple[int, int]:
        """(width, height) when the caller gives none: the spec's `reference_size` of the first reference image,
        else its `default_size` (override only for sizes that need the loaded weights)."""
        return default_size(self.spec, images)

    # ---- the public API -----------------------------------------------------------------
    def generate(
        self, prompt: str | Sequence[str] | Request, *, on_step: Callable[[Step], None] | None = None, **options: Any
    ) -> GenerationResult:
        """Generate images. Options: width, height, steps, guidance, seed, negative_prompt, images,
        latents, num_images, tile and those in imagegen.options / the spec's extra_options; unsupported
        options raise InvalidOptionError. `prompt` may also be a Request built by ``spec.request``."""
        run = self.run(prompt, **options)
        for step in run:
            if on_step is not None:
                on_step(step)
        assert run.result is not None
        return run.result

    def run(self, prompt: str | Sequence[str] | Request, **options: Any) -> Run:
        """All four stages, like generate, but iterate the returned Run for per-step progress (and latents)."""
        if isinstance(prompt, Request) and options:
            raise InvalidOptionError("Give options either in the Request or as keywords, not both.")
        request = prompt if isinstance(prompt, Request) else self.request(prompt, **options)
        timings: dict[str, float] = {}
        images: list[Image.Image] = []

        def steps() -> Iterator[Step]:
            with self._lock:
                start = time.perf_counter()
                t = time.perf_counter()
                text_patch = self.use_loras(request)  # 0. this request's adapters (a no-op when unchanged)
                if request.option("loras"):
                    timings["loras"] = time.perf_counter() - t
                    t = time.perf_counter()
                with text_adapters(text_patch):
                    conditioning = self.encode(request)  # 1. encode prompt (and reference images)
                mx.eval(arrays(conditioning))  # MLX skips dataclasses: evaluate their arrays, so encode is timed here
                timings["encode"] = time.perf_counter() - t
                yield Step("encode", 1, 1, timings["encode"])

                t = time.perf_counter()
                latents = self.prepare_latents(request)  # 2. initial noise
                for i, step_latents in enumerate(self.denoise_steps(request, conditioning, latents), 1):  # 3.
                    latents = step_latents
                    mx.eval(latents)
                    now = time.perf_counter()
                    yield Step("denoise", i, request.run_steps, now - t, latents)
                    timings["denoise"] = timings.get("denoise", 0.0) + now - t
                    t = time.perf_counter()

                t = time.perf_counter()
                images.extend(self.decode(request, latents))  # 4. decode
                timings["decode"] = time.perf_counter() - t
                timings["total"] = time.perf_counter() - start
                yield Step("decode", 1, 1, timings["decode"])

        def finish() -> GenerationResult:
            return GenerationResult(images, list(request.seeds), timings, request)

        return Run(steps(), finish)

    def request(self, prompt: str | Sequence[str], **options: Any) -> Request:
        """Check options against this model and fill in its defaults (imagegen.request.build_request); LoRA files
        are mapped onto this model's layers here, so a file that does not fit fails before any work."""
        request = build_request(self.spec, prompt, size_for=self.default_size, **options)
        for lora in request.option("loras", ()):
            self.loras().plan(lora, request.option("lora_partial", False))
        return request


def arrays(tree: Any) -> list[mx.array]:
    """Every mx.array inside a value: dataclasses, lists, tuples and dicts are searched."""
    if isinstance(tree, mx.array):
        return [tree]
    if is_dataclass(tree) and not isinstance(tree, type):
        return [a for f in fields(tree) for a in arrays(getattr(tree, f.name))]
    if isinstance(tree, list | tuple):
        return [a for item in tree for a in arrays(item)]
    if isinstance(tree, dict):
        return [a for item in tree.values() for a in arrays(item)]
    return []
