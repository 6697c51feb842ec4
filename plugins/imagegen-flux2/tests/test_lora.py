"""FLUX.2 Klein LoRA / LyCORIS in every layout against diffusers 0.42.1 (load_lora_weights, set_adapters) on the tiny
checkpoint of the pipeline parity tests: same adapter file, same `latents=`, float32 images. Layouts diffusers does
not read are converted by hand, key by key, to the diffusers layout, and that file is diffusers' input."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import Flux2KleinPipeline
from imagegen_flux2.plugin import klein
from peft.tuners.lokr.layer import factorization

from imagegen import LoraError
from imagegen.lora import text_adapters
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
# BFL name -> diffusers name of the double-block layers that are not fused q/k/v (diffusers' converter)
DOUBLE = {
    "img_attn.proj": "attn.to_out.0",
    "txt_attn.proj": "attn.to_add_out",
    "img_mlp.0": "ff.linear_in",
    "img_mlp.2": "ff.linear_out",
    "txt_mlp.0": "ff_context.linear_in",
    "txt_mlp.2": "ff_context.linear_out",
}
OUTSIDE = {
    "img_in": "x_embedder",
    "txt_in": "context_embedder",
    "time_in.in_layer": "time_guidance_embed.timestep_embedder.linear_1",
    "time_in.out_layer": "time_guidance_embed.timestep_embedder.linear_2",
    "final_layer.linear": "proj_out",
    "single_stream_modulation.lin": "single_stream_modulation.linear",
    "double_stream_modulation_img.lin": "double_stream_modulation_img.linear",
    "double_stream_modulation_txt.lin": "double_stream_modulation_txt.linear",
}
QKV = {
    "img_attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
    "txt_attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
}


@pytest.fixture(scope="module")
def checkpoint(tiny_klein):
    folder, reference = tiny_klein
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
    return draw_reference(reference, latents, 2, SIZE, prompt=PROMPT)


def ours(pipe, adapters, latents: np.ndarray, **kw) -> list:
    return draw(pipe, PROMPT, latents, 2, SIZE, loras=[(str(p), s) for p, s in adapters], **kw)


def check(checkpoint, ours_files, reference_files=None, seed: int = 0):
    folder, _, pipe = checkpoint
    latents = noise(1, seed)
    want = diffusers_images(folder, reference_files or ours_files, latents)
    got = ours(pipe, ours_files, latents)
    assert_images_match(got, want)
    assert_changed(got, ours(pipe, [], latents))


def assert_changed(got: list, bare: list) -> None:
    """The adapters visibly change the picture, so the match above proves they were applied alike."""
    assert np.abs(np.asarray(got[0], np.int16) - np.asarray(bare[0], np.int16)).max() > 20


def blocks(shapes: dict, *keep: str) -> dict:
    return {k: v for k, v in shapes.items() if any(part in k for part in keep)}


def test_peft_two_adapters_with_scales_then_switch_back(checkpoint, tmp_path):
    folder, shapes, pipe = checkpoint
    every = {k: v for k, v in shapes.items() if "guidance_embedder" not in k}
    first = save_adapter(tmp_path / "all.safetensors", random_lora(every, rank=4, seed=1, prefix="transformer."))
    second = save_adapter(
        tmp_path / "some.safetensors",
        random_lora(
            blocks(shapes, "to_k", "add_v_proj", "ff.linear_in", "single_transformer"),
            rank=2,
            seed=2,
            prefix="transformer.",
        ),
    )
    latents = noise(1, 3)
    bare = ours(pipe, [], latents)
    check(checkpoint, [(first, 0.7), (second, 1.3)], seed=3)
    after = ours(pipe, [], latents)  # the base weights are back, exactly
    assert np.array_equal(np.asarray(after[0]), np.asarray(bare[0]))
    assert not np.array_equal(np.asarray(ours(pipe, [(second, 1.0)], latents)[0]), np.asarray(bare[0]))


def bfl_shapes(shapes: dict) -> dict[str, tuple[int, int]]:
    """(out, in) of every layer under its BFL name, from the diffusers model's Linears."""
    out = {}
    for i in range(len({k.split(".")[1] for k in shapes if k.startswith("transformer_blocks.")})):
        t = f"transformer_blocks.{i}."
        for theirs, parts in QKV.items():
            o, n = shapes[t + parts[0]]
            out[f"double_blocks.{i}.{theirs}"] = (3 * o, n)
        out.update({f"double_blocks.{i}.{theirs}": shapes[t + name] for theirs, name in DOUBLE.items()})
    for i in range(len({k.split(".")[1] for k in shapes if k.startswith("single_transformer_blocks.")})):
        t = f"single_transformer_blocks.{i}.attn."
        out[f"single_blocks.{i}.linear1"] = shapes[t + "to_qkv_mlp_proj"]
        out[f"single_blocks.{i}.linear2"] = shapes[t + "to_out"]
    out.update({theirs: shapes[name] for theirs, name in OUTSIDE.items()})
    return out


def test_kohya_ai_toolkit_and_fal_together(checkpoint, tmp_path):
    """kohya / musubi (lora_unet_, lora_down/up, alpha, fused qkv), ai-toolkit (diffusion_model., BFL names) and
    fal (PEFT's base_model.model. around BFL names), three adapters at once."""
    _, shapes, _ = checkpoint
    bfl = bfl_shapes(shapes)
    # diffusers' kohya converter drops the modulation layers (with a warning); imagegen maps them (another test)
    kohya = {k.replace(".", "_"): v for k, v in bfl.items() if "modulation" not in k}
    kohya = save_adapter(
        tmp_path / "kohya.safetensors",
        random_lora(
            kohya, rank=4, seed=4, down="lora_down.weight", up="lora_up.weight", prefix="lora_unet_", alpha=2.0
        ),
    )
    toolkit = save_adapter(tmp_path / "toolkit.safetensors", random_lora(bfl, 2, 5, prefix="diffusion_model."))
    fal = save_adapter(
        tmp_path / "fal.safetensors",
        random_lora(blocks(bfl, "double_blocks", "linear2"), 2, 6, prefix="base_model.model."),
    )
    check(checkpoint, [(kohya, 0.8), (toolkit, 0.6), (fal, 1.0)], seed=5)


def lokr(shapes: dict, prefix: str, rank: int | None, alpha: float, seed: int, std: float = 0.4) -> dict:
    """LoKr factors shaped as PEFT factorizes (decompose_factor -1): whole w1, w2 whole or rank-decomposed."""
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, (out, inp) in shapes.items():
        (a_out, b_out), (a_in, b_in) = factorization(out, -1), factorization(inp, -1)
        tensors[f"{prefix}{name}.lokr_w1"] = torch.randn(a_out, a_in, generator=g) * std
        if rank is None:
            tensors[f"{prefix}{name}.lokr_w2"] = torch.randn(b_out, b_in, generator=g) * std
        else:
            tensors[f"{prefix}{name}.lokr_w2_a"] = torch.randn(b_out, rank, generator=g) * std
            tensors[f"{prefix}{name}.lokr_w2_b"] = torch.randn(rank, b_in, generator=g) * std
        tensors[f"{prefix}{name}.alpha"] = torch.tensor(alpha)
    return tensors


def test_lokr_bfl_full_matrices_with_placeholder_alpha(checkpoint, tmp_path):
    """ai-toolkit LoKr on BFL names: whole factors and alpha ~1e10, which must not scale them; LoKr on the fused
    q/k/v lands on imagegen's fused projection as it is."""
    _, shapes, _ = checkpoint
    tensors = lokr(bfl_shapes(shapes), "diffusion_model.", None, 9999220736.0, 7)
    check(checkpoint, [(save_adapter(tmp_path / "lokr.safetensors", tensors), 0.9)], seed=6)


def test_lokr_lycoris_and_simpletuner_together(checkpoint, tmp_path):
    """LyCORIS (lycoris_ + underscored diffusers names, w2 rank-decomposed, alpha / rank) and SimpleTuner (bare
    dotted diffusers names, whole factors)."""
    _, shapes, _ = checkpoint
    layers = blocks(
        shapes,
        "transformer_blocks.0.attn.to_q",
        "add_k_proj",
        "to_qkv_mlp_proj",
        "attn.to_out",
        "ff_context.linear_out",
    )
    lycoris = lokr({k.replace(".", "_"): v for k, v in layers.items()}, "lycoris_", 1, 0.5, 8, std=1.0)
    simple = lokr(
        blocks(shapes, "to_v", "ff.linear_in", "single_transformer_blocks.0.attn.to_out"), "", None, 1e10, 9, std=0.7
    )
    check(
        checkpoint,
        [
            (save_adapter(tmp_path / "lycoris.safetensors", lycoris), 1.0),
            (save_adapter(tmp_path / "simpletuner.safetensors", simple), 0.7),
        ],
        seed=7,
    )


def loha_delta(t: dict[str, torch.Tensor], key: str) -> torch.Tensor:
    rank = t[f"{key}.hada_w1_b"].shape[0]
    return (
        (t[f"{key}.hada_w1_a"] @ t[f"{key}.hada_w1_b"])
        * (t[f"{key}.hada_w2_a"] @ t[f"{key}.hada_w2_b"])
        * t[f"{key}.alpha"]
        / rank
    )


def test_layouts_diffusers_does_not_read(checkpoint, tmp_path):
    """Hand-mapped, key by key, to diffusers' PEFT layout: kohya LoHa (as a full-rank LoRA with an identity down),
    bare diffusers names with PEFT's `.default` adapter name (DiffSynth / ModelScope), and BFL's final layer whose
    (shift, scale) halves are diffusers' (scale, shift)."""
    _, shapes, _ = checkpoint
    g = torch.Generator().manual_seed(10)
    loha, loha_ref = {}, {}
    for name, diffusers_names in (
        ("double_blocks.0.img_attn.qkv", QKV["img_attn.qkv"]),
        ("double_blocks.0.txt_mlp.2", ("ff_context.linear_out",)),
        ("single_blocks.0.linear2", None),
    ):
        key = "lora_unet_" + name.replace(".", "_")
        out, inp = bfl_shapes(shapes)[name]
        for w in ("w1", "w2"):
            loha[f"{key}.hada_{w}_a"] = torch.randn(out, 2, generator=g)
            loha[f"{key}.hada_{w}_b"] = torch.randn(2, inp, generator=g)
        loha[f"{key}.alpha"] = torch.tensor(1.0)
        delta = loha_delta(loha, key)
        targets = (
            ["single_transformer_blocks.0.attn.to_out"]
            if diffusers_names is None
            else [f"transformer_blocks.0.{n}" for n in diffusers_names]
        )
        for target, rows in zip(targets, delta.chunk(len(targets))):
            loha_ref[f"transformer.{target}.lora_A.weight"] = torch.eye(inp)
            loha_ref[f"transformer.{target}.lora_B.weight"] = rows
    default = random_lora(
        blocks(shapes, "transformer_blocks.0.attn.to_k", "single_transformer_blocks.0"), 3, 11, std=0.8
    )
    default = {
        k.replace(".lora_A.", ".lora_A.default.").replace(".lora_B.", ".lora_B.default."): v for k, v in default.items()
    }
    default_ref = {"transformer." + k.replace(".default.", "."): v for k, v in default.items()}
    final = random_lora(
        {"final_layer.adaLN_modulation.1": shapes["norm_out.linear"]}, 2, 12, 1.0, prefix="diffusion_model."
    )
    up = final["diffusion_model.final_layer.adaLN_modulation.1.lora_B.weight"]
    final_ref = {
        "transformer.norm_out.linear.lora_A.weight": final[
            "diffusion_model.final_layer.adaLN_modulation.1.lora_A.weight"
        ],
        "transformer.norm_out.linear.lora_B.weight": torch.cat(up.chunk(2)[::-1]),
    }
    files = [
        (save_adapter(tmp_path / f"{n}.safetensors", t), s)
        for n, t, s in (("loha", loha, 1.0), ("default", default, 0.8), ("final", final, 1.0))
    ]
    refs = [
        (save_adapter(tmp_path / f"{n}_ref.safetensors", t), s)
        for n, t, s in (("loha", loha_ref, 1.0), ("default", default_ref, 0.8), ("final", final_ref, 1.0))
    ]
    check(checkpoint, files, refs, seed=8)


def test_text_encoder_lora_applies_to_its_request_only(checkpoint, tmp_path):
    """text_encoder.* keys patch the shared Qwen3 for the request that names them; reference: the same deltas merged
    into diffusers' text encoder by hand (prompt embeddings compared: the tiny model's image barely depends on them)."""
    folder, _, pipe = checkpoint
    reference = Flux2KleinPipeline.from_pretrained(folder, torch_dtype=torch.float32)
    te = {k: v for k, v in linear_shapes(reference.text_encoder).items() if ".layers." in k}
    tensors = random_lora(blocks(te, "v_proj", "down_proj"), 2, 13, std=0.8, prefix="text_encoder.")
    path = save_adapter(tmp_path / "te.safetensors", tensors)
    bare = pipe.embed_prompts([PROMPT])
    with torch.no_grad():
        modules = dict(reference.text_encoder.named_modules())
        for key in [k for k in tensors if k.endswith("lora_A.weight")]:
            name = key.removeprefix("text_encoder.").removesuffix(".lora_A.weight")
            modules[name].weight += 0.9 * tensors[key.replace("lora_A", "lora_B")] @ tensors[key]
        want = reference.encode_prompt(PROMPT)[0].numpy()
    with text_adapters(pipe.use_loras(pipe.request(PROMPT, loras=[(path, 0.9)]))):
        got = np.asarray(pipe.embed_prompts([PROMPT]))
    np.testing.assert_allclose(got, want, atol=2e-4, rtol=1e-4)
    assert np.abs(got - np.asarray(bare)).max() > 0.1
    assert np.array_equal(np.asarray(pipe.embed_prompts([PROMPT])), np.asarray(bare))  # nothing left behind
    latents = noise(1, 9)
    want = draw_reference(reference, latents, 2, SIZE, prompt=PROMPT)
    assert_images_match(ours(pipe, [(path, 0.9)], latents), want)


def test_bad_adapters_are_one_clear_error(checkpoint, tmp_path):
    _, shapes, pipe = checkpoint
    tensors = random_lora(blocks(shapes, "to_q"), 2, 14, prefix="transformer.")
    strange = {f"transformer.mystery_{i}.lora_A.weight": torch.zeros(2, 4) for i in range(7)}
    mixed = save_adapter(tmp_path / "mixed.safetensors", {**tensors, **strange})
    with pytest.raises(LoraError, match=r"7 of 11 keys do not fit flux2-klein-4b: .*mystery_0.* and 2 more"):
        pipe.request(PROMPT, loras=[mixed])
    assert pipe.request(PROMPT, loras=[mixed], lora_partial=True).option("lora_partial")
    with pytest.raises(LoraError, match="none of its 7 keys"):
        pipe.request(PROMPT, loras=[save_adapter(tmp_path / "none.safetensors", strange)])
    wrong = random_lora({"transformer_blocks.0.attn.to_q": (16, 32)}, 2, 15, prefix="transformer.")
    with pytest.raises(LoraError, match=r"to_q' has shape \(16, 32\) but the model's .*to_qkv needs \(16, 16\)"):
        pipe.request(PROMPT, loras=[save_adapter(tmp_path / "wrong.safetensors", wrong)])
    with pytest.raises(LoraError, match="not found"):
        pipe.request(PROMPT, loras=[tmp_path / "missing.safetensors"])
