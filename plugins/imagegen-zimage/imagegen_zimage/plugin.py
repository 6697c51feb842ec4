"""Registers the Z-Image models (Tongyi-MAI) with imagegen."""

from __future__ import annotations

from pathlib import Path

import imagegen
from imagegen.quantize import ALL_MODES

from .control import OPTIONS as CONTROL_OPTIONS
from .lora import lora_targets
from .pipeline import OPTIONS, ZImagePipeline, estimate_memory


def load(spec: imagegen.ModelSpec, weights: Path, **kwargs) -> ZImagePipeline:
    return ZImagePipeline(spec, weights, **kwargs)


def variant(turbo: bool) -> imagegen.ModelSpec:
    return imagegen.ModelSpec(
        id="zimage-turbo" if turbo else "zimage",
        family="zimage",
        description="Z-Image Turbo, step-distilled (Tongyi-MAI)" if turbo else "Z-Image base (Tongyi-MAI)",
        load=load,
        hf_repo="Tongyi-MAI/Z-Image-Turbo" if turbo else "Tongyi-MAI/Z-Image",
        # turbo: 9 scheduler steps as diffusers counts them; base: diffusers' __call__ defaults
        default_steps=9 if turbo else 50,
        default_guidance=None if turbo else 5.0,
        tasks=(imagegen.TEXT_TO_IMAGE, imagegen.IMAGE_EDIT),  # edits repaint the image (img2img, inpainting)
        options=frozenset(
            {"latents", "tile", "init_image", "mask", "strength", "outpaint"}
            | (set() if turbo else {"guidance", "negative_prompt"})
        ),
        extra_options=CONTROL_OPTIONS if turbo else OPTIONS + CONTROL_OPTIONS,
        default_strength=(0.6, 1.0),  # ZImageImg2ImgPipeline / ZImageInpaintPipeline
        quantize_modes=ALL_MODES,
        family_default=turbo,
        estimate_memory=estimate_memory,
        block_loop=True,
        components=frozenset({"vae", "controlnet"}),  # spec.pipeline(controlnet=DIR): ZImageControlNetModel
        lora_targets=lora_targets,
    )


@imagegen.hookimpl
def register_models(register):
    register(variant(turbo=True))
    register(variant(turbo=False))
