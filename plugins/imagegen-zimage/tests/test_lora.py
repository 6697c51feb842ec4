"""Z-Image LoRA / LyCORIS in every layout against diffusers 0.42.1 (load_lora_weights, set_adapters) on the tiny
checkpoint of the pipeline parity tests; layouts diffusers does not read are mapped by hand, key by key, to its PEFT
layout first."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import ZImagePipeline
from imagegen_zimage.plugin import variant

from imagegen.lora import LoraSpec
from imagegen.testing import (
    assert_images_match,
    draw,
    draw_reference,
    linear_shapes,
    random_lora,
    save_adapter,
    sibling_module,
)

tiny = sibling_module(__file__, "tiny")
SIZE, noise = tiny.SIZE, tiny.noise

PROMPT = "a red fox in the snow"


@pytest.fixture(scope="module")
def checkpoint(tiny_zimage):
    folder, reference = tiny_zimage
    return folder, linear_shapes(reference.transformer), variant(turbo=True).pipeline(weights=folder, dtype="float32")


def ours(pipe, adapters, latents: np.ndarray) -> list:
    return draw(pipe, PROMPT, latents, 2, SIZE, loras=[(str(p), s) for p, s in adapters])


def check(checkpoint, files, reference_files=None, seed: int = 0) -> None:
    """diffusers (a fresh pipeline, adapters weighted by set_adapters) against imagegen; the adapters must visibly
    change the picture, or the match would prove nothing."""
    folder, _, pipe = checkpoint
    latents = noise(1, seed)
    reference = ZImagePipeline.from_pretrained(folder, torch_dtype=torch.float32)
    names = [f"adapter{i}" for i in range(len(files))]
    for name, (path, _) in zip(names, reference_files or files):
        reference.load_lora_weights(str(path), adapter_name=name)
    reference.set_adapters(names, [scale for _, scale in reference_files or files])
    want = draw_reference(reference, latents, 2, SIZE, prompt=PROMPT, guidance_scale=0.0)
    got = ours(pipe, files, latents)
    assert_images_match(got, want)
    bare = ours(pipe, [], latents)
    assert np.abs(np.asarray(got[0], np.int16) - np.asarray(bare[0], np.int16)).max() > 20


def pick(shapes: dict, *keep: str) -> dict:
    return {k: v for k, v in shapes.items() if any(part in k for part in keep)}


def test_peft_and_diffsynth_default_two_adapters(checkpoint, tmp_path):
    """diffusers / PEFT (transformer.) on every Linear, and DiffSynth / ModelScope (bare names, `.default`)."""
    _, shapes, _ = checkpoint
    peft = save_adapter(tmp_path / "peft.safetensors", random_lora(shapes, 4, 1, prefix="transformer."))
    default = random_lora(pick(shapes, "attention.to_k", "feed_forward.w3", "noise_refiner"), 2, 2, std=0.6)
    default = {
        k.replace(".lora_A.", ".lora_A.default.").replace(".lora_B.", ".lora_B.default."): v for k, v in default.items()
    }
    check(checkpoint, [(peft, 0.7), (save_adapter(tmp_path / "default.safetensors", default), 1.2)], seed=1)


def test_kohya_ai_toolkit_and_fused_qkv_dot_format(checkpoint, tmp_path):
    """kohya (lora_unet_, underscored names, lora_down/up, alpha), ai-toolkit (diffusion_model., lora_A/B, alpha),
    the kohya dot format on the original fused attention.qkv (lora.down / lora.up), and Anime-Z's dot format whose
    fused qkv and bare out repeat its split layers (ignored, as diffusers ignores them)."""
    _, shapes, _ = checkpoint
    kohya = random_lora(
        {k.replace(".", "_"): v for k, v in shapes.items()},
        4,
        3,
        down="lora_down.weight",
        up="lora_up.weight",
        prefix="lora_unet_",
        alpha=2.0,
    )
    toolkit = random_lora(pick(shapes, "layers.1.", "context_refiner"), 2, 4, 0.5, prefix="diffusion_model.", alpha=4.0)
    dim = shapes["layers.0.attention.to_q"][1]
    fused = random_lora(
        {"layers_0_attention_qkv": (3 * dim, dim)},
        2,
        5,
        0.6,
        down="lora.down.weight",
        up="lora.up.weight",
        prefix="lora_unet_",
        alpha=1.0,
    )
    anime = {f"layers_1_attention_{n}": (dim, dim) for n in ("to_q", "to_k", "to_v", "to_out_0", "out")}
    anime = random_lora(
        {**anime, "layers_1_attention_qkv": (3 * dim, dim)},
        2,
        8,
        0.6,
        down="lora.down.weight",
        up="lora.up.weight",
        prefix="lora_unet_",
    )
    check(
        checkpoint,
        [
            (save_adapter(tmp_path / "kohya.safetensors", kohya), 0.8),
            (save_adapter(tmp_path / "toolkit.safetensors", toolkit), 1.0),
            (save_adapter(tmp_path / "fused.safetensors", fused), 1.0),
            (save_adapter(tmp_path / "anime.safetensors", anime), 1.0),
        ],
        seed=2,
    )
    report = checkpoint[2].loras().plan(LoraSpec(str(tmp_path / "anime.safetensors"))).parsed.report
    assert (
        sorted(r.key.split(".")[0] for r in report if r.status == "ignored")
        == ["lora_unet_layers_1_attention_out"] * 2 + ["lora_unet_layers_1_attention_qkv"] * 2
    )


def test_lokr_ai_toolkit(checkpoint, tmp_path):
    """LyCORIS LoKr as ai-toolkit saves it for Z-Image (diffusion_model. + diffusers names, whole factors, alpha
    placeholder); LoKr on to_q / to_k lands as row blocks of imagegen's fused q/k/v."""
    from peft.tuners.lokr.layer import factorization

    _, shapes, _ = checkpoint
    g = torch.Generator().manual_seed(6)
    tensors = {}
    for name, (out, inp) in pick(shapes, "to_q", "to_k", "feed_forward", "to_out").items():
        (a_out, b_out), (a_in, b_in) = factorization(out, -1), factorization(inp, -1)
        tensors[f"diffusion_model.{name}.lokr_w1"] = torch.randn(a_out, a_in, generator=g) * 0.6
        tensors[f"diffusion_model.{name}.lokr_w2"] = torch.randn(b_out, b_in, generator=g) * 0.6
        tensors[f"diffusion_model.{name}.alpha"] = torch.tensor(1e10)
    check(checkpoint, [(save_adapter(tmp_path / "lokr.safetensors", tensors), 1.0)], seed=3)


def test_comfyui_fused_qkv_hand_mapped(checkpoint, tmp_path):
    """ComfyUI's Z-Image names (diffusion_model. + fused attention.qkv, attention.out, x_embedder, final_layer),
    which diffusers does not read: mapped by hand to its layout (q/k/v share lora_A and split lora_B)."""
    _, shapes, _ = checkpoint
    dim = shapes["layers.0.attention.to_q"][1]
    original = {
        "layers.0.attention.qkv": (3 * dim, dim),
        "noise_refiner.0.attention.out": (dim, dim),
        "x_embedder": shapes["all_x_embedder.2-1"],
        "final_layer.linear": shapes["all_final_layer.2-1.linear"],
    }
    comfy = random_lora(original, 2, 7, 0.6, prefix="diffusion_model.")
    ref = {}
    for name, target in (
        ("noise_refiner.0.attention.out", "noise_refiner.0.attention.to_out.0"),
        ("x_embedder", "all_x_embedder.2-1"),
        ("final_layer.linear", "all_final_layer.2-1.linear"),
    ):
        for ab in ("lora_A", "lora_B"):
            ref[f"transformer.{target}.{ab}.weight"] = comfy[f"diffusion_model.{name}.{ab}.weight"]
    ups = comfy["diffusion_model.layers.0.attention.qkv.lora_B.weight"].chunk(3)
    for proj, up in zip(("to_q", "to_k", "to_v"), ups):
        ref[f"transformer.layers.0.attention.{proj}.lora_A.weight"] = comfy[
            "diffusion_model.layers.0.attention.qkv.lora_A.weight"
        ]
        ref[f"transformer.layers.0.attention.{proj}.lora_B.weight"] = up
    check(
        checkpoint,
        [(save_adapter(tmp_path / "comfy.safetensors", comfy), 0.9)],
        [(save_adapter(tmp_path / "comfy_ref.safetensors", ref), 0.9)],
        seed=4,
    )
