"""BFL's FLUX.2 small decoder: its config builds our VAE, and a VAE folder given with `vae=` (or paired by a model id)
decodes exactly as diffusers' Flux2KleinPipeline does with that AutoencoderKLFlux2. Runs on the bundled demo model
with a tiny-scaled small decoder: the demo's encoder and latent statistics, a narrower decoder."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKLFlux2 as RefAutoencoderKLFlux2
from diffusers import Flux2KleinPipeline
from imagegen_flux2.plugin import DEMO, SMALL_DECODER
from imagegen_flux2.vae import AutoencoderKLFlux2, Flux2VAEConfig
from mlx.utils import tree_flatten
from typer.testing import CliRunner

import imagegen
from imagegen.cli import get_app
from imagegen.image import read_metadata
from imagegen.testing import assert_images_match, randomize_norms, sibling_module

tiny = sibling_module(__file__, "tiny")

# config.json of black-forest-labs/FLUX.2-small-decoder: the FLUX.2 VAE's (without force_upcast) with a narrower
# decoder (diffusers PR 13428)
SMALL_DECODER_CONFIG = {
    **{k: v for k, v in tiny.VAE_CONFIG.items() if k != "force_upcast"},
    "decoder_block_out_channels": [96, 192, 384, 384],
}
SIZE = 64
STEPS = 2


def test_small_decoder_config_builds_the_reference_decoder():
    """Every decoder weight of the full-size small decoder has the shape diffusers gives it (convs as NHWC)."""
    config = Flux2VAEConfig.from_dict(SMALL_DECODER_CONFIG)
    assert config.unknown_keys == () and config.decoder_block_out_channels == (96, 192, 384, 384)
    ours = {k: tuple(v.shape) for k, v in tree_flatten(AutoencoderKLFlux2(config).decoder.parameters())}
    kwargs = {k: v for k, v in SMALL_DECODER_CONFIG.items() if not k.startswith("_")}
    with torch.device("meta"):  # shapes only
        reference = RefAutoencoderKLFlux2(**kwargs).decoder.state_dict()
    want = {
        k: tuple(v.shape[:1] + v.shape[2:] + v.shape[1:2]) if v.ndim == 4 else tuple(v.shape)
        for k, v in reference.items()
    }
    assert ours == want


@pytest.fixture(scope="module")
def small_decoder(tmp_path_factory):
    """The demo's VAE with a decoder half as wide (random weights): the shape of BFL's full encoder + small
    decoder file, scaled down."""
    demo = RefAutoencoderKLFlux2.from_pretrained(DEMO / "vae").eval()
    config = {k: v for k, v in demo.config.items() if not k.startswith("_")}
    config["decoder_block_out_channels"] = (8, 16, 32, 32)
    torch.manual_seed(4)
    small = RefAutoencoderKLFlux2(**config).eval()
    randomize_norms(small.decoder)
    kept = {k: v for k, v in demo.state_dict().items() if not k.startswith(("decoder.", "post_quant_conv."))}
    small.load_state_dict(kept, strict=False)
    folder = tmp_path_factory.mktemp("small_decoder")
    small.save_pretrained(folder)
    return folder, small


def latents() -> np.ndarray:
    return np.random.default_rng(3).standard_normal((1, 32, SIZE // 16, SIZE // 16)).astype(np.float32)


def reference(vae) -> list:
    pipe = Flux2KleinPipeline.from_pretrained(DEMO, vae=vae, torch_dtype=torch.float32)
    return pipe(
        prompt="a red square",
        latents=torch.from_numpy(latents()),
        num_inference_steps=STEPS,
        width=SIZE,
        height=SIZE,
        max_sequence_length=32,
        text_encoder_out_layers=(1, 2, 3),
    ).images


def test_vae_folder_matches_diffusers(small_decoder):
    folder, small = small_decoder
    pipe = imagegen.registry.get("flux2-demo").pipeline(vae=folder, dtype="float32")
    assert pipe.components == {"vae": str(folder)}
    assert pipe.vae.config.decoder_block_out_channels == (8, 16, 32, 32)
    got = pipe.generate("a red square", latents=latents(), steps=STEPS, width=SIZE, height=SIZE).images
    assert_images_match(got, reference(small))
    standard = imagegen.registry.get("flux2-demo").pipeline(dtype="float32")
    plain = standard.generate("a red square", latents=latents(), steps=STEPS, width=SIZE, height=SIZE).images
    assert np.abs(np.asarray(plain[0], np.int16) - np.asarray(got[0], np.int16)).max() > 20  # another decoder


def test_model_id_pairs_the_small_decoder_from_the_cache(small_decoder, tmp_path, monkeypatch):
    folder, _ = small_decoder
    snapshot = tmp_path / "hub" / f"models--{SMALL_DECODER.replace('/', '--')}" / "snapshots" / "abc"
    snapshot.parent.mkdir(parents=True)
    snapshot.symlink_to(folder, target_is_directory=True)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    spec = imagegen.registry.get("flux2-klein-4b-small-decoder")
    assert spec.extra["vae"] == SMALL_DECODER and spec.hf_repo == imagegen.registry.get("flux2-klein-4b").hf_repo
    pipe = spec.pipeline(weights=DEMO, dtype="float32")  # the demo is a distilled Klein checkpoint
    assert pipe.components == {"vae": SMALL_DECODER}
    assert pipe.vae.config.decoder_block_out_channels == (8, 16, 32, 32)


def test_cli_vae_is_recorded_and_replayed(small_decoder, tmp_path, monkeypatch):
    folder, _ = small_decoder
    monkeypatch.chdir(tmp_path)
    args = ["run", "--model", "flux2-demo", "a red square", "--size", "64x64", "--steps", "1", "--seed", "3"]
    first = CliRunner().invoke(get_app(), [*args, "--vae", str(folder), "-o", "a.png"])
    assert first.exit_code == 0, first.output
    assert read_metadata(tmp_path / "a.png")["components"] == {"vae": str(folder)}
    plain = CliRunner().invoke(get_app(), ["run", "--from", "a.png", "-o", "c.png"])  # a PNG never picks a VAE
    assert plain.exit_code == 0 and "made with --vae" in plain.output and "pass --vae" in plain.output
    assert read_metadata(tmp_path / "c.png")["components"] == {}
    again = CliRunner().invoke(get_app(), ["run", "--from", "a.png", "--vae", str(folder), "-o", "b.png"])
    assert again.exit_code == 0, again.output
    assert read_metadata(tmp_path / "b.png")["components"] == {"vae": str(folder)}
    assert np.array_equal(
        np.asarray(imagegen.image.load_image(tmp_path / "a.png")),
        np.asarray(imagegen.image.load_image(tmp_path / "b.png")),
    )
    missing = CliRunner().invoke(get_app(), [*args, "--vae", str(tmp_path / "nowhere")])
    assert missing.exit_code != 0 and "--vae" in missing.output and "Traceback" not in missing.output
