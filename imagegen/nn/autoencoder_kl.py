"""The diffusers AutoencoderKL (the FLUX.1 / Z-Image VAE) in NHWC: diffusers models/autoencoders/autoencoder_kl.py,
with its tiled encode/decode (overlapping tiles, linear blending) and the pipelines' latent scale and shift.

VAEs are never quantized: they are small and their convolutions are sensitive to it."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal, Self

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from ..config import HFConfig
from ..weights import load_module, to_dtype
from . import row_split
from .vae_blocks import Decoder, Encoder

LOGVAR_RANGE = (-30.0, 20.0)  # diffusers DiagonalGaussianDistribution clamps logvar to this range


def _span(x: mx.array, axis: int, start: int | None, stop: int | None = None) -> mx.array:
    return x[(slice(None),) * axis + (slice(start, stop),)]


def _blend(a: mx.array, b: mx.array, extent: int, axis: int) -> mx.array:
    """b with its first `extent` rows (axis 1) or columns (axis 2) faded in from the end of a (blend_v / blend_h)."""
    extent = min(a.shape[axis], b.shape[axis], extent)
    if extent == 0:
        return b
    shape = [1, 1, 1, 1]
    shape[axis] = extent
    ramp = np.arange(extent) / extent  # float64 like diffusers' y / blend_extent, rounded once to float32
    w = mx.array(ramp.astype(np.float32).reshape(shape)).astype(b.dtype)
    w_above = mx.array((1 - ramp).astype(np.float32).reshape(shape)).astype(b.dtype)
    head = _span(a, axis, -extent) * w_above + _span(b, axis, 0, extent) * w
    return mx.concatenate([head, _span(b, axis, extent)], axis=axis)


def tiled(x: mx.array, fn: Callable[[mx.array], mx.array], tile_in: int, tile_out: int, overlap: float) -> mx.array:
    """Apply fn to overlapping tiles of NHWC x and blend the results, as diffusers' tiled_decode / _tiled_encode.

    Tiles of tile_in pixels start every tile_in * (1 - overlap); each output tile is blended with its (already
    blended) upper and left neighbours over tile_out * overlap pixels and cropped to tile_out minus that. Every
    tile is evaluated as soon as it is made and only the previous row is kept, so memory follows the tile size."""
    stride = int(tile_in * (1 - overlap))
    extent = int(tile_out * overlap)
    limit = tile_out - extent
    rows, above = [], None
    for i in range(0, x.shape[1], stride):
        row: list[mx.array] = []
        for j in range(0, x.shape[2], stride):
            tile = fn(x[:, i : i + tile_in, j : j + tile_in])
            if above is not None:
                tile = _blend(above[len(row)], tile, extent, axis=1)
            if row:
                tile = _blend(row[-1], tile, extent, axis=2)
            mx.eval(tile)
            row.append(tile)
        rows.append(mx.concatenate([t[:, :limit, :limit] for t in row], axis=2))
        mx.eval(rows[-1])
        above = row
    return mx.concatenate(rows, axis=1)


class AutoencoderKLConfig(HFConfig):
    """vae/config.json of a diffusers AutoencoderKL; defaults are diffusers' AutoencoderKL.__init__ defaults."""

    in_channels: int = 3
    out_channels: int = 3
    down_block_types: tuple[Literal["DownEncoderBlock2D"], ...] = ("DownEncoderBlock2D",)
    up_block_types: tuple[Literal["UpDecoderBlock2D"], ...] = ("UpDecoderBlock2D",)
    block_out_channels: tuple[int, ...] = (64,)
    layers_per_block: int = 1
    act_fn: Literal["silu", "swish"] = "silu"
    latent_channels: int = 4
    norm_num_groups: int = 32
    sample_size: int | tuple[int, ...] = 32  # also the default tile size of tiled encode/decode (pixels)
    scaling_factor: float = 0.18215
    shift_factor: float | None = None
    force_upcast: bool = True  # run float16 VAEs in float32 (diffusers' SD/SDXL pipelines do; bf16 needs no upcast)
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True


class AutoencoderKL(nn.Module):
    """Images [B, H, W, 3] in [-1, 1] <-> VAE latents [B, H/f, W/f, latent_channels], f = 2 ** (blocks - 1).

    encode/decode work in the raw latent space (diffusers' vae.encode(...).latent_dist / vae.decode); the
    *_latents methods add the pipelines' normalization, giving the latents a diffusion model sees."""

    config_class: type[AutoencoderKLConfig] = AutoencoderKLConfig

    def __init__(self, config: AutoencoderKLConfig, decoder_block_out_channels: tuple[int, ...] | None = None):
        super().__init__()
        self.config = config
        c = config
        self.encoder = Encoder(
            c.in_channels,
            c.latent_channels,
            c.block_out_channels,
            c.layers_per_block,
            c.norm_num_groups,
            double_z=True,
            mid_block_add_attention=c.mid_block_add_attention,
        )
        self.decoder = Decoder(
            c.latent_channels,
            c.out_channels,
            decoder_block_out_channels or c.block_out_channels,
            c.layers_per_block,
            c.norm_num_groups,
            mid_block_add_attention=c.mid_block_add_attention,
        )
        if c.use_quant_conv:
            self.quant_conv = nn.Conv2d(2 * c.latent_channels, 2 * c.latent_channels, 1)
        if c.use_post_quant_conv:
            self.post_quant_conv = nn.Conv2d(c.latent_channels, c.latent_channels, 1)

    @classmethod
    def from_folder(cls, folder: str | Path, dtype: str | mx.Dtype = "bfloat16") -> Self:
        """Build from folder/config.json and load folder/*.safetensors (diffusers layout). With force_upcast, a
        float16 request loads float32 weights, so encode and decode run in float32."""
        folder = Path(folder)
        config = cls.config_class.from_file(folder / "config.json")
        dtype = to_dtype(dtype)
        if config.force_upcast and dtype == mx.float16:
            dtype = mx.float32
        model = cls(config)
        load_module(model, folder, dtype)
        return model

    def sanitize(self, weights: dict[str, mx.array]) -> dict[str, mx.array]:
        """PyTorch conv weights [O, I, kh, kw] -> MLX [O, kh, kw, I]."""
        return {k: v.transpose(0, 2, 3, 1) if v.ndim == 4 else v for k, v in weights.items()}

    @property
    def dtype(self) -> mx.Dtype:
        """The compute dtype (that of the weights)."""
        return self.encoder.conv_in.weight.dtype

    @property
    def scale_factor(self) -> int:
        """Image pixels per latent pixel along each side."""
        return 2 ** (len(self.config.block_out_channels) - 1)

    @property
    def tile_size(self) -> int:
        """The default tile size in pixels: the config's sample_size, as diffusers' tile_sample_min_size."""
        size = self.config.sample_size
        return size[0] if isinstance(size, tuple) else size

    def _tile_sizes(self, tile_size: int | None) -> tuple[int, int]:
        """(tile side in pixels, tile side in latents), as diffusers' tile_sample_min_size / tile_latent_min_size."""
        pixels = tile_size or self.tile_size
        return pixels, int(pixels / self.scale_factor)

    def _encode_tile(self, x: mx.array) -> mx.array:
        h = self.encoder(x)
        return self.quant_conv(h) if "quant_conv" in self else h

    def _decode_tile(self, z: mx.array) -> mx.array:
        if "post_quant_conv" in self:
            z = self.post_quant_conv(z)
        return self.decoder(z)

    def encode_moments(
        self, images: mx.array, tile: bool | None = False, tile_size: int | None = None, tile_overlap: float = 0.25
    ) -> tuple[mx.array, mx.array]:
        """images [B, H, W, in_channels] in [-1, 1] -> (mean, logvar), each [B, H/f, W/f, latent_channels]."""
        x = images.astype(self.dtype)
        pixels, side = self._tile_sizes(tile_size)
        if (max(x.shape[1], x.shape[2]) > pixels) if tile is None else tile:
            moments = tiled(x, self._encode_tile, pixels, side, tile_overlap)
        else:
            moments = self._encode_tile(x)
        mean, logvar = mx.split(moments, 2, axis=-1)
        return mean, mx.clip(logvar, *LOGVAR_RANGE)

    def encode(
        self,
        images: mx.array,
        key: mx.array | None = None,
        tile: bool | None = False,
        tile_size: int | None = None,
        tile_overlap: float = 0.25,
    ) -> mx.array:
        """images [B, H, W, in_channels] in [-1, 1] -> latents [B, H/f, W/f, latent_channels]: the mean of the
        latent distribution (its mode, diffusers' sample_mode="argmax"), or a sample drawn with `key`."""
        mean, logvar = self.encode_moments(images, tile, tile_size, tile_overlap)
        if key is None:
            return mean
        return mean + mx.exp(0.5 * logvar) * mx.random.normal(mean.shape, dtype=mean.dtype, key=key)

    def decode(
        self,
        latents: mx.array,
        tile: bool | None = False,
        tile_size: int | None = None,
        tile_overlap: float = 0.25,
        group: mx.distributed.Group | None = None,
    ) -> mx.array:
        """latents [B, h, w, latent_channels] -> images [B, h*f, w*f, out_channels], about [-1, 1], not clipped.

        tile: True / False, or None to tile only latents larger than a tile; tile_size is in image pixels
        (default: sample_size, as diffusers' enable_tiling()), tile_overlap the overlapping fraction. group: ranks
        (imagegen.distributed) that split an untiled decode in bands of rows; each returns the whole image."""
        z = latents.astype(self.dtype)
        pixels, side = self._tile_sizes(tile_size)
        if (max(z.shape[1], z.shape[2]) > side) if tile is None else tile:
            return tiled(z, self._decode_tile, side, pixels, tile_overlap)
        if row_split.can_split(z.shape, group):
            return row_split.decode(self._decode_tile, z, group)
        return self._decode_tile(z)

    def normalize_latents(self, latents: mx.array) -> mx.array:
        """VAE latents -> diffusion latents: (z - shift_factor) * scaling_factor."""
        return (latents - (self.config.shift_factor or 0.0)) * self.config.scaling_factor

    def denormalize_latents(self, latents: mx.array) -> mx.array:
        """Diffusion latents -> VAE latents: z / scaling_factor + shift_factor (pipeline_z_image.py)."""
        return latents / self.config.scaling_factor + (self.config.shift_factor or 0.0)

    def encode_latents(self, images: mx.array, key: mx.array | None = None, **tiling: Any) -> mx.array:
        """images -> the normalized latents a diffusion model works on (mean, or a sample drawn with key); `tiling`
        are encode's tile, tile_size and tile_overlap."""
        return self.normalize_latents(self.encode(images, key, **tiling))

    def decode_latents(self, latents: mx.array, **options: Any) -> mx.array:
        """Normalized diffusion latents -> images (what the pipelines do before vae.decode); `options` are decode's
        tile, tile_size, tile_overlap and group."""
        return self.decode(self.denormalize_latents(latents), **options)
