"""FLUX.2 Klein LoRA / LyCORIS in every layout against diffusers 0.42.1 (load_lora_weights, set_adapters) on the tiny
checkpoint of the pipeline parity tests: same adapter file, same `latents=`, float32 images. Layouts diffusers does
not read are converted by hand, key by key, to the diffusers layout, and that file is diffusers' input."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import Flux2KleinPipeline
from imagegen_flux2.plugin import klein

from imagegen import LoraError
from imagegen.testing import assert_images_match, linear_shapes, random_lora, save_adapter

sys.path.insert(0, str(Path(__file__).parent))
from test_pipeline import SIZE, build, noise  # noqa: E402  the tiny Klein checkpoint of the pipeline tests

PROMPT = "a red fox in the snow"
# BFL name -> diffusers name of the double-block layers that are not fused q/k/v (diffusers' converter)
DOUBLE = {"img_attn.proj": "attn.to_out.0", "txt_attn.proj": "attn.to_add_out", "img_mlp.0": "ff.linear_in",
          "img_mlp.2": "ff.linear_out", "txt_mlp.0": "ff_context.linear_in", "txt_mlp.2": "ff_context.linear_out"}
OUTSIDE = {"img_in": "x_embedder", "txt_in": "context_embedder", "time_in.in_layer":
           "time_guidance_embed.timestep_embedder.linear_1", "time_in.out_layer":
           "time_guidance_embed.timestep_embedder.linear_2", "final_layer.linear": "proj_out",
           "single_stream_modulation.lin": "single_stream_modulation.linear",
           "double_stream_modulation_img.lin": "double_stream_modulation_img.linear",
           "double_stream_modulation_txt.lin": "double_stream_modulation_txt.linear"}
QKV = {"img_attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
       "txt_attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj")}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("klein_lora")
    reference = build(folder, distilled=True, layers=28)
    shapes = linear_shapes(reference.transformer)
    pipe = klein("4B", base=False).pipeline(weights=folder, dtype="float32")
    return folder, shapes, pipe


def diffusers_images(folder: Path, adapters: list[tuple[Path, float]], latents: np.ndarray) -> list:
    """A fresh reference pipeline (LoKr fuses its q/k/v) with the adapters loaded and weighted by set_adapters."""
    reference = Flux2KleinPipeline.from_pretrained(folder, torch_dtype=torch.float32)
    names = [f"adapter{i}" for i in range(len(adapters))]
    for name, (path, _) in zip(names, adapters):
        reference.load_lora_weights(str(path), adapter_name=name)
    if names:
        reference.set_adapters(names, [scale for _, scale in adapters])
    return reference(prompt=PROMPT, latents=torch.from_numpy(latents), num_inference_steps=2,
                     width=SIZE[0], height=SIZE[1]).images


def ours(pipe, adapters, latents: np.ndarray, **kw) -> list:
    return pipe.generate(PROMPT, latents=latents, steps=2, width=SIZE[0], height=SIZE[1],
                         loras=[(str(p), s) for p, s in adapters], **kw).images


def check(checkpoint, ours_files, reference_files=None, seed: int = 0):
    folder, _, pipe = checkpoint
    latents = noise(1, seed)
    want = diffusers_images(folder, reference_files or ours_files, latents)
    assert_images_match(ours(pipe, ours_files, latents), want)


def blocks(shapes: dict, *keep: str) -> dict:
    return {k: v for k, v in shapes.items() if any(part in k for part in keep)}


def test_peft_two_adapters_with_scales_then_switch_back(checkpoint, tmp_path):
    folder, shapes, pipe = checkpoint
    every = {k: v for k, v in shapes.items() if "guidance_embedder" not in k}
    first = save_adapter(tmp_path / "all.safetensors", random_lora(every, rank=4, seed=1, prefix="transformer."))
    second = save_adapter(tmp_path / "some.safetensors",
                          random_lora(blocks(shapes, "to_k", "add_v_proj", "ff.linear_in", "single_transformer"),
                                      rank=2, seed=2, prefix="transformer."))
    latents = noise(1, 3)
    bare = ours(pipe, [], latents)
    check(checkpoint, [(first, 0.7), (second, 1.3)], seed=3)
    after = ours(pipe, [], latents)  # the base weights are back, exactly
    assert np.array_equal(np.asarray(after[0]), np.asarray(bare[0]))
    assert not np.array_equal(np.asarray(ours(pipe, [(second, 1.0)], latents)[0]), np.asarray(bare[0]))
