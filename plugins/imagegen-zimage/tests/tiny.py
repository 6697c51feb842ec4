"""The tiny random Z-Image checkpoint of the pipeline tests (diffusers layout, saved by diffusers), as diffusers'
`get_dummy_components` builds one; conftest.py builds it once per session."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, ZImagePipeline, ZImageTransformer2DModel
from transformers import AutoTokenizer, Qwen3ForCausalLM

from imagegen.testing import make_qwen3, make_tokenizer, randomize_norms

VOCAB = 416  # the test tokenizer's vocabulary with its added tokens
SIZE = (64, 48)  # width, height: latents 8x6, transformer tokens 4x3
SCHEDULER = {"num_train_timesteps": 1000, "shift": 3.0, "use_dynamic_shifting": False}  # Z-Image-Turbo's
BASE_SCHEDULER = {**SCHEDULER, "shift": 6.0}  # Z-Image (base)'s


def build(folder: Path, scheduler: dict) -> ZImagePipeline:
    make_tokenizer(folder / "tokenizer")
    make_qwen3(
        folder / "text_encoder",
        vocab_size=VOCAB,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=3,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=8,
    )
    torch.manual_seed(3)
    transformer = ZImageTransformer2DModel(
        all_patch_size=(2,),
        all_f_patch_size=(1,),
        in_channels=4,
        dim=32,
        n_layers=2,
        n_refiner_layers=1,
        n_heads=2,
        n_kv_heads=2,
        cap_feat_dim=16,
        axes_dims=[8, 4, 4],
        axes_lens=[1024, 32, 32],
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 8, 8, 8),
        layers_per_block=1,
        norm_num_groups=4,
        latent_channels=4,
        sample_size=32,
        scaling_factor=0.3611,
        shift_factor=0.1159,
        use_quant_conv=False,
        use_post_quant_conv=False,
    )
    for model in (transformer, vae):
        randomize_norms(model)
    pipe = ZImagePipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**scheduler),
        vae=vae.eval(),
        text_encoder=Qwen3ForCausalLM.from_pretrained(folder / "text_encoder").eval(),
        tokenizer=AutoTokenizer.from_pretrained(folder / "tokenizer"),
        transformer=transformer.eval(),
    )
    pipe.save_pretrained(folder)
    return pipe


def noise(batch: int, seed: int = 0) -> np.ndarray:
    """Initial latents as diffusers' `latents=` takes them for Z-Image: [B, 4, H/8, W/8]."""
    w, h = SIZE
    return np.random.default_rng(seed).standard_normal((batch, 4, h // 8, w // 8)).astype(np.float32)
