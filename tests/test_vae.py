"""AutoencoderKL and the shared VAE blocks against diffusers (tiny random models, float32, CPU)."""

from __future__ import annotations

import json
import shutil

import mlx.core as mx
import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL as RefAutoencoderKL

from imagegen.nn import AutoencoderKL
from imagegen.nn.vae_blocks import GroupNorm
from imagegen.testing import randomize_norms

TINY = dict(
    block_out_channels=(32, 64),
    down_block_types=("DownEncoderBlock2D",) * 2,
    up_block_types=("UpDecoderBlock2D",) * 2,
    layers_per_block=1,
    norm_num_groups=8,
    latent_channels=16,
    scaling_factor=0.3611,
    shift_factor=0.1159,
)


def nhwc(t: torch.Tensor) -> mx.array:
    return mx.array(t.permute(0, 2, 3, 1).numpy())


def max_err(ours: mx.array, ref: torch.Tensor) -> float:
    """Max abs difference, ours NHWC vs reference NCHW."""
    return float(np.abs(np.array(ours.astype(mx.float32)).transpose(0, 3, 1, 2) - ref.float().numpy()).max())


def make_reference(folder, seed: int = 0, **overrides) -> RefAutoencoderKL:
    torch.manual_seed(seed)
    ref = RefAutoencoderKL(**{**TINY, **overrides}).eval()
    randomize_norms(ref)
    ref.save_pretrained(folder, safe_serialization=True)
    return ref


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    torch.manual_seed(1)
    return torch.rand(2, 3, 48, 40) * 2 - 1  # not square, not a multiple of the tile: edge tiles are partial


@pytest.fixture(scope="module")
def tiled_pair(tmp_path_factory):
    """A reference with sample_size 16 (tiles of 16 px / 8 latents) and our model loaded from its folder."""
    folder = tmp_path_factory.mktemp("vae_tiled")
    ref = make_reference(folder, seed=2, sample_size=16)
    return ref, AutoencoderKL.from_folder(folder, dtype="float32")


@pytest.mark.parametrize("silu", [False, True])
def test_group_norm_matches_torch(silu):
    torch.manual_seed(0)
    x = torch.randn(2, 32, 6, 5) * 3 + 1
    norm = torch.nn.GroupNorm(8, 32, eps=1e-6)
    randomize_norms(norm)
    ours = GroupNorm(8, 32, eps=1e-6)
    ours.weight, ours.bias = mx.array(norm.weight.detach().numpy()), mx.array(norm.bias.detach().numpy())
    with torch.no_grad():
        ref = norm(x)
        ref = torch.nn.functional.silu(ref) if silu else ref
    assert max_err(ours(nhwc(x), silu=silu), ref) < 2e-6


@pytest.mark.parametrize("quant_convs", [True, False])
def test_encode_decode_match_diffusers(tmp_path, images, quant_convs):
    ref = make_reference(tmp_path, use_quant_conv=quant_convs, use_post_quant_conv=quant_convs)
    vae = AutoencoderKL.from_folder(tmp_path, dtype="float32")
    assert ("quant_conv" in vae) == quant_convs
    with torch.no_grad():
        dist = ref.encode(images).latent_dist
        decoded = ref.decode(dist.mean).sample
        latents = (dist.mean - ref.config.shift_factor) * ref.config.scaling_factor
        from_latents = ref.decode(latents / ref.config.scaling_factor + ref.config.shift_factor).sample
    mean, logvar = vae.encode_moments(nhwc(images))
    assert mean.shape == (2, 24, 20, 16)
    assert max_err(mean, dist.mean) < 1e-5
    assert max_err(logvar, dist.logvar) < 1e-5
    assert max_err(vae.encode(nhwc(images)), dist.mean) < 1e-5
    assert max_err(vae.decode(nhwc(dist.mean)), decoded) < 3e-5
    assert max_err(vae.encode_latents(nhwc(images)), latents) < 1e-5
    assert max_err(vae.decode_latents(nhwc(latents)), from_latents) < 3e-5


def test_tiled_matches_diffusers_tiling(tiled_pair, images):
    ref, vae = tiled_pair
    with torch.no_grad():
        mean = ref.encode(images).latent_dist.mean
        decoded = ref.decode(mean).sample
        ref.enable_tiling()
        tiled_mean = ref.encode(images).latent_dist.mean
        tiled_decoded = ref.decode(mean).sample
        ref.disable_tiling()
    # tile=None tiles because the image (48 px) and latents (24) exceed the 16 px / 8 latent tiles of sample_size.
    assert max_err(vae.encode(nhwc(images), tile=None), tiled_mean) < 1e-5
    assert max_err(vae.decode(nhwc(mean), tile=None), tiled_decoded) < 3e-5
    assert max_err(vae.encode(nhwc(images), tile=True), tiled_mean) < 1e-5
    # tile=True tiles the same way: diffusers' tiled decode, blend included (a tiny random VAE is far from
    # tile-invariant, so the untiled `decoded` would not be a fair reference)
    assert max_err(vae.decode(nhwc(mean), tile=True), tiled_decoded) < 3e-5
    assert float((tiled_decoded - decoded).abs().max()) > 1e-3  # tiles really differ from one pass: this can fail


def test_tile_size_and_overlap_are_parameters(tiled_pair, images):
    ref, vae = tiled_pair
    with torch.no_grad():
        mean = ref.encode(images).latent_dist.mean
        ref.enable_tiling()
        ref.tile_sample_min_size, ref.tile_latent_min_size, ref.tile_overlap_factor = 32, 16, 0.5
        decoded = ref.decode(mean).sample
        encoded = ref.encode(images).latent_dist.mean
        ref.disable_tiling()
        ref.tile_sample_min_size, ref.tile_latent_min_size, ref.tile_overlap_factor = 16, 8, 0.25
    z = nhwc(mean)
    assert max_err(vae.decode(z, tile=True, tile_size=32, tile_overlap=0.5), decoded) < 3e-5
    assert max_err(vae.encode(nhwc(images), tile=True, tile_size=32, tile_overlap=0.5), encoded) < 1e-5
    # tile=None with a tile larger than the image does not tile; tile=False never does.
    untiled = vae.decode(z)
    assert mx.array_equal(vae.decode(z, tile=None, tile_size=512), untiled)
    assert mx.array_equal(vae.decode(z, tile=False), untiled)


def test_sample_with_key(tiled_pair, images):
    _, vae = tiled_pair
    x = nhwc(images)
    mean, logvar = vae.encode_moments(x)
    key = mx.random.key(7)
    sample = vae.encode(x, key=key)
    noise = mx.random.normal(mean.shape, key=key)
    assert mx.allclose(sample, mean + mx.exp(0.5 * logvar) * noise, atol=1e-6)
    assert mx.array_equal(sample, vae.encode(x, key=key))
    assert not mx.allclose(sample, mean)


def test_force_upcast_and_bfloat16(tmp_path, tiled_pair, images):
    ref, vae = tiled_pair
    ref.save_pretrained(tmp_path / "upcast", safe_serialization=True)
    assert AutoencoderKL.from_folder(tmp_path / "upcast", dtype="float16").dtype == mx.float32
    shutil.copytree(tmp_path / "upcast", tmp_path / "plain")
    config = json.loads((tmp_path / "plain" / "config.json").read_text())
    (tmp_path / "plain" / "config.json").write_text(json.dumps({**config, "force_upcast": False}))
    assert AutoencoderKL.from_folder(tmp_path / "plain", dtype="float16").dtype == mx.float16
    bf16 = AutoencoderKL.from_folder(tmp_path / "upcast", dtype="bfloat16")
    assert bf16.dtype == mx.bfloat16
    z = vae.encode(nhwc(images))
    out = bf16.decode(z)
    assert out.dtype == mx.bfloat16
    assert float(mx.abs(out.astype(mx.float32) - vae.decode(z)).max()) < 0.1


def test_conv_strips_match_one_convolution_and_bound_memory(monkeypatch):
    """Large 3x3 convolutions run in strips of rows (one unfolded workspace at a time): same result."""
    from imagegen.nn import vae_blocks as blocks

    conv = blocks.Conv3x3(16, 8)
    x = mx.random.normal((2, 37, 20, 16), key=mx.random.key(0))
    whole = conv(x)
    mx.eval(whole)
    monkeypatch.setattr(blocks, "CONV_WORKSPACE_BYTES", 20 * 9 * 16 * 4 * 2 * 5)  # 5 rows per strip
    start = mx.get_active_memory()
    mx.reset_peak_memory()
    strips = conv(x)
    mx.eval(strips)
    np.testing.assert_allclose(np.array(strips), np.array(whole), rtol=1e-5, atol=1e-5)
    unfolded = x.nbytes * 9
    assert mx.get_peak_memory() - start < unfolded / 2  # never the whole unfolded input at once


def test_small_stages_run_one_layer_ahead(monkeypatch):
    """AHEAD_BELOW_BYTES: stages whose input is at most that size keep a layer in flight, larger ones wait for each
    layer as LAYER_PACING says; the decode is the same either way."""
    from imagegen.nn import vae_blocks as blocks

    stage = blocks.ResnetStage(8, 8, num_layers=2, groups=4)
    x = mx.random.normal((1, 6, 6, 8), key=mx.random.key(1))
    made = []

    class Recorded(blocks.Pacer):
        def __init__(self, every, ahead):
            made.append((every, ahead))
            super().__init__(every, ahead)

    monkeypatch.setattr(blocks, "Pacer", Recorded)
    monkeypatch.setattr(blocks, "LAYER_PACING", (1, 0))
    monkeypatch.setattr(blocks, "AHEAD_BELOW_BYTES", 0)
    waiting = stage(x)
    monkeypatch.setattr(blocks, "AHEAD_BELOW_BYTES", x.nbytes)
    ahead = stage(x)
    monkeypatch.setattr(blocks, "AHEAD_BELOW_BYTES", x.nbytes - 1)
    stage(x)
    assert made == [(1, 0), (1, 1), (1, 0)]
    assert mx.array_equal(waiting, ahead)
