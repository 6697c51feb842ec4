"""The one weight-free request check: options (declared in imagegen.options) -> a final Request.

Python (`Pipeline.request`), the CLI, the server and batch all call :func:`build_request` (or its door
``ModelSpec.request``), so a value is refused the same way everywhere, before any weight is loaded.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from PIL import Image

from .errors import InvalidOptionError
from .img2img import InitImage, first_step, init_request, init_size
from .noise import Noise
from .options import (
    BY_NAME,
    SEED_MAX,
    Option,
    OptionError,
    UnsupportedOptionError,
    draw_seed,
    family_options,
)

if TYPE_CHECKING:
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
    other_options: dict[str, Any] = field(default_factory=dict)  # every other declared option given; use option()
    init: InitImage | None = None  # img2img / inpainting / outpainting: the picture, mask, strength, border
    noise: str = "mlx"  # "mlx" (imagegen's own) or "torch" (diffusers' draws for the seed)
    noise_slot: tuple[int, int] | None = None  # torch noise: (first, total) rows of a total-image call

    def option(self, name: str, default: Any = None) -> Any:
        """The value of any declared option (core or the family's), or `default` when it was not given."""
        if name in self.other_options:
            return self.other_options[name]
        if name in _INIT_FIELDS:
            value = getattr(self.init, _INIT_FIELDS[name]) if self.init is not None else None
            return default if value is None else value
        if name == "seed":  # per image fields: the first image's value
            return self.seeds[0]
        if name == "negative_prompt":
            return self.negative_prompts[0] if self.negative_prompts else default
        if name in _FIELDS and name != "other_options":
            value = getattr(self, name)
            return default if value is None else value
        return default

    @property
    def batch_size(self) -> int:
        return len(self.prompts)

    @property
    def first_step(self) -> int:
        """The first scheduled step that runs: 0, or later for img2img (strength < 1)."""
        return first_step(self.steps, self.init.strength) if self.init else 0

    @property
    def run_steps(self) -> int:
        return self.steps - self.first_step

    def draws(self) -> Noise:
        """A fresh source of this run's random draws (imagegen.noise)."""
        return Noise(self.noise, self.seeds, self.noise_slot)

    def part(self, first: int, count: int) -> Request:
        """Images first..first+count-1 as a request of their own (the server splits large n to fit memory)."""
        cut = slice(first, first + count)
        negatives = self.negative_prompts[cut] if self.negative_prompts else None
        latents = self.latents[cut] if self.latents is not None else None
        slot = self.noise_slot
        if self.noise == "torch":  # the rows of the whole call's draw
            start, total = slot or (0, self.batch_size)
            slot = (start + first, total)
        return replace(
            self,
            prompts=self.prompts[cut],
            seeds=self.seeds[cut],
            negative_prompts=negatives,
            latents=latents,
            num_images=count,
            noise_slot=slot,
        )


_FIELDS = {f.name for f in fields(Request)}
_INIT_FIELDS = {"init_image": "source", "mask": "mask_source", "strength": "strength", "outpaint": "outpaint"}


def declared(spec: ModelSpec) -> dict[str, Option]:
    """Every option a request for `spec` may name: the core ones, then the family's."""
    return {**BY_NAME, **{o.name: o for o in family_options(spec.extra_options)}}


def accepts(spec: ModelSpec, option: Option) -> bool:
    return not option.gated or option.name not in BY_NAME or spec.accepts(option.name)


def given(value: Any) -> bool:
    """None, False (a flag not set) and an empty list mean "not given": the model's default applies."""
    return not (value is None or value is False or (isinstance(value, list | tuple) and not value))


def check_options(spec: ModelSpec, options: dict[str, Any]) -> dict[str, Any]:
    """The given options, each checked against its declaration and the model."""
    known = declared(spec)
    unknown = sorted(k for k in options if k not in known)
    if unknown:
        raise InvalidOptionError(f"Model '{spec.id}' does not support the option(s): {', '.join(unknown)}.")
    values = {}
    for name, value in options.items():
        if not given(value):
            continue
        option = known[name]
        if not accepts(spec, option):
            raise UnsupportedOptionError(spec.id, name)
        values[name] = option.check(value)
    return values


def default_size(spec: ModelSpec, images: Sequence[Image.Image]) -> tuple[int, int]:
    """(width, height) when the caller gives none: the reference's (editing models that follow it) or the model's."""
    if images and spec.reference_size is not None:
        return spec.reference_size(images[0])
    return spec.default_size


def check_size(spec: ModelSpec, width: int, height: int) -> None:
    m = spec.size_multiple
    for name, value in (("width", width), ("height", height)):
        if not isinstance(value, int) or isinstance(value, bool) or value < m or value % m:
            raise InvalidOptionError(f"{name} must be a positive multiple of {m}, got {value}.")
    if width * height > spec.max_pixels:
        raise InvalidOptionError(f"{width}x{height} is larger than '{spec.id}' allows ({spec.max_pixels} pixels).")


def build_request(
    spec: ModelSpec,
    prompt: str | Sequence[str],
    size_for: Callable[[Sequence[Image.Image]], tuple[int, int]] | None = None,
    **options: Any,
) -> Request:
    """Check every option against its declaration and `spec`, and fill in the model's defaults. `size_for`
    overrides the default size (a pipeline's `default_size`)."""
    per_prompt = options.get("negative_prompt")
    if isinstance(per_prompt, list | tuple):  # Python may give one negative prompt per prompt
        options = {**options, "negative_prompt": per_prompt[0] if len(set(per_prompt)) == 1 else None}
    values = check_options(spec, options)
    prompts = [prompt] if isinstance(prompt, str) else list(prompt) if isinstance(prompt, Sequence) else []
    if not prompts or not all(isinstance(p, str) for p in prompts):
        raise InvalidOptionError("prompt must be a string or a non-empty list of strings.")
    num_images = values.pop("num_images", 1)
    images = values.pop("images", ())
    init = init_request(spec, values)
    width, height = values.pop("width", None), values.pop("height", None)
    if width is None or height is None:
        if init is not None:
            default_w, default_h = init_size(spec, init.image)
        else:
            default_w, default_h = (size_for or (lambda refs: default_size(spec, refs)))(images)
        width, height = width or default_w, height or default_h
    check_size(spec, width, height)
    negatives = values.pop("negative_prompt", None)
    if isinstance(per_prompt, list | tuple) and len(set(per_prompt)) > 1:
        if len(per_prompt) != len(prompts):
            raise InvalidOptionError("Give one negative prompt, or one per prompt.")
        negatives = [BY_NAME["negative_prompt"].check(n) for n in per_prompt]
        if not accepts(spec, BY_NAME["negative_prompt"]):
            raise UnsupportedOptionError(spec.id, "negative_prompt")
    elif negatives is not None:
        negatives = [negatives] * len(prompts)
    if negatives is not None:
        negatives = tuple(n for n in negatives for _ in range(num_images))
    count = len(prompts) * num_images
    seed = values.pop("seed", None)
    seed = draw_seed() if seed is None else seed
    noise, slot = values.pop("noise", "mlx"), values.pop("noise_slot", None)
    if slot is not None and (noise != "torch" or slot[0] + count > slot[1]):
        raise InvalidOptionError(
            "noise_slot replays images of a torch-noise call: (first, total) with first + count <= total."
        )
    if noise != "torch" and seed + count - 1 > SEED_MAX:
        raise OptionError("seed", f"<= {SEED_MAX - count + 1} for {count} images (image i uses seed + i)", seed)
    steps = values.pop("steps", spec.default_steps)
    if init is not None:
        first_step(steps, init.strength)  # refuses a strength that leaves no step
    guidance = values.pop("guidance", spec.default_guidance)
    return Request(
        prompts=tuple(p for p in prompts for _ in range(num_images)),
        width=width,
        height=height,
        steps=steps,
        guidance=guidance,
        # torch noise: one generator seeded once draws the whole call, as diffusers does
        seeds=(seed,) * count if noise == "torch" else tuple(seed + i for i in range(count)),
        negative_prompts=negatives,
        images=tuple(images),
        latents=values.pop("latents", None),
        tile=values.pop("tile", False),
        num_images=num_images,
        other_options=values,
        init=init,
        noise=noise,
        noise_slot=slot,
    )


# ---- PNG metadata and its replay (`imagegen run --from`) ---------------------------------------------
def metadata_entries(spec: ModelSpec, request: Request, index: int) -> dict[str, Any]:
    """The options of image `index` as PNG metadata: core ones at the top level, the family's under `options`,
    input images by file name with their sha256 under `inputs`."""
    entries: dict[str, Any] = {"options": {}, "inputs": {}}
    for option in declared(spec).values():
        if "metadata" not in option.fronts:
            continue
        value = request.option(option.name)
        if option.name == "seed":
            value = request.seeds[index]
        elif option.name == "noise_slot" and request.noise == "torch" and (value or request.batch_size > 1):
            # one generator drew the whole call: image i alone is row i of that draw
            start, total = value or (0, request.batch_size)
            value = (start + index, total)
        elif option.name == "negative_prompt":
            value = request.negative_prompts[index] if request.negative_prompts else None
        entries["inputs"].update(option.inputs(value))
        target = entries if option.name in BY_NAME else entries["options"]
        if option.name in BY_NAME or value is not None:
            target[option.name] = option.to_json(value)
    if entries.get("images") is None:
        entries["images"] = []
    return entries


def replayed(spec: ModelSpec, saved: dict[str, Any], folders: Sequence[Path]) -> dict[str, Any]:
    """The generate() options a PNG's metadata records, for `spec`. Core options the model does not take are
    left out (a PNG of another model); the family's must all be known. Input images are found by name in
    `folders` and must match their saved sha256."""
    known = declared(spec)
    family = saved.get("options") or {}
    unknown = sorted(set(family) - {o.name for o in family_options(spec.extra_options)})
    if unknown:
        raise UnsupportedOptionError(spec.id, unknown[0])
    values: dict[str, Any] = {}
    for option in known.values():
        source = saved if option.name in BY_NAME else family
        value = source.get(option.name)
        if "metadata" not in option.fronts or not given(value) or not accepts(spec, option):
            continue
        values[option.name] = option.from_json(value, saved.get("inputs") or {}, folders)
    return values
