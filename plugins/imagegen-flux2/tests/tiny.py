"""The tiny random FLUX.2 Klein checkpoint of the pipeline tests (diffusers layout, saved by diffusers), as diffusers'
`get_dummy_components` builds one; conftest.py builds it once per session. Also the real FLUX.2 VAE config the VAE
tests check our classes against."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler, Flux2KleinPipeline, Flux2Transformer2DModel
from imagegen_flux2.plugin import DEMO

from imagegen.testing import KLEIN_TRANSFORMER, PIPELINE_VAE, make_text_parts, randomize_norms

SIZE = (64, 48)  # width, height: a 4x3 grid of latent tokens
SCHEDULER = DEMO / "scheduler"  # Klein's scheduler_config.json, as the bundled demo ships it

# vae/config.json of black-forest-labs/FLUX.2-klein-4B (shared by every FLUX.2 model)
VAE_CONFIG = {
    "_class_name": "AutoencoderKLFlux2",
    "act_fn": "silu",
    "batch_norm_eps": 0.0001,
    "batch_norm_momentum": 0.1,
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "force_upcast": True,
    "in_channels": 3,
    "out_channels": 3,
    "latent_channels": 32,
    "layers_per_block": 2,
    "mid_block_add_attention": True,
    "norm_num_groups": 32,
    "patch_size": [2, 2],
    "sample_size": 1024,
    "use_quant_conv": True,
    "use_post_quant_conv": True,
}


def build(folder: Path, distilled: bool, layers: int = 28) -> Flux2KleinPipeline:
    """A tiny Klein checkpoint saved by diffusers; the Qwen3 has `layers` layers (28 reaches Klein's 9/18/27)."""
    text = make_text_parts(folder, layers)
    torch.manual_seed(2)
    transformer = Flux2Transformer2DModel(**KLEIN_TRANSFORMER)
    vae = AutoencoderKLFlux2(**PIPELINE_VAE)
    for model in (transformer, vae):
        randomize_norms(model)
    with torch.no_grad():
        vae.bn.running_mean.normal_(0, 0.3)
        vae.bn.running_var.uniform_(0.5, 2.0)
    pipe = Flux2KleinPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler.from_pretrained(SCHEDULER),
        vae=vae.eval(),
        transformer=transformer.eval(),
        is_distilled=distilled,
        **text,
    )
    pipe.save_pretrained(folder)
    return pipe


def noise(batch: int, seed: int = 0) -> np.ndarray:
    """Initial latents as diffusers' `latents=` takes them for Klein: [B, 16, H/16, W/16]."""
    w, h = SIZE
    return np.random.default_rng(seed).standard_normal((batch, 16, h // 16, w // 16)).astype(np.float32)
