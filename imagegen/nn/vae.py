"""VAE building blocks in NHWC, shared by every AutoencoderKL: diffusers models/autoencoders/vae.py (Encoder,
Decoder), models/resnet.py (ResnetBlock2D), downsampling.py / upsampling.py, unets/unet_2d_blocks.py
(UNetMidBlock2D, DownEncoderBlock2D, UpDecoderBlock2D) and the mid-block Attention of attention_processor.py.

Activations stay NHWC and in the model dtype from end to end; only group-norm statistics are float32."""

from __future__ import annotations

from functools import partial

import mlx.core as mx
import mlx.nn as nn

RESNET_EPS = 1e-6  # diffusers' Encoder/Decoder pass resnet_eps=1e-6 to every block and norm
# Queries per attention call: head dim = channels (512) is beyond the fused kernels, so the fallback builds a
# [queries, H*W] score matrix; chunking bounds it (1024 px image: 16384 positions, 4096 x 16384 scores per chunk).
QUERY_CHUNK = 4096
# MLX convolves by unfolding its input (9x the input for a 3x3 kernel), and a lazy graph lets many such workspaces
# coexist: a 1024 px decode peaked at 23 GB on an H100. Large convolutions run in strips of rows whose unfolded
# input stays under this many bytes, each evaluated before the next; the VAE also evaluates layer by layer.
# H100, 1024 px decode (benchmarks/profile_vae_memory.py): 512 MB strips 105 ms / 5.9 GB above the weights, 2 GB
# 82 ms / 6.0 GB, unbounded 66 ms / 8.6 GB (60 ms / 23.8 GB without the layer-by-layer evaluation).
CONV_WORKSPACE_BYTES = 1 << 31
EVAL_EACH_LAYER = True  # the encoder's and decoder's blocks evaluate layer by layer (see CONV_WORKSPACE_BYTES)


@partial(mx.compile, shapeless=False)
def _group_norm(x: mx.array, weight: mx.array, bias: mx.array, groups: int, eps: float, silu: bool) -> mx.array:
    # Float32 statistics and one rounding to the model dtype, as torch's kernel. The sums run over positions
    # first (a contiguous column reduction of [B, H*W, C]), then over each group's channels: reducing the
    # strided [B, H*W, G, C/G] view in one pass took 800 ms at 1024x1024x128 on an H100 (this: a few ms).
    b, h, w, c = x.shape
    per_group = c // groups
    count = h * w * per_group
    xf = x.reshape(b, h * w, c).astype(mx.float32)
    mean = xf.sum(axis=1).reshape(b, groups, per_group).sum(axis=-1) / count
    centered = xf - mx.repeat(mean, per_group, axis=-1)[:, None]
    var = mx.square(centered).sum(axis=1).reshape(b, groups, per_group).sum(axis=-1) / count
    y = (centered * mx.repeat(mx.rsqrt(var + eps), per_group, axis=-1)[:, None]).reshape(b, h, w, c)
    y = y * weight + bias
    if silu:
        y = y * mx.sigmoid(y)
    return y.astype(x.dtype)


class GroupNorm(nn.Module):
    """torch.nn.GroupNorm on NHWC input (keys weight, bias), optionally fused with the SiLU that follows it."""

    def __init__(self, num_groups: int, num_channels: int, eps: float = RESNET_EPS):
        super().__init__()
        self.num_groups = num_groups
        self.eps = eps
        self.weight = mx.ones((num_channels,))
        self.bias = mx.zeros((num_channels,))

    def __call__(self, x: mx.array, silu: bool = False) -> mx.array:
        return _group_norm(x, self.weight, self.bias, self.num_groups, self.eps, silu)


class Conv3x3(nn.Conv2d):
    """nn.Conv2d(kernel 3, stride 1, padding 1) evaluated in strips of rows: the same result, bounded memory."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__(in_channels, out_channels, 3, padding=1)

    def __call__(self, x: mx.array) -> mx.array:
        b, h, w, c = x.shape
        rows = max(1, CONV_WORKSPACE_BYTES // (b * w * 9 * c * x.itemsize))
        if rows >= h:
            return mx.conv2d(x, self.weight, padding=1) + self.bias
        x = mx.pad(x, [(0, 0), (1, 1), (0, 0), (0, 0)])  # the top and bottom halo; columns pad in the conv
        strips = []
        for i in range(0, h, rows):
            strips.append(mx.conv2d(x[:, i : i + rows + 2], self.weight, padding=(0, 1)) + self.bias)
            mx.eval(strips[-1])  # one workspace at a time
        return mx.concatenate(strips, axis=1)


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
        h = self.conv1(self.norm1(x, silu=True))
        h = self.conv2(self.norm2(h, silu=True))
        if "conv_shortcut" in self:
            x = self.conv_shortcut(x)
        return x + h


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
    """Nearest-neighbour 2x upsampling, then a 3x3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = Conv3x3(channels, channels)

    def __call__(self, x: mx.array) -> mx.array:
        b, h, w, c = x.shape
        x = mx.broadcast_to(x[:, :, None, :, None, :], (b, h, 2, w, 2, c)).reshape(b, 2 * h, 2 * w, c)
        return self.conv(x)


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


class DownEncoderBlock2D(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, num_layers: int, groups: int, add_downsample: bool):
        super().__init__()
        self.resnets = [
            ResnetBlock2D(in_channels if i == 0 else out_channels, out_channels, groups) for i in range(num_layers)
        ]
        self.downsamplers = [Downsample2D(out_channels)] if add_downsample else []

    def __call__(self, x: mx.array) -> mx.array:
        for layer in (*self.resnets, *self.downsamplers):
            x = layer(x)
            if EVAL_EACH_LAYER:
                mx.eval(x)  # frees each layer's temporaries before the next (peak memory)
        return x


class UpDecoderBlock2D(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, num_layers: int, groups: int, add_upsample: bool):
        super().__init__()
        self.resnets = [
            ResnetBlock2D(in_channels if i == 0 else out_channels, out_channels, groups) for i in range(num_layers)
        ]
        self.upsamplers = [Upsample2D(out_channels)] if add_upsample else []

    def __call__(self, x: mx.array) -> mx.array:
        for layer in (*self.resnets, *self.upsamplers):
            x = layer(x)
            if EVAL_EACH_LAYER:
                mx.eval(x)  # frees each layer's temporaries before the next (peak memory)
        return x


class Encoder(nn.Module):
    """Image [B, H, W, in_channels] -> moments [B, H/f, W/f, 2 * out_channels] (f = 2 ** (blocks - 1))."""

    def __init__(self, in_channels: int, out_channels: int, block_out_channels: tuple[int, ...], layers_per_block: int,
                 norm_num_groups: int, double_z: bool = True, mid_block_add_attention: bool = True):
        super().__init__()
        channels = block_out_channels
        self.conv_in = Conv3x3(in_channels, channels[0])
        self.down_blocks = [
            DownEncoderBlock2D(channels[max(i - 1, 0)], c, layers_per_block, norm_num_groups,
                               add_downsample=i < len(channels) - 1)
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

    def __init__(self, in_channels: int, out_channels: int, block_out_channels: tuple[int, ...],
                 layers_per_block: int, norm_num_groups: int, mid_block_add_attention: bool = True):
        super().__init__()
        channels = tuple(reversed(block_out_channels))
        self.conv_in = Conv3x3(in_channels, channels[0])
        self.mid_block = UNetMidBlock2D(channels[0], norm_num_groups, mid_block_add_attention)
        self.up_blocks = [
            UpDecoderBlock2D(channels[max(i - 1, 0)], c, layers_per_block + 1, norm_num_groups,
                             add_upsample=i < len(channels) - 1)
            for i, c in enumerate(channels)
        ]
        self.conv_norm_out = GroupNorm(norm_num_groups, channels[-1])
        self.conv_out = Conv3x3(channels[-1], out_channels)

    def __call__(self, z: mx.array) -> mx.array:
        x = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(self.conv_norm_out(x, silu=True))
