"""Time and peak memory of the FLUX.2 VAE decode against its memory bounds: the 3x3 convolutions' strip size
(imagegen.nn.vae.CONV_WORKSPACE_BYTES) and layer-by-layer evaluation (EVAL_EACH_LAYER), bf16, random weights.

    python3 benchmarks/profile_vae_memory.py [1024,2048]     # one JSON line per (size, setting)"""

from __future__ import annotations

import json
import sys

import mlx.core as mx
from imagegen_flux2.vae import AutoencoderKLFlux2, Flux2VAEConfig

from imagegen.cli.bench import time_mlx
from imagegen.nn import vae as blocks

MB = 1 << 20
SETTINGS = [  # (workspace bytes, eval each layer)
    (512 * MB, True), (2048 * MB, True), (8192 * MB, True), (1 << 40, True), (1 << 40, False), (2048 * MB, False),
]


def main() -> None:
    sizes = [int(s) for s in (sys.argv[1] if len(sys.argv) > 1 else "1024,2048").split(",")]
    vae = AutoencoderKLFlux2(Flux2VAEConfig())
    vae.set_dtype(mx.bfloat16)
    mx.eval(vae.parameters())
    weights = mx.get_active_memory()
    for size in sizes:
        z = mx.random.normal((1, size // 8, size // 8, 32)).astype(mx.bfloat16)
        mx.eval(z)
        reference = None
        for workspace, each_layer in SETTINGS:
            blocks.CONV_WORKSPACE_BYTES, blocks.EVAL_EACH_LAYER = workspace, each_layer
            try:
                t = time_mlx(lambda: vae.decode(z), 1, 3)
                out = vae.decode(z)
                same = None if reference is None else bool(mx.array_equal(out, reference).item())
                reference = out if reference is None else reference
                record = {"ms": round(t.ms, 2), "peak_above_weights_gb": round(t.peak_gb - weights / 1e9, 3),
                          "identical_to_first": same}
            except Exception as e:  # noqa: BLE001 - out of memory at 2048 is a result too
                record = {"error": f"{type(e).__name__}: {e}"[:200]}
            print(json.dumps({"size": size, "workspace_mb": workspace // MB, "eval_each_layer": each_layer, **record}),
                  flush=True)
            mx.clear_cache()


if __name__ == "__main__":
    main()
