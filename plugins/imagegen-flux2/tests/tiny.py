"""The tiny random FLUX.2 Klein checkpoint of the pipeline tests (diffusers layout, saved by diffusers), as diffusers'
`get_dummy_components` builds one; conftest.py builds it once per session."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler, Flux2KleinPipeline, Flux2Transformer2DModel
from imagegen_flux2.plugin import DEMO
from transformers import AutoTokenizer, Qwen3ForCausalLM

from imagegen.testing import make_qwen3, make_tokenizer, randomize_norms

VOCAB = 416  # the test tokenizer's vocabulary with its added tokens
SIZE = (64, 48)  # width, height: a 4x3 grid of latent tokens
SCHEDULER = DEMO / "scheduler"  # Klein's scheduler_config.json, as the bundled demo ships it


def build(folder: Path, distilled: bool, layers: int = 28) -> Flux2KleinPipeline:
    """A tiny Klein checkpoint saved by diffusers; the Qwen3 has `layers` layers (28 reaches Klein's 9/18/27)."""
    make_tokenizer(folder / "tokenizer")
    make_qwen3(
        folder / "text_encoder",
        vocab_size=VOCAB,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=layers,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=8,
    )
    torch.manual_seed(2)
    transformer = Flux2Transformer2DModel(
        patch_size=1,
        in_channels=16,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=48,
        timestep_guidance_channels=32,
        axes_dims_rope=[2, 2, 2, 2],
        guidance_embeds=False,
    )
    vae = AutoencoderKLFlux2(
        block_out_channels=(8, 8, 8, 8), layers_per_block=1, norm_num_groups=4, latent_channels=4, sample_size=32
    )
    for model in (transformer, vae):
        randomize_norms(model)
    with torch.no_grad():
        vae.bn.running_mean.normal_(0, 0.3)
        vae.bn.running_var.uniform_(0.5, 2.0)
    pipe = Flux2KleinPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler.from_pretrained(SCHEDULER),
        vae=vae.eval(),
        text_encoder=Qwen3ForCausalLM.from_pretrained(folder / "text_encoder").eval(),
        tokenizer=AutoTokenizer.from_pretrained(folder / "tokenizer"),
        transformer=transformer.eval(),
        is_distilled=distilled,
    )
    pipe.save_pretrained(folder)
    return pipe


def noise(batch: int, seed: int = 0) -> np.ndarray:
    """Initial latents as diffusers' `latents=` takes them for Klein: [B, 16, H/16, W/16]."""
    w, h = SIZE
    return np.random.default_rng(seed).standard_normal((batch, 16, h // 16, w // 16)).astype(np.float32)
