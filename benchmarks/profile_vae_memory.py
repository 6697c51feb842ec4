"""Time and peak memory of the FLUX.2 VAE decode against its memory bounds: the 3x3 convolutions' strip size
(imagegen.nn.vae_blocks.CONV_WORKSPACE_BYTES) and how layers are paced (LAYER_PACING), bf16, random weights. H100,
1024 px in bf16 (diffusers: 91 ms, 2.6 GB): each layer waited for 60 ms / 3.0 GB above the weights, two in flight
55 ms / 5.2 GB, one graph 56 ms / 11.1 GB; 2 GB strips instead of 8: 72 ms / 2.4 GB.
2048 px, each waited for: 273 ms / 10.1 GB.

    python3 benchmarks/profile_vae_memory.py [1024,2048]            # one JSON line per (size, setting)
    python3 benchmarks/profile_vae_memory.py 1024 --layers          # peak and time of each decoder layer"""

from __future__ import annotations

import json
import sys

import mlx.core as mx
from imagegen_flux2.vae import AutoencoderKLFlux2, Flux2VAEConfig

from imagegen.cli.bench import time_mlx
from imagegen.nn import vae_blocks as blocks

MB = 1 << 20
SETTINGS = [  # (workspace bytes, layer pacing (every, ahead))
    (2048 * MB, (1, 0)),
    (8192 * MB, (1, 0)),
    (8192 * MB, (1, 1)),
    (1 << 40, (1, 1)),
    (1 << 40, (0, 0)),
]


def layers(vae: AutoencoderKLFlux2, size: int) -> None:
    """Each decoder layer alone: its peak above what was live before it, its time, its output's size."""
    dec = vae.decoder
    x = mx.random.normal((1, size // 8, size // 8, 32)).astype(mx.bfloat16)

    def track(name, fn, x):
        mx.eval(x)
        t = time_mlx(lambda: fn(x), 1, 3)
        mx.synchronize()
        mx.clear_cache()
        mx.reset_peak_memory()
        before = mx.get_active_memory()
        y = fn(x)
        mx.eval(y)
        mx.synchronize()
        print(
            json.dumps(
                {
                    "size": size,
                    "layer": name,
                    "input": list(x.shape),
                    "ms": round(t.ms, 2),
                    "peak_above_live_gb": round((mx.get_peak_memory() - before) / 1e9, 3),
                    "output_gb": round(y.nbytes / 1e9, 3),
                }
            ),
            flush=True,
        )
        return y

    x = track("post_quant_conv+conv_in", lambda z: dec.conv_in(vae.post_quant_conv(z)), x)
    x = track("mid_block", dec.mid_block, x)
    for i, block in enumerate(dec.up_blocks):
        for j, layer in enumerate(block.resnets):
            if j == 0:
                track(f"up{i}.resnet{j}.norm1", lambda x, n=layer.norm1: n(x, silu=True), x)
            x = track(f"up{i}.resnet{j}", layer, x)
        for layer in block.upsamplers:
            x = track(f"up{i}.upsample", layer, x)
    x = track("conv_norm_out", lambda x: dec.conv_norm_out(x, silu=True), x)
    track("conv_out", dec.conv_out, x)


def main() -> None:
    sizes = [int(s) for s in (sys.argv[1] if len(sys.argv) > 1 else "1024,2048").split(",")]
    vae = AutoencoderKLFlux2(Flux2VAEConfig())
    vae.set_dtype(mx.bfloat16)
    mx.eval(vae.parameters())
    weights = mx.get_active_memory()
    if "--layers" in sys.argv:
        for size in sizes:
            layers(vae, size)
        return
    for size in sizes:
        z = mx.random.normal((1, size // 8, size // 8, 32)).astype(mx.bfloat16)
        mx.eval(z)
        reference = None
        for workspace, sync in SETTINGS:
            blocks.CONV_WORKSPACE_BYTES, blocks.LAYER_PACING = workspace, sync
            try:
                t = time_mlx(lambda z=z: vae.decode(z), 1, 3)
                out = vae.decode(z)
                same = None if reference is None else bool(mx.array_equal(out, reference).item())
                reference = out if reference is None else reference
                record = {
                    "ms": round(t.ms, 2),
                    "peak_above_weights_gb": round(t.peak_gb - weights / 1e9, 3),
                    "identical_to_first": same,
                }
            except Exception as e:  # noqa: BLE001 - out of memory at 2048 is a result too
                record = {"error": f"{type(e).__name__}: {e}"[:200]}
            print(
                json.dumps({"size": size, "workspace_mb": workspace // MB, "layer_pacing": list(sync), **record}),
                flush=True,
            )
            mx.clear_cache()


if __name__ == "__main__":
    main()
