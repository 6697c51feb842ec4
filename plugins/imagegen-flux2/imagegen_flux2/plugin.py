"""Registers the FLUX.2 Klein models (and the bundled demo model) with imagegen."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import imagegen
from imagegen.quantize import ALL_MODES, FP8

from .kv_pipeline import Flux2KVPipeline
from .lora import lora_targets
from .pipeline import Flux2Pipeline, checkpoint_settings, estimate_memory, init_size, reference_size

DEMO = Path(__file__).parent / "demo"
IMG2IMG_OPTIONS = frozenset({"init_image", "mask", "strength", "outpaint"})
REFERENCE_OPTIONS = frozenset({"images", "latents", "tile"})  # the KV variant: diffusers has no KV inpaint pipeline
EDIT_OPTIONS = REFERENCE_OPTIONS | IMG2IMG_OPTIONS
IMG2IMG_STRENGTH = (0.8, 0.8)  # Flux2KleinInpaintPipeline's default; img2img is that pipeline with nothing kept
CFG_OPTIONS = EDIT_OPTIONS | {"guidance", "negative_prompt"}


SMALL_DECODER = "black-forest-labs/FLUX.2-small-decoder"  # BFL's distilled decoder, [96, 192, 384, 384] channels


def load(spec: imagegen.ModelSpec, weights: Path, **kwargs) -> Flux2Pipeline:
    if spec.extra.get("vae") and kwargs.get("vae") is None:  # an id that pairs the model with another VAE
        kwargs["vae"] = spec.extra["vae"]
    return Flux2Pipeline(spec, weights, **kwargs)


def load_kv(spec: imagegen.ModelSpec, weights: Path, **kwargs) -> Flux2KVPipeline:
    return Flux2KVPipeline(spec, weights, **kwargs)


def klein_kv() -> imagegen.ModelSpec:
    """Klein 9B-KV: editing whose reference images are run once, their keys/values reused by every step."""
    return imagegen.ModelSpec(
        id="flux2-klein-9b-kv",
        family="flux2",
        description="FLUX.2 Klein 9B KV (Black Forest Labs): reference images encoded once, cached across requests",
        load=load_kv,
        hf_repo="black-forest-labs/FLUX.2-klein-9b-kv",
        default_steps=4,  # Flux2KleinKVPipeline's num_inference_steps default
        tasks=(imagegen.TEXT_TO_IMAGE, imagegen.IMAGE_EDIT),
        options=REFERENCE_OPTIONS,
        reference_size=reference_size,
        quantize_modes=ALL_MODES,
        estimate_memory=estimate_memory,
        block_loop=True,
        components=frozenset({"vae"}),
        extra={"distilled": True, "sequence_parallel": True},
    )


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
        default_strength=IMG2IMG_STRENGTH,
        init_size=init_size,
        quantize_modes=ALL_MODES,
        family_default=not base and size == "4B",
        estimate_memory=estimate_memory,
        block_loop=True,
        components=frozenset({"vae"}),
        lora_targets=lora_targets,
        extra={"distilled": not base, "sequence_parallel": True},
    )


def with_small_decoder(spec: imagegen.ModelSpec) -> imagegen.ModelSpec:
    """The same model decoding with BFL's small decoder (its own repo, pulled separately)."""
    return replace(
        spec,
        id=f"{spec.id}-small-decoder",
        aliases=(),
        family_default=False,
        description=f"{spec.description}, with the FLUX.2 small decoder (~1.4x faster decode)",
        extra={**spec.extra, "vae": SMALL_DECODER},
    )


def demo() -> imagegen.ModelSpec | None:
    """The small model trained in this repo (training/), shipped inside this package."""
    if not (DEMO / "model_index.json").is_file():
        return None
    settings = checkpoint_settings(DEMO)
    width, height = settings.get("default_size", (128, 128))
    return imagegen.ModelSpec(
        id="flux2-demo",
        family="flux2",
        description=f"Tiny demo model (bundled; at most {width}x{height}) that draws "
        f"{settings.get('description', 'shapes')}",
        load=load,
        bundled_weights=DEMO,
        default_steps=settings.get("default_steps", 4),
        default_size=(width, height),
        max_pixels=width * height,  # trained at this size only: 256x256 draws several shapes, 512x512 noise
        # trained without reference images: no reference editing, but img2img / inpainting (the edits endpoint)
        tasks=(imagegen.TEXT_TO_IMAGE, imagegen.IMAGE_EDIT),
        options=EDIT_OPTIONS - {"images"},
        default_strength=IMG2IMG_STRENGTH,
        init_size=init_size,
        run_default=True,  # `imagegen run` works out of the box with the bundled weights
        default_dtype="float32",  # small enough; float32 keeps CPU runs exact and fast
        quantize_modes=(FP8,),  # its widths are not multiples of the integer modes' groups; fp8 scales per row
        block_loop=True,
        components=frozenset({"vae"}),
        lora_targets=lora_targets,
        extra={"distilled": True, "sequence_parallel": True},
    )


@imagegen.hookimpl
def register_models(register):
    for size in ("4B", "9B"):
        register(klein(size, base=False))
        register(klein(size, base=True))
        register(with_small_decoder(klein(size, base=False)))
    register(klein_kv())
    spec = demo()
    if spec is not None:
        register(spec)
