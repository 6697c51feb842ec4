"""Registers the FLUX.2 Klein models (and the bundled demo model) with imagegen."""

from __future__ import annotations

from pathlib import Path

import imagegen
from imagegen.quantize import ALL_MODES

from .pipeline import Flux2Pipeline, checkpoint_settings, estimate_memory, reference_size

DEMO = Path(__file__).parent / "demo"
EDIT_OPTIONS = frozenset({"images", "latents", "tile"})
CFG_OPTIONS = EDIT_OPTIONS | {"guidance", "negative_prompt"}


def load(spec: imagegen.ModelSpec, weights: Path, **kwargs) -> Flux2Pipeline:
    return Flux2Pipeline(spec, weights, **kwargs)


def klein(size: str, base: bool) -> imagegen.ModelSpec:
    """One Klein variant: step-distilled (4 steps, no CFG) or base (50 steps, CFG with a negative prompt)."""
    kind = "base-" if base else ""
    return imagegen.ModelSpec(
        id=f"flux2-klein-{kind}{size.lower()}",
        family="flux2",
        aliases=() if base or size != "4B" else ("flux2-klein",),
        description=f"FLUX.2 Klein {size}{' base' if base else ''} (Black Forest Labs)",
        load=load,
        hf_repo=f"black-forest-labs/FLUX.2-klein-{kind}{size}",
        default_steps=50 if base else 4,  # diffusers' default / the distilled model's schedule
        default_guidance=4.0 if base else None,  # diffusers' guidance_scale default; ignored when distilled
        tasks=(imagegen.TEXT_TO_IMAGE, imagegen.IMAGE_EDIT),
        options=CFG_OPTIONS if base else EDIT_OPTIONS,
        reference_size=reference_size,
        quantize_modes=ALL_MODES,
        family_default=not base and size == "4B",
        estimate_memory=estimate_memory,
        extra={"distilled": not base, "sequence_parallel": True},
    )


def demo() -> imagegen.ModelSpec | None:
    """The small model trained in this repo (training/), shipped inside this package."""
    if not (DEMO / "model_index.json").is_file():
        return None
    settings = checkpoint_settings(DEMO)
    return imagegen.ModelSpec(
        id="flux2-demo",
        family="flux2",
        description="Tiny FLUX.2 Klein-architecture demo: coloured shapes on coloured backgrounds (bundled)",
        load=load,
        bundled_weights=DEMO,
        default_steps=settings.get("default_steps", 4),
        default_size=tuple(settings.get("default_size", (128, 128))),
        max_pixels=512 * 512,
        tasks=(imagegen.TEXT_TO_IMAGE, imagegen.IMAGE_EDIT),
        options=EDIT_OPTIONS,
        reference_size=reference_size,
        run_default=True,  # `imagegen run` works out of the box with the bundled weights
        default_dtype="float32",  # small enough; float32 keeps CPU runs exact and fast
        extra={"distilled": True, "sequence_parallel": True},
    )


@imagegen.hookimpl
def register_models(register):
    for size in ("4B", "9B"):
        register(klein(size, base=False))
        register(klein(size, base=True))
    spec = demo()
    if spec is not None:
        register(spec)
