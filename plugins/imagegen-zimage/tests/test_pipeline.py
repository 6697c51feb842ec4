"""The whole Z-Image pipeline against diffusers' ZImagePipeline: same tiny random checkpoint folder (diffusers
layout), same `latents=`, float32. Turbo, base with CFG (negative prompt, normalization, truncation), batches."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, ZImagePipeline, ZImageTransformer2DModel
from imagegen_zimage.plugin import variant
from PIL import Image
from transformers import AutoTokenizer, Qwen3ForCausalLM

import imagegen
from imagegen.testing import assert_images_match, make_qwen3, make_tokenizer

VOCAB = 416
SIZE = (64, 48)  # width, height: latents 8x6, transformer tokens 4x3
SCHEDULER = {"num_train_timesteps": 1000, "shift": 3.0, "use_dynamic_shifting": False}  # Z-Image-Turbo's


def randomize(model: torch.nn.Module) -> None:
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and p.ndim == 1:
                p.uniform_(0.5, 1.5)
            elif "pad_token" in name:
                p.normal_(0.0, 0.5)


def build(folder: Path, scheduler: dict) -> ZImagePipeline:
    make_tokenizer(folder / "tokenizer")
    make_qwen3(folder / "text_encoder", vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=3,
               num_attention_heads=2, num_key_value_heads=1, head_dim=8)
    torch.manual_seed(3)
    transformer = ZImageTransformer2DModel(
        all_patch_size=(2,), all_f_patch_size=(1,), in_channels=4, dim=32, n_layers=2, n_refiner_layers=1,
        n_heads=2, n_kv_heads=2, cap_feat_dim=16, axes_dims=[8, 4, 4], axes_lens=[1024, 32, 32])
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(8, 8, 8, 8), layers_per_block=1,
                        norm_num_groups=4, latent_channels=4, sample_size=32, scaling_factor=0.3611,
                        shift_factor=0.1159, use_quant_conv=False, use_post_quant_conv=False)
    for model in (transformer, vae):
        randomize(model)
    pipe = ZImagePipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**scheduler), vae=vae.eval(),
        text_encoder=Qwen3ForCausalLM.from_pretrained(folder / "text_encoder").eval(),
        tokenizer=AutoTokenizer.from_pretrained(folder / "tokenizer"), transformer=transformer.eval())
    pipe.save_pretrained(folder)
    return pipe


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("zimage")
    return folder, build(folder, SCHEDULER)


def ours(folder: Path, turbo: bool) -> imagegen.Pipeline:
    return variant(turbo=turbo).pipeline(weights=folder, dtype="float32")


def noise(batch: int, seed: int = 0) -> np.ndarray:
    w, h = SIZE
    return np.random.default_rng(seed).standard_normal((batch, 4, h // 8, w // 8)).astype(np.float32)


def reference(pipe, prompt, latents, steps, **kw) -> list[Image.Image]:
    prompt = list(prompt) if isinstance(prompt, list) else prompt  # diffusers templates the list in place
    return pipe(prompt=prompt, latents=torch.from_numpy(latents), num_inference_steps=steps, width=SIZE[0],
                height=SIZE[1], **kw).images


def test_turbo_matches_diffusers(checkpoint):
    folder, pipe = checkpoint
    latents = noise(2)
    prompts = ["a red fox in the snow", "Café 🦊"]  # different caption lengths in one batch
    want = reference(pipe, prompts, latents, 3, guidance_scale=0.0)
    got = ours(folder, True).generate(prompts, latents=latents, steps=3, width=SIZE[0], height=SIZE[1]).images
    assert_images_match(got, want)


@pytest.mark.parametrize("options", [
    {},
    {"cfg_normalization": 1.0},
    {"cfg_truncation": 0.1},  # normalized times are 0, 0.14, 0.4: CFG only on the first step
])
def test_base_cfg_matches_diffusers(checkpoint, options):
    folder, pipe = checkpoint
    latents = noise(1, seed=5)
    want = reference(pipe, "a lighthouse at dusk", latents, 3, guidance_scale=4.0, negative_prompt="blurry",
                     **options)
    got = ours(folder, False).generate("a lighthouse at dusk", negative_prompt="blurry", guidance=4.0,
                                       latents=latents, steps=3, width=SIZE[0], height=SIZE[1], **options).images
    assert_images_match(got, want)
    if options:  # the option really changed the picture
        plain = reference(pipe, "a lighthouse at dusk", latents, 3, guidance_scale=4.0, negative_prompt="blurry")
        assert np.abs(np.asarray(plain[0], np.int16) - np.asarray(got[0], np.int16)).max() > 5


def test_base_default_negative_and_batch(checkpoint):
    folder, pipe = checkpoint
    latents = noise(2, seed=6)
    want = reference(pipe, ["a cat", "two dogs on a sofa"], latents, 2, guidance_scale=3.0)
    got = ours(folder, False).generate(["a cat", "two dogs on a sofa"], guidance=3.0, latents=latents, steps=2,
                                       width=SIZE[0], height=SIZE[1]).images
    assert_images_match(got, want)


def test_dynamic_shift_scheduler(tmp_path):
    """The Z-Image base scheduler may shift with mu: the pipeline passes calculate_shift's mu."""
    pipe = build(tmp_path, {"num_train_timesteps": 1000, "use_dynamic_shifting": True, "base_shift": 0.5,
                            "max_shift": 1.15})
    latents = noise(1, seed=2)
    got = ours(tmp_path, True).generate("x", latents=latents, steps=2, width=SIZE[0], height=SIZE[1]).images
    assert_images_match(got, reference(pipe, "x", latents, 2, guidance_scale=0.0))


def test_turbo_refuses_cfg_options_and_bad_values(checkpoint):
    turbo, base = ours(checkpoint[0], True), ours(checkpoint[0], False)
    with pytest.raises(imagegen.InvalidOptionError, match="negative_prompt"):
        turbo.generate("x", negative_prompt="no", width=64, height=48)
    with pytest.raises(imagegen.InvalidOptionError, match="cfg_truncation"):
        turbo.generate("x", cfg_truncation=0.5, width=64, height=48)
    with pytest.raises(imagegen.InvalidOptionError, match="within"):
        base.generate("x", cfg_truncation=1.5, width=64, height=48)
    with pytest.raises(imagegen.InvalidOptionError, match="latents must have shape"):
        turbo.generate("x", latents=np.zeros((1, 4, 2, 2), np.float32), width=64, height=48)


def test_flux2_and_zimage_share_one_text_encoder(checkpoint, tmp_path, monkeypatch):
    """Both families condition on Qwen3: folders holding identical encoder weights load it once."""
    import shutil

    from diffusers import AutoencoderKLFlux2, Flux2KleinPipeline, Flux2Transformer2DModel

    folder, pipe = checkpoint
    flux = tmp_path / "klein"
    Flux2KleinPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True), tokenizer=pipe.tokenizer,
        text_encoder=pipe.text_encoder, is_distilled=True,
        vae=AutoencoderKLFlux2(block_out_channels=(8, 8, 8, 8), layers_per_block=1, norm_num_groups=4,
                               latent_channels=4),
        transformer=Flux2Transformer2DModel(in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=8,
                                            num_attention_heads=2, joint_attention_dim=48,
                                            axes_dims_rope=[2, 2, 2, 2], guidance_embeds=False),
    ).save_pretrained(flux)
    shutil.rmtree(flux / "text_encoder")
    shutil.copytree(folder / "text_encoder", flux / "text_encoder")  # a separate copy of the same files
    (flux / "imagegen.json").write_text('{"text_encoder_out_layers": [1, 2, 3], "max_sequence_length": 64}')
    zimage = ours(folder, True)
    klein = imagegen.registry.get("flux2-klein-4b").pipeline(weights=flux, dtype="float32")
    assert klein.text_encoder.model is zimage.text_encoder.model
    # each family still gets its own features (thinking template and layer -2 vs layers 1/2/3), and sharing changes
    # nothing: a Klein pipeline with an encoder of its own draws the same image
    assert klein.embed_prompts(["x"]).shape[-1] == 3 * zimage.embed_prompts(["x"])[0].shape[-1]
    shared = np.asarray(klein.generate("x", width=64, height=48, steps=1, seed=0).images[0])
    from imagegen.text import encoder as text_encoder

    monkeypatch.setattr(text_encoder, "_models", type(text_encoder._models)())
    monkeypatch.setattr(text_encoder, "_encoders", type(text_encoder._encoders)())
    alone = imagegen.registry.get("flux2-klein-4b").pipeline(weights=flux, dtype="float32")
    assert alone.text_encoder.model is not zimage.text_encoder.model
    assert np.array_equal(np.asarray(alone.generate("x", width=64, height=48, steps=1, seed=0).images[0]), shared)


def test_cli_model_options_and_reproduction(checkpoint, tmp_path):
    from typer.testing import CliRunner

    from imagegen.cli import get_app
    from imagegen.image import read_metadata

    out = tmp_path / "z.png"
    args = ["run", "-m", "zimage", "--weights", str(checkpoint[0]), "a cat", "--size", "64x48", "--steps", "2",
            "--seed", "1", "--dtype", "float32", "-o", str(out)]
    result = CliRunner().invoke(get_app(), [*args, "--option", "cfg_truncation=0.1", "-O", "cfg_normalization=true",
                                            "--negative", "dark", "--guidance", "3"])
    assert result.exit_code == 0, result.output
    meta = read_metadata(out)
    assert meta["options"] == {"cfg_truncation": 0.1, "cfg_normalization": True}
    again = CliRunner().invoke(get_app(), ["run", "--from", str(out), "-o", str(tmp_path / "again.png")])
    assert again.exit_code == 0, again.output
    assert np.array_equal(np.asarray(Image.open(out)), np.asarray(Image.open(tmp_path / "again.png")))
    bad = CliRunner().invoke(get_app(), [*args, "--option", "cfg_truncation=2"])
    assert bad.exit_code == 1 and "cfg_truncation must be within [0, 1]" in bad.output
