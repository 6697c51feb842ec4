"""ControlNet requests for Z-Image: the options (control_image, control_scale, canny), their checks against the
loaded pipeline, and the control context the ControlNet reads, prepared as diffusers 0.42.1
ZImageControlNetPipeline and ZImageControlNetInpaintPipeline do (pipelines/z_image/)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import mlx.core as mx

import imagegen
from imagegen import block_loop
from imagegen.errors import InvalidOptionError
from imagegen.img2img import downsample_mask, image_pixels, mask_pixels

from .canny import canny_edges, canny_thresholds
from .controlnet import ZImageControlNet

if TYPE_CHECKING:
    from imagegen.nn import AutoencoderKL

CONTROL_SCALE = 0.75  # diffusers' controlnet_conditioning_scale default

OPTIONS = (
    imagegen.Option(
        "control_image",
        "image",
        "Control image for the ControlNet loaded with --controlnet (edges, "
        "depth, pose, ...); with --init-image and --mask: ControlNet inpainting.",
        flag="--control-image",
    ),
    imagegen.Option(
        "control_scale",
        "float",
        f"How strongly the ControlNet steers (default {CONTROL_SCALE}).",
        minimum=0,
        flag="--control-scale",
    ),
    imagegen.Option(
        "canny",
        "any",
        "Steer with the canny edges of the control image: LOW,HIGH thresholds, or "
        "'default' (100,200); needs OpenCV (the zimage plugin's canny extra).",
        convert=canny_thresholds,
        dump=list,
        load=lambda value, folders: canny_thresholds(value),
        flag="--canny",
    ),
)
NAMES = tuple(o.name for o in OPTIONS)


def check_control(request: imagegen.Request, controlnet: ZImageControlNet | None, channels: int) -> bool:
    """Whether the request uses the ControlNet; one clear line for what cannot run (before any work)."""
    image = request.option("control_image")
    if image is None:
        given = next((n for n in NAMES if request.option(n) is not None), None)
        if given is not None:
            raise InvalidOptionError(f"{given} needs a control image (control_image, --control-image).")
        return False
    if controlnet is None:
        raise InvalidOptionError(
            "control_image needs a ControlNet: load the model with --controlnet DIR "
            "(Python: spec.pipeline(controlnet=DIR))."
        )
    init = request.init
    if init is not None and init.mask is None:
        raise InvalidOptionError(
            "With a control image, an init image needs a mask (ControlNet inpainting); "
            "ControlNet img2img is not supported."
        )
    if init is not None and init.strength != 1.0:
        raise InvalidOptionError(
            "ControlNet inpainting repaints the masked region from noise: strength does not apply."
        )
    if init is not None and controlnet.config.control_in_dim != 2 * channels + 1:
        raise InvalidOptionError(
            f"ControlNet inpainting needs a ControlNet with control_in_dim {2 * channels + 1} "
            f"(Union 2.x); the loaded one has {controlnet.config.control_in_dim}."
        )
    cached = [name for name in block_loop.options() if request.option(name) is not None]
    if cached:
        raise InvalidOptionError(f"{cached[0]} does not combine with a ControlNet yet.")
    return True


def control_context(request: imagegen.Request, vae: AutoencoderKL, control_in_dim: int) -> mx.array:
    """[B, h, w, control_in_dim] NHWC: the control image's latents (the VAE's mean, as diffusers' sample_mode
    "argmax"); for inpainting then 1 - mask on the latent grid and the latents of the init image with the masked
    region blanked; else zero channels up to control_in_dim (a 2.x ControlNet without inpainting)."""
    width, height = request.width, request.height
    image = request.option("control_image")
    thresholds = request.option("canny")
    if thresholds is not None:
        image = canny_edges(image, *thresholds)

    def latents(pixels: mx.array) -> mx.array:
        mean, _ = vae.encode_moments(pixels.astype(vae.dtype))
        return vae.normalize_latents(mean)

    parts = [latents(image_pixels(image, width, height))]
    h, w = parts[0].shape[1:3]
    if request.init is not None:
        mask = mask_pixels(request.init.mask, width, height)
        kept = image_pixels(request.init.image, width, height) * mx.array(mask < 0.5)[None, :, :, None]
        keep = mx.array(downsample_mask(1 - mask, h, w, "nearest"))[None, :, :, None].astype(parts[0].dtype)
        parts += [keep, latents(kept)]
    context = mx.concatenate(parts, axis=-1)
    if context.shape[-1] < control_in_dim:
        context = mx.pad(context, [(0, 0), (0, 0), (0, 0), (0, control_in_dim - context.shape[-1])])
    return mx.broadcast_to(context, (request.batch_size, h, w, control_in_dim))
