"""The tiny random Z-Image checkpoint of the pipeline tests (diffusers layout, saved by diffusers), as diffusers'
`get_dummy_components` builds one; conftest.py builds it once per session."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, ZImagePipeline, ZImageTransformer2DModel

from imagegen.testing import ZIMAGE_TRANSFORMER, ZIMAGE_VAE, make_text_parts, randomize_norms

SIZE = (64, 48)  # width, height: latents 8x6, transformer tokens 4x3
SCHEDULER = {"num_train_timesteps": 1000, "shift": 3.0, "use_dynamic_shifting": False}  # Z-Image-Turbo's
BASE_SCHEDULER = {**SCHEDULER, "shift": 6.0}  # Z-Image (base)'s


def build(folder: Path, scheduler: dict) -> ZImagePipeline:
    text = make_text_parts(folder, layers=3)
    torch.manual_seed(3)
    transformer = ZImageTransformer2DModel(**ZIMAGE_TRANSFORMER)
    vae = AutoencoderKL(**ZIMAGE_VAE)
    for model in (transformer, vae):
        randomize_norms(model)
    pipe = ZImagePipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**scheduler),
        vae=vae.eval(),
        transformer=transformer.eval(),
        **text,
    )
    pipe.save_pretrained(folder)
    return pipe


def noise(batch: int, seed: int = 0) -> np.ndarray:
    """Initial latents as diffusers' `latents=` takes them for Z-Image: [B, 4, H/8, W/8]."""
    w, h = SIZE
    return np.random.default_rng(seed).standard_normal((batch, 4, h // 8, w // 8)).astype(np.float32)
