"""VAE building blocks in NHWC, shared by every AutoencoderKL: diffusers models/autoencoders/vae.py (Encoder,
Decoder), models/resnet.py (ResnetBlock2D), downsampling.py / upsampling.py, unets/unet_2d_blocks.py
(UNetMidBlock2D, DownEncoderBlock2D, UpDecoderBlock2D) and the mid-block Attention of attention_processor.py.

Activations stay NHWC and in the model dtype from end to end; only group-norm statistics are float32."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from . import group_norm as cuda_group_norm
from . import phase_upsample, row_split
from .pacing import Pacer

RESNET_EPS = 1e-6  # diffusers' Encoder/Decoder pass resnet_eps=1e-6 to every block and norm
# Queries per attention call: head dim = channels (512) is beyond the fused kernels, so the fallback builds a
# [queries, H*W] score matrix; chunking bounds it (1024 px image: 16384 positions, 4096 x 16384 scores per chunk).
QUERY_CHUNK = 4096
# MLX convolves by unfolding its input (9x the input for a 3x3 kernel), and a lazy graph lets many such workspaces
# coexist. Convolutions whose unfolded input would pass this many bytes run in strips of rows, each evaluated before
# the next; the blocks also pace their graphs layer by layer (imagegen.nn.pacing) with LAYER_PACING = (every,
# ahead): (1, 0) waits for each layer, (1, 1) keeps two in flight, (0, 0) leaves the decode one graph; waiting for
# each layer has the lowest peak (benchmarks/profile_vae_memory.py, results in its docstring), and the large stages
# keep it (AHEAD_BELOW_BYTES).
CONV_WORKSPACE_BYTES = 1 << 33
LAYER_PACING = (1, 0)
# Stages whose input holds at most this many bytes keep one layer ahead (LAYER_PACING's `ahead` at least 1): waiting
# for each layer starves the GPU (an H200 idles ~8 ms of a 30 ms 1024 px decode waiting for the host to launch the
# next layer), and their temporaries are small enough; larger stages keep LAYER_PACING. 0: every stage as
# LAYER_PACING says. Stage inputs at 1024 px: 17 (mid, first up), 17, 67, 268 and 537 MB, so 600 MB runs every
# 1024 px stage ahead and makes the two largest of a 2048 px decode wait (benchmarks/bench_vae.py --sweep, H200,
# results in benchmarks/results/).
AHEAD_BELOW_BYTES = 600 << 20


def _group_rows(x: mx.array, groups: int) -> mx.array:
    """x [B, H, W, C] -> [B, groups, H * W * C / groups]: each group's positions and channels one row."""
    b, h, w, c = x.shape
    return x.reshape(b, h * w, groups, c // groups).transpose(0, 2, 1, 3).reshape(b, groups, h * w * (c // groups))


def _group_norm(x: mx.array, weight: mx.array, bias: mx.array, groups: int, eps: float, silu: bool) -> mx.array:
    # Each group's positions and channels made one contiguous row, normalized by mx.fast.layer_norm (float32
    # statistics inside the kernel, no float32 copy of the tensor), then the channel affine (and SiLU) fused with
    # the transpose back. H100, 1024x1024x256 bf16: the float32 formulation peaked at 9x the input (4.8 GB).
    rows = _group_rows(x, groups)
    return _affine(mx.fast.layer_norm(rows, None, None, eps), weight, bias, x.shape, silu)


def _split_group_norm(
    x: mx.array, weight: mx.array, bias: mx.array, groups: int, eps: float, silu: bool, split: row_split.RowSplit
) -> mx.array:
    """_group_norm of a band of rows, its statistics summed over every band (imagegen.nn.row_split). The sums are
    of x minus a shift common to all ranks (near the data), so float32 keeps their precision."""
    rows = _group_rows(x, groups).astype(mx.float32)
    shift = split.sum(rows[..., :1]) / split.size
    count = split.total_rows(x) * x.shape[2] * (x.shape[3] // groups)
    centred = rows - shift
    sums = split.sum(mx.stack([centred.sum(axis=-1, keepdims=True), mx.square(centred).sum(axis=-1, keepdims=True)]))
    mean = sums[0] / count
    rstd = mx.rsqrt(mx.maximum(sums[1] / count - mean * mean, 0.0) + eps)
    return _affine(((centred - mean) * rstd).astype(x.dtype), weight, bias, x.shape, silu)


@partial(mx.compile, shapeless=False)
def _affine(rows: mx.array, weight: mx.array, bias: mx.array, shape: tuple[int, ...], silu: bool) -> mx.array:
    b, h, w, c = shape
    groups = rows.shape[1]
    y = rows.reshape(b, groups, h * w, c // groups).transpose(0, 2, 1, 3).reshape(b, h, w, c)
    y = y.astype(mx.float32) * weight + bias
    if silu:
        y = y * mx.sigmoid(y)
    return y.astype(rows.dtype)


class GroupNorm(nn.Module):
    """torch.nn.GroupNorm on NHWC input (keys weight, bias), optionally fused with the SiLU that follows it (on CUDA
    in two passes over the tensor: imagegen.nn.group_norm) and with the bias of the convolution before it."""

    def __init__(self, num_groups: int, num_channels: int, eps: float = RESNET_EPS):
        super().__init__()
        self.num_groups = num_groups
        self.eps = eps
        self.weight = mx.ones((num_channels,))
        self.bias = mx.zeros((num_channels,))

    def __call__(self, x: mx.array, silu: bool = False, input_bias: mx.array | None = None) -> mx.array:
        """The norm of x + input_bias [C] (a convolution's bias, left out of its output: one pass fewer)."""
        split = row_split.current()  # set: x is one band of the map's rows, statistics are over every band
        if cuda_group_norm.supported(x, self.num_groups):
            return cuda_group_norm.group_norm(
                x, self.weight, self.bias, self.num_groups, self.eps, silu, split, input_bias
            )
        if input_bias is not None:
            x = x + input_bias
        if split is not None:
            return _split_group_norm(x, self.weight, self.bias, self.num_groups, self.eps, silu, split)
        return _group_norm(x, self.weight, self.bias, self.num_groups, self.eps, silu)


def _in_strips(x: mx.array, unfolded_row_bytes: int, convolve: Callable[[mx.array, Any], mx.array]) -> mx.array:
    """convolve(x, padding) for a conv with a one-pixel halo, x [B, H, W, C]: whole (padding 1) when the unfolded
    input (`unfolded_row_bytes` per row of x) fits CONV_WORKSPACE_BYTES and x is not split over ranks, else in strips
    of rows, each evaluated before the next (one workspace at a time). The strips carry their top and bottom halo
    (the neighbouring bands' rows when split over ranks, else zeros); columns pad in the conv (padding (0, 1))."""
    h = x.shape[1]
    rows = max(1, CONV_WORKSPACE_BYTES // unfolded_row_bytes)
    split = row_split.current()
    if rows >= h and split is None:
        return convolve(x, 1)
    x = split.with_halo(x) if split is not None else mx.pad(x, [(0, 0), (1, 1), (0, 0), (0, 0)])
    strips = []
    for i in range(0, h, rows):
        strips.append(convolve(x[:, i : i + rows + 2], (0, 1)))
        mx.eval(strips[-1])
    return mx.concatenate(strips, axis=1)


def _conv(x: mx.array, weight: mx.array, padding: Any, bias: mx.array | None) -> mx.array:
    y = mx.conv2d(x, weight, padding=padding)
    return y if bias is None else y + bias


@partial(mx.compile, shapeless=True)
def _residual(x: mx.array, h: mx.array, bias: mx.array) -> mx.array:
    """x + (h + bias) in one pass: a resnet's sum with its last convolution's bias (rounded as two adds)."""
    return x + (h + bias)


class Conv3x3(nn.Conv2d):
    """nn.Conv2d(kernel 3, stride 1, padding 1) evaluated in strips of rows: the same result, bounded memory."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__(in_channels, out_channels, 3, padding=1)

    def __call__(self, x: mx.array, add_bias: bool = True) -> mx.array:
        """add_bias False: the caller adds self.bias in a pass it makes anyway (a norm, a residual sum)."""
        b, _, w, c = x.shape
        bias = self.bias if add_bias else None
        return _in_strips(x, b * w * 9 * c * x.itemsize, lambda x, padding: _conv(x, self.weight, padding, bias))


class ResnetBlock2D(nn.Module):
    """norm1 -> SiLU -> conv1 -> norm2 -> SiLU -> conv2, plus the (1x1-projected) input. No time embedding."""

    def __init__(self, in_channels: int, out_channels: int, groups: int, eps: float = RESNET_EPS):
        super().__init__()
        self.norm1 = GroupNorm(groups, in_channels, eps)
        self.conv1 = Conv3x3(in_channels, out_channels)
        self.norm2 = GroupNorm(groups, out_channels, eps)
        self.conv2 = Conv3x3(out_channels, out_channels)
        if in_channels != out_channels:
            self.conv_shortcut = nn.Conv2d(in_channels, out_channels, 1)

    def __call__(self, x: mx.array) -> mx.array:
        # the convolutions' biases join the passes that follow them: conv1's the norm, conv2's the residual sum
        h = self.conv1(self.norm1(x, silu=True), add_bias=False)
        h = self.conv2(self.norm2(h, silu=True, input_bias=self.conv1.bias), add_bias=False)
        if "conv_shortcut" in self:
            x = self.conv_shortcut(x)
        return _residual(x, h, self.conv2.bias)


class Attention(nn.Module):
    """The VAE mid-block self-attention: group norm, one head over all H*W positions, residual."""

    def __init__(self, channels: int, groups: int, eps: float = RESNET_EPS):
        super().__init__()
        self.group_norm = GroupNorm(groups, channels, eps)
        self.to_q = nn.Linear(channels, channels)
        self.to_k = nn.Linear(channels, channels)
        self.to_v = nn.Linear(channels, channels)
        self.to_out = [nn.Linear(channels, channels)]

    def __call__(self, x: mx.array) -> mx.array:
        b, h, w, c = x.shape
        t = self.group_norm(x).reshape(b, 1, h * w, c)  # [B, heads=1, L, C]: a free reshape of NHWC
        q, k, v = self.to_q(t), self.to_k(t), self.to_v(t)
        split = row_split.current()
        if split is not None:  # this band's queries attend over every band's positions
            k, v = (split.gather(a.reshape(b, h, w, c)).reshape(b, 1, -1, c) for a in (k, v))
        chunks = [
            mx.fast.scaled_dot_product_attention(q[:, :, i : i + QUERY_CHUNK], k, v, scale=c**-0.5)
            for i in range(0, h * w, QUERY_CHUNK)
        ]
        out = chunks[0] if len(chunks) == 1 else mx.concatenate(chunks, axis=2)
        return x + self.to_out[0](out).reshape(b, h, w, c)


class Downsample2D(nn.Module):
    """Stride-2 3x3 conv after zero padding of one pixel on the bottom and right (diffusers padding=0 case)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2)

    def __call__(self, x: mx.array) -> mx.array:
        # The asymmetric pad goes into the convolution itself rather than an mx.pad copy.
        y = mx.conv_general(x, self.conv.weight, stride=2, padding=([0, 0], [1, 1]))
        return y + self.conv.bias


class Upsample2D(nn.Module):
    """Nearest-neighbour 2x upsampling, then a 3x3 conv: computed as four 2x2 convs of the small input
    (imagegen.nn.phase_upsample), in strips of rows as Conv3x3 when the input is very large."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = Conv3x3(channels, channels)

    def __call__(self, x: mx.array) -> mx.array:
        b, _, w, c = x.shape
        weight, bias = phase_upsample.phase_weights(self.conv.weight), self.conv.bias
        return _in_strips(
            x,
            b * (w + 1) * 4 * c * x.itemsize,
            lambda x, padding: phase_upsample.interleave(mx.conv2d(x, weight, padding=padding), bias),
        )


class UNetMidBlock2D(nn.Module):
    """resnet -> attention -> resnet (the attention is optional: mid_block_add_attention)."""

    def __init__(self, channels: int, groups: int, add_attention: bool = True):
        super().__init__()
        self.resnets = [ResnetBlock2D(channels, channels, groups), ResnetBlock2D(channels, channels, groups)]
        self.attentions = [Attention(channels, groups)] if add_attention else []

    def __call__(self, x: mx.array) -> mx.array:
        x = self.resnets[0](x)
        for attention in self.attentions:
            x = attention(x)
        return self.resnets[1](x)


def _run_layers(layers, x: mx.array) -> mx.array:
    """Apply layers in turn, bounding how many layers' temporaries are alive at once (LAYER_PACING)."""
    every, ahead = LAYER_PACING
    if every and x.nbytes <= AHEAD_BELOW_BYTES:
        ahead = max(ahead, 1)
    pace = Pacer(every, ahead)
    for layer in layers:
        x = layer(x)
        pace(x)
    if not ahead:  # the next stage allocates after this one's last layer is done
        pace.finish()
    return x


class ResnetStage(nn.Module):
    """diffusers' DownEncoderBlock2D (`downsample`) and UpDecoderBlock2D (`upsample`): resnets, then at most one
    resampler under the checkpoint's name for it."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        num_layers: int,
        groups: int,
        downsample: bool = False,
        upsample: bool = False,
    ):
        super().__init__()
        self.resnets = [
            ResnetBlock2D(in_channels if i == 0 else out_channels, out_channels, groups) for i in range(num_layers)
        ]
        self.downsamplers = [Downsample2D(out_channels)] if downsample else []
        self.upsamplers = [Upsample2D(out_channels)] if upsample else []

    def __call__(self, x: mx.array) -> mx.array:
        return _run_layers((*self.resnets, *self.downsamplers, *self.upsamplers), x)


class Encoder(nn.Module):
    """Image [B, H, W, in_channels] -> moments [B, H/f, W/f, 2 * out_channels] (f = 2 ** (blocks - 1))."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        block_out_channels: tuple[int, ...],
        layers_per_block: int,
        norm_num_groups: int,
        double_z: bool = True,
        mid_block_add_attention: bool = True,
    ):
        super().__init__()
        channels = block_out_channels
        self.conv_in = Conv3x3(in_channels, channels[0])
        self.down_blocks = [
            ResnetStage(channels[max(i - 1, 0)], c, layers_per_block, norm_num_groups, downsample=i < len(channels) - 1)
            for i, c in enumerate(channels)
        ]
        self.mid_block = UNetMidBlock2D(channels[-1], norm_num_groups, mid_block_add_attention)
        self.conv_norm_out = GroupNorm(norm_num_groups, channels[-1])
        self.conv_out = Conv3x3(channels[-1], 2 * out_channels if double_z else out_channels)

    def __call__(self, x: mx.array) -> mx.array:
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
        x = self.mid_block(x)
        return self.conv_out(self.conv_norm_out(x, silu=True))


class Decoder(nn.Module):
    """Latents [B, h, w, in_channels] -> image [B, h*f, w*f, out_channels] (f = 2 ** (blocks - 1))."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        block_out_channels: tuple[int, ...],
        layers_per_block: int,
        norm_num_groups: int,
        mid_block_add_attention: bool = True,
    ):
        super().__init__()
        channels = tuple(reversed(block_out_channels))
        self.conv_in = Conv3x3(in_channels, channels[0])
        self.mid_block = UNetMidBlock2D(channels[0], norm_num_groups, mid_block_add_attention)
        self.up_blocks = [
            ResnetStage(
                channels[max(i - 1, 0)], c, layers_per_block + 1, norm_num_groups, upsample=i < len(channels) - 1
            )
            for i, c in enumerate(channels)
        ]
        self.conv_norm_out = GroupNorm(norm_num_groups, channels[-1])
        self.conv_out = Conv3x3(channels[-1], out_channels)

    def __call__(self, z: mx.array) -> mx.array:
        x = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(self.conv_norm_out(x, silu=True))
