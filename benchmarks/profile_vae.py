"""Where the FLUX.2 VAE decode spends its time on this device: whole decode, each stage, and the candidate
implementations of its primitives (group norm, 3x3 conv, the mid-block attention), bf16, random weights."""

from __future__ import annotations

import json
import statistics
import sys
import time
from functools import partial

import mlx.core as mx
import mlx.nn as nn
from imagegen_flux2.vae import AutoencoderKLFlux2, Flux2VAEConfig
from mlx.utils import tree_map

from imagegen.nn import phase_upsample
from imagegen.nn import vae_blocks as blocks


def timed(fn, *args, repeats: int = 3) -> float:
    for _ in range(2):
        mx.eval(fn(*args))
    runs = []
    for _ in range(repeats):
        mx.synchronize()
        start = time.perf_counter()
        mx.eval(fn(*args))
        mx.synchronize()
        runs.append((time.perf_counter() - start) * 1e3)
    return statistics.median(runs)


def emit(**record) -> None:
    print(json.dumps(record), flush=True)


def _nearest_then_conv(x: mx.array, weight: mx.array, bias: mx.array) -> mx.array:
    b, h, w, c = x.shape
    big = mx.broadcast_to(x[:, :, None, :, None, :], (b, h, 2, w, 2, c)).reshape(b, 2 * h, 2 * w, c)
    return mx.conv2d(big, weight, padding=1) + bias


def upsample_variants(size: int) -> None:
    """The decoder's three upsamplings at this image size: the phase form (Upsample2D) against nearest upsampling
    then a 3x3 conv, and the phase form's two passes alone (the 2x2 conv, the interleaving copy)."""
    for side, c in ((size // 8, 512), (size // 4, 512), (size // 2, 256)):
        up = blocks.Upsample2D(c)
        up.set_dtype(mx.bfloat16)
        mx.eval(up.parameters())
        x = mx.random.normal((1, side, side, c)).astype(mx.bfloat16)
        weight, bias = up.conv.weight, up.conv.bias
        phases = phase_upsample.phase_weights(weight)
        z = mx.conv2d(x, phases, padding=1)
        mx.eval(phases, z)
        emit(
            what="upsample",
            shape=[side, side, c],
            phases_ms=timed(up, x),
            nearest_then_conv_ms=timed(_nearest_then_conv, x, weight, bias),
            phase_conv_ms=timed(partial(mx.conv2d, padding=1), x, phases),
            interleave_ms=timed(phase_upsample.interleave, z, bias),
        )


def main() -> None:
    size = int(sys.argv[1]) if len(sys.argv) > 1 and sys.argv[1].isdigit() else 1024
    if "--upsample" in sys.argv:
        return upsample_variants(size)
    vae = AutoencoderKLFlux2(Flux2VAEConfig())
    vae.set_dtype(mx.bfloat16)
    if "--as-loaded" in sys.argv:  # conv weights as views of a transposed layout, as sanitize leaves them
        vae.update(
            tree_map(lambda w: w.transpose(0, 3, 1, 2).transpose(0, 2, 3, 1) if w.ndim == 4 else w, vae.parameters())
        )
    mx.eval(vae.parameters())
    dec = vae.decoder
    z = mx.random.normal((1, size // 8, size // 8, 32)).astype(mx.bfloat16)
    emit(what="decode", size=size, as_loaded="--as-loaded" in sys.argv, ms=timed(lambda z: vae.decode(z), z))
    x = dec.conv_in(vae.post_quant_conv(z))
    emit(what="mid.resnet0", ms=timed(dec.mid_block.resnets[0], x))
    emit(what="mid.attention", ms=timed(dec.mid_block.attentions[0], x))
    for i, block in enumerate(dec.up_blocks):
        emit(what=f"up{i}.resnet0", shape=list(x.shape), ms=timed(block.resnets[0], x))
        mx.eval(x := block(x))
    c = 128
    x = mx.random.normal((1, size, size, c)).astype(mx.bfloat16)
    gn = blocks.GroupNorm(32, c)
    emit(what="group_norm compiled", shape=list(x.shape), ms=timed(gn, x))
    ref = nn.GroupNorm(32, c, pytorch_compatible=True)
    emit(what="group_norm mlx.nn", ms=timed(ref, x))
    emit(what="group_norm compiled + silu", ms=timed(lambda x: gn(x, silu=True), x))
    conv = nn.Conv2d(c, c, 3, padding=1)
    conv.set_dtype(mx.bfloat16)
    emit(what="conv3x3", shape=list(x.shape), ms=timed(conv, x))
    # weights as sanitize leaves them: a transposed view of the PyTorch [O, I, kh, kw] layout
    strided = conv.weight.transpose(0, 3, 1, 2).astype(mx.bfloat16)
    mx.eval(strided)
    view = strided.transpose(0, 2, 3, 1)
    emit(what="conv3x3 strided weight", ms=timed(lambda x: mx.conv2d(x, view, padding=1), x))
    packed = mx.contiguous(view)
    emit(what="conv3x3 contiguous weight", ms=timed(lambda x: mx.conv2d(x, packed, padding=1), x))
    emit(
        what="conv3x3 float32",
        ms=timed(lambda x: mx.conv2d(x, packed.astype(mx.float32), padding=1), x.astype(mx.float32)),
    )
    up = blocks.Upsample2D(c)
    up.set_dtype(mx.bfloat16)
    emit(what="upsample", ms=timed(up, x[:, : size // 2, : size // 2]))
    n = (size // 8) ** 2
    q = mx.random.normal((1, 1, n, 512)).astype(mx.bfloat16)
    emit(
        what="sdpa chunked",
        tokens=n,
        ms=timed(
            lambda q: mx.concatenate(
                [
                    mx.fast.scaled_dot_product_attention(q[:, :, i : i + 4096], q, q, scale=512**-0.5)
                    for i in range(0, n, 4096)
                ],
                axis=2,
            ),
            q,
        ),
    )
    emit(what="sdpa whole", ms=timed(lambda q: mx.fast.scaled_dot_product_attention(q, q, q, scale=512**-0.5), q))
    emit(
        what="attention matmul-softmax",
        ms=timed(lambda q: mx.softmax((q @ q.swapaxes(-1, -2)) * 512**-0.5, axis=-1, precise=True) @ q, q),
    )


if __name__ == "__main__":
    main()
