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

import random
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlx.core as mx
from PIL import Image

from .errors import InvalidOptionError
from .image import load_image
from .img2img import InitImage, check_strength, first_step, open_image, outpaint, parse_outpaint
from .noise import Noise, check_noise
from .registry import ModelSpec


@dataclass(frozen=True)
class Request:
    """One validated generation request; every field is final (defaults applied)."""

    prompts: tuple[str, ...]  # one per image: each prompt repeated num_images times
    width: int
    height: int
    steps: int
    guidance: float | None
    seeds: tuple[int, ...]  # one per image
    negative_prompts: tuple[str, ...] | None = None
    images: tuple[Image.Image, ...] = ()
    latents: Any = None
    tile: bool = False
    num_images: int = 1
    extra: dict[str, Any] = field(default_factory=dict)  # family-specific options the spec declares
    init: InitImage | None = None  # img2img / inpainting: the starting picture, its mask, the strength
    noise: str = "mlx"  # "mlx" (imagegen's own) or "torch" (diffusers' draws for the seed)
    noise_slot: tuple[int, int] | None = None  # torch noise: replay image i of an n-image call alone

    @property
    def first_step(self) -> int:
        """The first scheduled step that runs: 0, or later for img2img (strength < 1)."""
        return first_step(self.steps, self.init.strength) if self.init else 0

    @property
    def run_steps(self) -> int:
        return self.steps - self.first_step

    def draws(self) -> Noise:
        """A fresh source of this run's random draws."""
        return Noise(self.noise, self.seeds, self.noise_slot)

    def option(self, name: str, default: Any = None) -> Any:
        return self.extra.get(name, default)

    @property
    def batch_size(self) -> int:
        return len(self.prompts)


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
    model: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

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

    def __init__(self, spec: ModelSpec, weights: Path | None = None, dtype: str = "bfloat16",
                 quantize: str | None = None, on_load: Callable[[str, float], None] | None = None):
        self.spec, self.weights, self.dtype, self.quantize = spec, weights, dtype, quantize
        self._on_load = on_load
        self._lock = threading.Lock()

    @contextmanager
    def loading(self, component: str) -> Iterator[None]:
        """Wrap the load of one component: reports (name, seconds) to the caller's on_load."""
        start = time.perf_counter()
        yield
        if self._on_load is not None:
            self._on_load(component, time.perf_counter() - start)

    # ---- the four stages (families implement) -------------------------------------------
    @abstractmethod
    def encode(self, request: Request) -> Any:
        ...

    @abstractmethod
    def prepare_latents(self, request: Request) -> mx.array:
        ...

    @abstractmethod
    def denoise_steps(self, request: Request, conditioning: Any, latents: mx.array) -> Iterator[mx.array]:
        ...

    @abstractmethod
    def decode(self, request: Request, latents: mx.array) -> list[Image.Image]:
        ...

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

    def default_size(self, images: Sequence[Image.Image]) -> tuple[int, int]:
        """(width, height) when the caller gives none; editing models may follow the input image."""
        return self.spec.default_size

    def noise_dtype(self, request: Request) -> str:
        """The dtype torch noise is drawn at: what the family's diffusers pipeline passes to randn_tensor."""
        return self.dtype

    def default_strength(self, masked: bool) -> float:
        """img2img / inpainting strength when the caller gives none: the family's diffusers default."""
        return 1.0

    def init_size(self, image: Image.Image) -> tuple[int, int]:
        """(width, height) of the output when an init image is given without a size: its own, rounded down."""
        m = self.spec.size_multiple
        return image.width // m * m, image.height // m * m

    # ---- the public API -----------------------------------------------------------------
    def generate(self, prompt: str | Sequence[str], *, on_step: Callable[[Step], None] | None = None,
                 **options: Any) -> GenerationResult:
        """Generate images. Options: width, height, steps, guidance, seed, negative_prompt, images,
        latents, num_images, tile, init_image, strength, mask, outpaint, noise. Unsupported options raise
        InvalidOptionError."""
        run = self.denoise(prompt, **options)
        for step in run:
            if on_step is not None:
                on_step(step)
        assert run.result is not None
        return run.result

    def denoise(self, prompt: str | Sequence[str], **options: Any) -> Run:
        """Like generate, but iterate the returned Run for per-step progress (and latents)."""
        request = self.request(prompt, **options)
        timings: dict[str, float] = {}
        images: list[Image.Image] = []

        def steps() -> Iterator[Step]:
            with self._lock:
                start = time.perf_counter()
                t = time.perf_counter()
                conditioning = self.encode(request)  # 1. encode prompt (and reference images)
                mx.eval(conditioning)
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
            return GenerationResult(images, list(request.seeds), timings, request, self.spec.id)

        return Run(steps(), finish)

    def request(self, prompt: str | Sequence[str], *, width: int | None = None, height: int | None = None,
                steps: int | None = None, guidance: float | None = None, seed: int | None = None,
                negative_prompt: str | Sequence[str] | None = None, images: Sequence[Any] | None = None,
                latents: Any = None, num_images: int = 1, tile: bool = False, init_image: Any = None,
                strength: float | None = None, mask: Any = None, outpaint: Any = None, noise: str = "mlx",
                noise_slot: tuple[int, int] | None = None, **unknown: Any) -> Request:
        """Check options against this model and fill in its defaults."""
        spec = self.spec
        foreign = sorted(k for k in unknown if k not in spec.extra_options)
        if foreign:
            raise InvalidOptionError(f"Model '{spec.id}' does not support the option(s): {', '.join(foreign)}.")
        extra = {k: spec.extra_options[k](v) for k, v in unknown.items() if v is not None}
        given = {"guidance": guidance is not None, "negative_prompt": negative_prompt is not None,
                 "images": bool(images), "latents": latents is not None, "tile": bool(tile),
                 "init_image": init_image is not None}
        for option, used in given.items():
            if used and not spec.accepts(option):
                raise InvalidOptionError(f"Model '{spec.id}' does not support the option '{option}'.")
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if not prompts or not all(isinstance(p, str) for p in prompts):
            raise InvalidOptionError("prompt must be a string or a non-empty list of strings.")
        if not isinstance(num_images, int) or num_images < 1:
            raise InvalidOptionError(f"num_images must be >= 1, got {num_images}.")
        loaded = tuple(load_image(i) for i in images or ())
        init = self.init_image(init_image, strength, mask, outpaint)
        noise = check_noise(noise)
        if width is None or height is None:
            default_w, default_h = self.init_size(init.image) if init else self.default_size(loaded)
            width, height = width or default_w, height or default_h
        check_size(spec, width, height)
        steps = spec.default_steps if steps is None else steps
        if not isinstance(steps, int) or steps < 1:
            raise InvalidOptionError(f"steps must be a positive integer, got {steps}.")
        if guidance is None:
            guidance = spec.default_guidance
        elif guidance < 0:
            raise InvalidOptionError(f"guidance must be >= 0, got {guidance}.")
        negatives = None
        if negative_prompt is not None:
            negatives = [negative_prompt] if isinstance(negative_prompt, str) else list(negative_prompt)
            if len(negatives) not in (1, len(prompts)):
                raise InvalidOptionError("Give one negative prompt, or one per prompt.")
            negatives = negatives * len(prompts) if len(negatives) == 1 else negatives
            negatives = tuple(n for n in negatives for _ in range(num_images))
        if seed is None:
            seed = random.randrange(2**31)
        if not isinstance(seed, int) or seed < 0:
            raise InvalidOptionError(f"seed must be a non-negative integer, got {seed}.")
        if init is not None:
            first_step(steps, init.strength)  # refuses a strength that leaves no step
        count = len(prompts) * num_images
        if noise_slot is not None and (noise != "torch" or count != 1 or not 0 <= noise_slot[0] < noise_slot[1]):
            raise InvalidOptionError("noise_slot=(i, n) replays one image of an n-image torch-noise call.")
        return Request(
            prompts=tuple(p for p in prompts for _ in range(num_images)),
            width=width, height=height, steps=steps, guidance=guidance,
            # torch noise: one generator seeded once draws the whole call, as diffusers does
            seeds=(seed,) * count if noise == "torch" else tuple(seed + i for i in range(count)),
            negative_prompts=negatives,
            images=loaded, latents=latents, tile=bool(tile), num_images=num_images, extra=extra,
            init=init, noise=noise, noise_slot=tuple(noise_slot) if noise_slot else None,
        )

    def init_image(self, image: Any, strength: float | None, mask: Any, pads: Any) -> InitImage | None:
        """The checked img2img / inpainting inputs; outpaint pads the image and masks the new border."""
        if image is None:
            if mask is not None or strength is not None or pads is not None:
                given = "mask" if mask is not None else "strength" if strength is not None else "outpaint"
                raise InvalidOptionError(f"{given} needs an init image (init_image=).")
            return None
        picture = open_image(image, "init image").convert("RGB")
        shape = open_image(mask, "mask") if mask is not None else None
        if pads is not None:
            if shape is not None:
                raise InvalidOptionError("Give either a mask or outpaint, not both.")
            picture, shape = outpaint(picture, parse_outpaint(pads))
            strength = 1.0 if strength is None else strength  # the new border starts from pure noise
        strength = self.default_strength(shape is not None) if strength is None else check_strength(strength)
        return InitImage(picture, shape, strength)


def check_size(spec: ModelSpec, width: int, height: int) -> None:
    m = spec.size_multiple
    for name, value in (("width", width), ("height", height)):
        if not isinstance(value, int) or value < m or value % m:
            raise InvalidOptionError(f"{name} must be a positive multiple of {m}, got {value}.")
    if width * height > spec.max_pixels:
        raise InvalidOptionError(
            f"{width}x{height} is larger than '{spec.id}' allows ({spec.max_pixels} pixels)."
        )
