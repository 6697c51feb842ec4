"""The FLUX.2 VAE in NHWC: diffusers models/autoencoders/autoencoder_kl_flux2.py on the core AutoencoderKL, with the
latent 2x2 patchify and BatchNorm statistics that pipelines/flux2/pipeline_flux2_klein.py applies around it."""

from __future__ import annotations

import math
from typing import Literal

import mlx.core as mx
import mlx.nn as nn

from imagegen.nn import AutoencoderKL, AutoencoderKLConfig


def patchify_latents(latents: mx.array, patch: int = 2) -> mx.array:
    """[B, H, W, C] -> [B, H/p, W/p, C*p*p]; channel c*p*p + dy*p + dx, as diffusers' _patchify_latents."""
    b, h, w, c = latents.shape
    x = latents.reshape(b, h // patch, patch, w // patch, patch, c).transpose(0, 1, 3, 5, 2, 4)
    return x.reshape(b, h // patch, w // patch, c * patch * patch)


def unpatchify_latents(latents: mx.array, patch: int = 2) -> mx.array:
    """[B, h, w, C*p*p] -> [B, h*p, w*p, C]: the inverse of patchify_latents (diffusers' _unpatchify_latents)."""
    b, h, w, cp = latents.shape
    c = cp // (patch * patch)
    x = latents.reshape(b, h, w, c, patch, patch).transpose(0, 1, 4, 2, 5, 3)
    return x.reshape(b, h * patch, w * patch, c)


class Flux2VAEConfig(AutoencoderKLConfig):
    """vae/config.json of AutoencoderKLFlux2; defaults are its __init__ defaults (those of FLUX.2's VAE)."""

    down_block_types: tuple[Literal["DownEncoderBlock2D"], ...] = ("DownEncoderBlock2D",) * 4
    up_block_types: tuple[Literal["UpDecoderBlock2D"], ...] = ("UpDecoderBlock2D",) * 4
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    decoder_block_out_channels: tuple[int, ...] | None = None  # None: block_out_channels
    layers_per_block: int = 2
    latent_channels: int = 32
    sample_size: int | tuple[int, ...] = 1024
    scaling_factor: float = 1.0  # not a Flux2 key: the BatchNorm statistics normalize the latents instead
    batch_norm_eps: float = 1e-4
    batch_norm_momentum: float = 0.1
    patch_size: tuple[int, int] = (2, 2)


class AutoencoderKLFlux2(AutoencoderKL):
    """AutoencoderKL with 2x2 patchified, BatchNorm-normalized diffusion latents.

    encode/decode keep the raw VAE layout [B, H/8, W/8, latent_channels]; normalize_latents / encode_latents give
    the transformer's layout [B, H/16, W/16, 4 * latent_channels], and decode_latents takes it back to images."""

    config_class = Flux2VAEConfig

    def __init__(self, config: Flux2VAEConfig):
        super().__init__(config, decoder_block_out_channels=config.decoder_block_out_channels)
        if config.patch_size[0] != config.patch_size[1]:
            raise ValueError(f"Flux2 VAE patch_size must be square, got {config.patch_size}")
        # Only running_mean / running_var are used (BatchNorm2d(affine=False) of the checkpoint, in eval mode).
        features = math.prod(config.patch_size) * config.latent_channels
        self.bn = nn.BatchNorm(features, eps=config.batch_norm_eps, momentum=config.batch_norm_momentum, affine=False)

    def sanitize(self, weights: dict[str, mx.array]) -> dict[str, mx.array]:
        """Drop BatchNorm's num_batches_tracked (a training counter), then transpose the convs."""
        return super().sanitize({k: v for k, v in weights.items() if k != "bn.num_batches_tracked"})

    def _bn_stats(self, dtype: mx.Dtype) -> tuple[mx.array, mx.array]:
        # The pipeline takes sqrt(running_var + eps) in the stats' dtype, then casts both to the latents' dtype.
        std = mx.sqrt(self.bn.running_var + self.config.batch_norm_eps)
        return self.bn.running_mean.astype(dtype), std.astype(dtype)

    def normalize_latents(self, latents: mx.array) -> mx.array:
        """VAE latents [B, h, w, C] -> patchified, normalized [B, h/2, w/2, 4C] (the end of _encode_vae_image)."""
        mean, std = self._bn_stats(latents.dtype)
        return (patchify_latents(latents, self.config.patch_size[0]) - mean) / std

    def denormalize_latents(self, latents: mx.array) -> mx.array:
        """[B, h/2, w/2, 4C] diffusion latents -> VAE latents [B, h, w, C] (the pipeline's step before vae.decode)."""
        mean, std = self._bn_stats(latents.dtype)
        return unpatchify_latents(latents * std + mean, self.config.patch_size[0])
