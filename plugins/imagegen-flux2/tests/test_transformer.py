"""FLUX.2 transformer parity with diffusers' Flux2Transformer2DModel (tiny random config, float32) and position ids
against Flux2KleinPipeline's own builders."""

from __future__ import annotations

import json

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
import torch
from diffusers import Flux2KleinPipeline, Flux2Transformer2DModel
from diffusers.models.transformers.transformer_flux2 import Flux2PosEmbed
from imagegen_flux2.config import Flux2PipelineConfig, Flux2TransformerConfig
from imagegen_flux2.transformer import (
    Flux2Transformer,
    flux2_rope,
    latent_ids,
    quant_predicate,
    reference_ids,
    text_ids,
)
from safetensors.numpy import load_file, save_file

from imagegen.errors import WeightsError
from imagegen.quantize import quantize_model
from imagegen.testing import randomize_norms
from imagegen.weights import load_module

TINY = {
    "patch_size": 1,
    "in_channels": 16,
    "num_layers": 2,
    "num_single_layers": 2,
    "attention_head_dim": 16,
    "num_attention_heads": 2,
    "joint_attention_dim": 32,
    "timestep_guidance_channels": 32,
    "mlp_ratio": 3.0,
    "axes_dims_rope": [4, 4, 4, 4],
    "rope_theta": 2000,
    "eps": 1e-6,
}
TEXT_LEN, GRID, REF_GRIDS = 5, (3, 4), [(2, 3), (2, 2)]


def save_reference(folder, guidance_embeds: bool) -> Flux2Transformer2DModel:
    torch.manual_seed(0)
    model = Flux2Transformer2DModel(**TINY, guidance_embeds=guidance_embeds).eval()
    randomize_norms(model)
    model.save_pretrained(folder, safe_serialization=True)
    return model


def load_ours(folder, dtype: str = "float32") -> Flux2Transformer:
    model = Flux2Transformer(Flux2TransformerConfig.from_file(folder / "config.json"))
    load_module(model, folder, dtype=dtype)
    return model


def inputs(batch: int, n_img: int, seed: int = 1) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "hidden_states": rng.standard_normal((batch, n_img, TINY["in_channels"])).astype(np.float32),
        "encoder_hidden_states": rng.standard_normal((batch, TEXT_LEN, TINY["joint_attention_dim"])).astype(np.float32),
        "timestep": np.array([0.3, 0.85][:batch], dtype=np.float32),
        "guidance": np.array([3.5, 1.0][:batch], dtype=np.float32),
    }


def diffusers_ids(batch: int, refs: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """txt_ids, img_ids exactly as Flux2KleinPipeline builds them."""
    txt = Flux2KleinPipeline._prepare_text_ids(torch.zeros(batch, TEXT_LEN, 8))
    img = Flux2KleinPipeline._prepare_latent_ids(torch.zeros(batch, 4, *GRID))
    if refs:
        ref = Flux2KleinPipeline._prepare_image_ids([torch.zeros(1, 4, h, w) for h, w in REF_GRIDS])
        img = torch.cat([img, ref.repeat(batch, 1, 1)], dim=1)
    return txt, img


@pytest.mark.parametrize(
    ("guidance_embeds", "use_guidance", "refs", "pace"),
    [
        (False, False, False, 0),
        (False, False, True, 0),
        (True, True, True, 0),
        (True, False, False, 0),
        (False, False, True, 1),
        (True, True, False, 2),
    ],
)
def test_matches_diffusers(tmp_path, guidance_embeds, use_guidance, refs, pace):
    """pace > 0: blocks compiled one by one with the host paced (imagegen.nn.pacing), the same numbers."""
    ref_model = save_reference(tmp_path, guidance_embeds)
    ours = load_ours(tmp_path)
    ours.pace(pace)
    batch = 2
    n_img = GRID[0] * GRID[1] + (sum(h * w for h, w in REF_GRIDS) if refs else 0)
    x = inputs(batch, n_img)
    txt_ids, img_ids = diffusers_ids(batch, refs)
    with torch.no_grad():
        expected = ref_model(
            hidden_states=torch.from_numpy(x["hidden_states"]),
            encoder_hidden_states=torch.from_numpy(x["encoder_hidden_states"]),
            timestep=torch.from_numpy(x["timestep"]),
            guidance=torch.from_numpy(x["guidance"]) if use_guidance else None,
            txt_ids=txt_ids,
            img_ids=img_ids,
            return_dict=False,
        )[0].numpy()

    rope = ours.rope(TEXT_LEN, GRID, REF_GRIDS if refs else ())
    got = ours(
        mx.array(x["hidden_states"]),
        mx.array(x["encoder_hidden_states"]),
        mx.array(x["timestep"]),
        rope,
        guidance=mx.array(x["guidance"]) if use_guidance else None,
    )
    got = np.array(got)
    assert got.shape == expected.shape
    err = np.abs(got - expected).max()
    rel = err / np.abs(expected).max()
    print(f"max abs {err:.3e}, max rel {rel:.3e} (output scale {np.abs(expected).max():.2f})")
    assert rel < 1e-5, (err, rel)


def test_id_builders_match_diffusers():
    txt, img = diffusers_ids(1, refs=False)
    np.testing.assert_array_equal(text_ids(TEXT_LEN), txt[0].numpy())
    np.testing.assert_array_equal(latent_ids(*GRID), img[0].numpy())
    ref = Flux2KleinPipeline._prepare_image_ids([torch.zeros(1, 4, h, w) for h, w in REF_GRIDS])
    np.testing.assert_array_equal(reference_ids(REF_GRIDS), ref[0].numpy())
    assert reference_ids([]).shape == (0, 4)


def test_rope_matches_diffusers_at_klein_scale():
    """Klein's real sizes: 512 text tokens, a 64x48 latent grid and two references, axes 4 x 32, theta 2000."""
    txt = Flux2KleinPipeline._prepare_text_ids(torch.zeros(1, 512, 8))[0]
    img = Flux2KleinPipeline._prepare_latent_ids(torch.zeros(1, 4, 64, 48))[0]
    ref = Flux2KleinPipeline._prepare_image_ids([torch.zeros(1, 4, 32, 32), torch.zeros(1, 4, 16, 64)])[0]
    pos_embed = Flux2PosEmbed(2000, [32] * 4)
    cos, sin = (torch.cat(pair).numpy() for pair in zip(pos_embed(txt), pos_embed(torch.cat([img, ref]))))
    sin = sin * np.tile([-1.0, 1.0], sin.shape[-1] // 2)  # the tables carry the rotation's signs
    got = flux2_rope(512, (64, 48), ((32, 32), (16, 64)), (32,) * 4, 2000.0)
    for g, e in zip(got, (cos, sin)):
        np.testing.assert_allclose(np.array(g), e, atol=1e-7)


def test_rope_is_cached_and_checked(tmp_path):
    save_reference(tmp_path, guidance_embeds=False)
    ours = load_ours(tmp_path)
    rope = ours.rope(TEXT_LEN, GRID, REF_GRIDS)
    assert ours.rope(TEXT_LEN, list(GRID), [list(g) for g in REF_GRIDS]) is rope
    assert rope[0].shape == (TEXT_LEN + 12 + 6 + 4, sum(TINY["axes_dims_rope"]))
    x = inputs(1, GRID[0] * GRID[1])
    with pytest.raises(ValueError, match="rope covers"):
        ours(mx.array(x["hidden_states"]), mx.array(x["encoder_hidden_states"]), mx.array(x["timestep"]), rope)


def test_step_compiles(tmp_path):
    save_reference(tmp_path, guidance_embeds=False)
    model = load_ours(tmp_path)
    x = inputs(2, GRID[0] * GRID[1])
    args = [mx.array(x["hidden_states"]), mx.array(x["encoder_hidden_states"]), mx.array(x["timestep"])]
    rope = model.rope(TEXT_LEN, GRID)
    step = mx.compile(lambda h, c, t, cos, sin: model(h, c, t, (cos, sin)), inputs=model.state)
    np.testing.assert_allclose(np.array(step(*args, *rope)), np.array(model(*args, rope)), atol=1e-5)


def test_bfloat16_and_quantized(tmp_path):
    save_reference(tmp_path, guidance_embeds=False)
    full = load_ours(tmp_path)
    x = inputs(1, GRID[0] * GRID[1])
    rope = full.rope(TEXT_LEN, GRID)
    args = [mx.array(x["hidden_states"]), mx.array(x["encoder_hidden_states"]), mx.array(x["timestep"])]
    expected = np.array(full(*args, rope))

    half = load_ours(tmp_path, "bfloat16")
    got = half(*[a.astype(mx.bfloat16) for a in args], rope)
    assert got.dtype == mx.bfloat16
    assert np.abs(np.array(got.astype(mx.float32)) - expected).max() < 0.05 * np.abs(expected).max()

    quantize_model(full, "8@32", quant_predicate)
    quantized = {k for k, m in full.named_modules() if isinstance(m, nn.QuantizedLinear)}
    assert "transformer_blocks.0.attn.to_qkv" in quantized
    assert "single_transformer_blocks.1.attn.to_qkv_mlp_proj" in quantized
    kept = (
        "x_embedder",
        "context_embedder",
        "proj_out",
        "norm_out.linear",
        "single_stream_modulation.linear",
        "time_guidance_embed.timestep_embedder.linear_1",
    )
    assert not quantized & set(kept)
    got = np.array(full(*args, rope))
    assert np.abs(got - expected).max() < 0.05 * np.abs(expected).max()


def test_strict_load_names_checkpoint_keys(tmp_path):
    save_reference(tmp_path, guidance_embeds=False)
    (file,) = tmp_path.glob("*.safetensors")
    weights = load_file(file)
    del weights["transformer_blocks.1.attn.add_k_proj.weight"]
    save_file(weights, file)
    with pytest.raises(WeightsError, match="transformer_blocks.1.attn.add_q_proj.weight"):
        load_ours(tmp_path)


def test_pipeline_config(tmp_path):
    path = tmp_path / "model_index.json"
    path.write_text(json.dumps({"_class_name": "Flux2KleinPipeline", "is_distilled": True, "vae": ["x", "y"]}))
    config = Flux2PipelineConfig.from_file(path)
    assert config.is_distilled and config.unknown_keys == ("vae",)
