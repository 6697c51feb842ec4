"""FLUX.2 VAE parity with diffusers' AutoencoderKLFlux2 and Flux2KleinPipeline's latent math (tiny, float32, CPU)."""

from __future__ import annotations

from types import SimpleNamespace

import mlx.core as mx
import numpy as np
import pytest
import torch
from diffusers import AutoencoderKLFlux2 as RefAutoencoderKLFlux2
from diffusers import Flux2KleinPipeline
from imagegen_flux2.vae import AutoencoderKLFlux2, Flux2VAEConfig, patchify_latents, unpatchify_latents

from imagegen.testing import randomize_norms, sibling_module

tiny = sibling_module(__file__, "tiny")

TINY = dict(
    block_out_channels=(32, 64),
    decoder_block_out_channels=(16, 32),
    down_block_types=("DownEncoderBlock2D",) * 2,
    up_block_types=("UpDecoderBlock2D",) * 2,
    layers_per_block=1,
    norm_num_groups=8,
    latent_channels=8,
    sample_size=16,
)


def nhwc(t: torch.Tensor) -> mx.array:
    return mx.array(t.permute(0, 2, 3, 1).numpy())


def max_err(ours: mx.array, ref: torch.Tensor) -> float:
    return float(np.abs(np.array(ours).transpose(0, 3, 1, 2) - ref.numpy()).max())


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """A tiny reference with random group norms and BatchNorm statistics, and ours loaded from its folder."""
    torch.manual_seed(0)
    ref = RefAutoencoderKLFlux2(**TINY).eval()
    randomize_norms(ref)
    with torch.no_grad():
        ref.bn.running_mean.normal_(0.0, 0.5)
        ref.bn.running_var.uniform_(0.5, 2.0)
        ref.bn.num_batches_tracked.fill_(1234)
    folder = tmp_path_factory.mktemp("flux2_vae")
    ref.save_pretrained(folder, safe_serialization=True)
    return ref, AutoencoderKLFlux2.from_folder(folder, dtype="float32")


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    torch.manual_seed(1)
    return torch.rand(2, 3, 32, 24) * 2 - 1


def bn_stats(ref) -> tuple[torch.Tensor, torch.Tensor]:
    mean = ref.bn.running_mean.view(1, -1, 1, 1)
    return mean, torch.sqrt(ref.bn.running_var.view(1, -1, 1, 1) + ref.config.batch_norm_eps)


def test_patchify_matches_pipeline():
    torch.manual_seed(0)
    z = torch.randn(2, 8, 6, 4)
    packed = Flux2KleinPipeline._patchify_latents(z)
    assert max_err(patchify_latents(nhwc(z)), packed) == 0
    assert max_err(unpatchify_latents(nhwc(packed)), Flux2KleinPipeline._unpatchify_latents(packed)) == 0
    assert max_err(unpatchify_latents(patchify_latents(nhwc(z))), z) == 0


def test_config_of_flux2():
    config = Flux2VAEConfig.from_dict(tiny.VAE_CONFIG)
    assert config.latent_channels == 32 and config.patch_size == (2, 2) and config.force_upcast
    assert config.unknown_keys == ()
    assert Flux2VAEConfig() == Flux2VAEConfig.from_dict({})  # the defaults are the FLUX.2 VAE


def test_encode_decode_match_diffusers(pair, images):
    ref, vae = pair
    assert set(vae.bn.keys()) >= {"running_mean", "running_var"}
    with torch.no_grad():
        dist = ref.encode(images).latent_dist
        decoded = ref.decode(dist.mean).sample
    mean = vae.encode(nhwc(images))
    assert mean.shape == (2, 16, 12, 8)
    assert max_err(mean, dist.mean) < 1e-5
    assert max_err(vae.decode(nhwc(dist.mean)), decoded) < 3e-5


def test_latents_match_pipeline(pair, images):
    """encode_latents is _encode_vae_image; decode_latents is the BN denormalize + unpatchify + decode of __call__."""
    ref, vae = pair
    pipe = SimpleNamespace(vae=ref, _patchify_latents=Flux2KleinPipeline._patchify_latents)
    with torch.no_grad():
        latents = Flux2KleinPipeline._encode_vae_image(pipe, images, generator=None)
        mean, std = bn_stats(ref)
        decoded = ref.decode(Flux2KleinPipeline._unpatchify_latents(latents * std + mean)).sample
    ours = vae.encode_latents(nhwc(images))
    assert ours.shape == (2, 8, 6, 32)
    assert max_err(ours, latents) < 2e-5
    assert max_err(vae.normalize_latents(vae.encode(nhwc(images))), latents) < 2e-5
    assert max_err(vae.decode_latents(nhwc(latents)), decoded) < 3e-5


def test_tiled_decode_matches_diffusers(pair, images):
    ref, vae = pair
    with torch.no_grad():
        z = ref.encode(images).latent_dist.mean
        ref.enable_tiling()
        decoded = ref.decode(z).sample
        encoded = ref.encode(images).latent_dist.mean
        ref.disable_tiling()
    assert max_err(vae.decode(nhwc(z), tile=None), decoded) < 3e-5
    assert max_err(vae.encode(nhwc(images), tile=None), encoded) < 1e-5
