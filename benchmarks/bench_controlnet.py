"""Z-Image ControlNet cost on the GPU: a Z-Image Turbo denoiser step at 1024x1024 (random weights, the real
configs, bf16) bare and steered by a ControlNet of the Union 1.0 and 2.1 layouts, imagegen (the pipeline's paced
blocks) against diffusers (ZImageControlNetModel + ZImageTransformer2DModel, as ZImageControlNetPipeline calls them)
on the same weights, with the controlled step's output difference between the two.

Prints one JSON line per measurement ("ratio": imagegen / diffusers; "overhead": controlled / bare step of the same
framework). `--tiny` runs tiny configs in float32 on the CPU (a smoke test, numbers meaningless).

    python benchmarks/bench_controlnet.py [--tiny] [--layouts 1.0,2.1] [--out benchmarks/results/controlnet.jsonl]
"""

from __future__ import annotations

import argparse
import gc
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np
from common import errors, free_memory, round_floats, start_run, time_torch
from families import FULL, TINY, ZImage, to_numpy, to_torch

LAYOUTS = {  # alibaba-pai Z-Image-Turbo-Fun-Controlnet-Union releases (as hlky's diffusers conversions configure them)
    "1.0": dict(control_layers_places=list(range(0, 30, 5)), control_in_dim=16),
    "2.1": dict(
        control_layers_places=list(range(0, 30, 2)),
        control_refiner_layers_places=[0, 1],
        add_control_noise_refiner="control_noise_refiner",
        control_in_dim=33,
    ),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true", help="tiny configs on the CPU (smoke test)")
    p.add_argument("--layouts", default="1.0,2.1", help=f"comma list of {', '.join(LAYOUTS)}")
    p.add_argument("--size", type=int, default=None, help="image side in pixels (default 1024; tiny 32)")
    p.add_argument("--pace", type=int, default=1, help="blocks per host wait, as the pipeline runs (0: one graph)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 2; tiny 1)")
    p.add_argument("--repeats", type=int, default=None, help="timed steps, median reported (default 5; tiny 1)")
    p.add_argument("--out", type=Path, default=None, help="also write the JSON lines to this file")
    args = p.parse_args(argv)
    args.layouts = [name.strip() for name in args.layouts.split(",") if name.strip()]
    unknown = set(args.layouts) - set(LAYOUTS)
    if unknown:
        p.error(f"unknown layouts: {', '.join(sorted(unknown))}")
    return args


def controlnet_config(family: ZImage, layout: str) -> dict[str, Any]:
    c = family.transformer_config
    config = {
        **LAYOUTS[layout],
        "dim": c["dim"],
        "n_heads": c["n_heads"],
        "n_kv_heads": c["n_kv_heads"],
        "n_refiner_layers": c["n_refiner_layers"],
        "all_patch_size": [2],
        "all_f_patch_size": [1],
    }
    if family.scale.tiny:  # the tiny transformer's layers and latent channels
        n, channels = c["n_layers"], c["in_channels"]
        config["control_layers_places"] = list(range(n))
        config["control_refiner_layers_places"] = list(range(c["n_refiner_layers"])) if layout != "1.0" else None
        config["control_in_dim"] = channels if layout == "1.0" else 2 * channels + 1
    return config


def torch_models(family: ZImage, layout: str, device: str, dtype: Any) -> tuple[Any, Any]:
    """diffusers' transformer and ControlNet with random weights; the zero-initialised projections made random, so
    the hints count (as a trained ControlNet's do)."""
    import torch
    from diffusers import ZImageControlNetModel, ZImageTransformer2DModel

    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    try:
        torch.set_default_dtype(dtype)  # built in the run's dtype on the device: no float32 copy of 6B weights
        with torch.device(device):
            transformer = ZImageTransformer2DModel(**family.transformer_config).eval()
            net = ZImageControlNetModel(**controlnet_config(family, layout)).eval()
    finally:
        torch.set_default_dtype(previous)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if "_proj" in name:
                p.normal_(0.0, 0.02)
    return transformer, net


def to_mlx(module: Any, model: Any, dtype: Any) -> Any:
    """The torch module's weights in the MLX model (the loader's sanitize: fused projections), strictly."""
    from imagegen.weights import check_weights

    weights = {k: mx.array(to_numpy(v)).astype(dtype) for k, v in module.state_dict().items()}
    weights = model.sanitize(weights)
    check_weights(model, weights)
    model.load_weights(list(weights.items()))
    mx.eval(model.parameters())
    return model


def imagegen_steps(
    family: ZImage, transformer: Any, net: Any, inputs: dict[str, Any], dtype: Any, pace: int
) -> dict[str, Any]:
    from imagegen_zimage.controlnet import ControlInput

    latents, caps, context = (mx.array(inputs[k]).astype(dtype) for k in ("latents", "caps", "context"))
    t = mx.array(inputs["t"])
    b, h, w, _ = latents.shape
    layout = transformer.layout([caps.shape[1]] * b, h, w)
    control = ControlInput(net, context, mx.array(0.75, dtype=dtype))
    transformer.pace(pace)
    net.pace(pace)

    def step(steer: Any):
        def forward(x, tt, c):
            return transformer(x, tt, c, layout, None, steer)

        run = mx.compile(forward) if not pace else forward  # the pipeline: paced blocks, or one compiled graph
        return lambda: run(latents, t, caps)

    return {"bare": step(None), "controlnet": step(control)}


def diffusers_steps(transformer: Any, net: Any, inputs: dict[str, Any], device: str, dtype: Any) -> dict[str, Any]:
    import torch

    net = type(net).from_transformer(net, transformer)
    xs, ctx = (
        list(to_torch(inputs[k], device, dtype).permute(0, 3, 1, 2)[:, :, None].unbind(0))
        for k in ("latents", "context")
    )
    caps = list(to_torch(inputs["caps"], device, dtype).unbind(0))
    t = to_torch(inputs["t"], device)

    def output(out: Any) -> Any:
        return torch.stack([o[:, 0] for o in out]).permute(0, 2, 3, 1)  # NHWC

    def bare() -> Any:
        return output(transformer(xs, t, caps, return_dict=False)[0])

    def controlled() -> Any:  # as ZImageControlNetPipeline's loop calls them
        samples = net(xs, t, caps, ctx, conditioning_scale=0.75)
        return output(transformer(xs, t, caps, controlnet_block_samples=samples, return_dict=False)[0])

    return {"bare": bare, "controlnet": controlled}


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    recorder = start_run(args)
    import torch
    from imagegen_zimage.config import ZImageControlNetConfig, ZImageTransformerConfig
    from imagegen_zimage.controlnet import ZImageControlNet
    from imagegen_zimage.transformer import ZImageTransformer

    from imagegen.cli.bench import time_mlx

    scale = TINY if args.tiny else FULL
    family = ZImage("zimage-turbo", scale)
    size = args.size or scale.size
    warmup = args.warmup if args.warmup is not None else (1 if args.tiny else 2)
    repeats = args.repeats if args.repeats is not None else (1 if args.tiny else 5)
    device = "cuda" if torch.cuda.is_available() and not args.tiny else "cpu"
    torch_dtype, mlx_dtype = (torch.float32, mx.float32) if args.tiny else (torch.bfloat16, mx.bfloat16)
    base = {"model": "zimage-turbo", "size": size, "text_tokens": scale.text_len, "pace": args.pace}

    for layout in args.layouts:
        inputs = family.step_inputs(size)
        channels = controlnet_config(family, layout)["control_in_dim"]
        inputs["context"] = (
            np.random.default_rng(1).standard_normal((*inputs["latents"].shape[:3], channels)).astype(np.float32)
        )
        ref_transformer, ref_net = torch_models(family, layout, device, torch_dtype)
        transformer = to_mlx(
            ref_transformer, ZImageTransformer(ZImageTransformerConfig.from_dict(family.transformer_config)), mlx_dtype
        )
        net = to_mlx(
            ref_net, ZImageControlNet(ZImageControlNetConfig.from_dict(controlnet_config(family, layout))), mlx_dtype
        )
        record = {**base, "layout": layout, "control_layers": len(net.control_layers)}

        ours, outputs = {}, {}
        for name, fn in imagegen_steps(family, transformer, net, inputs, mlx_dtype, args.pace).items():
            ours[name] = time_mlx(fn, warmup, repeats)
            outputs[name] = np.array(fn().astype(mx.float32))
        del transformer, net
        gc.collect()
        mx.clear_cache()

        theirs = {}
        with torch.no_grad():
            for name, fn in diffusers_steps(ref_transformer, ref_net, inputs, device, torch_dtype).items():
                theirs[name] = time_torch(fn, warmup, repeats)
                if name == "controlnet":
                    difference = errors(outputs[name], to_numpy(fn().float()))
        del ref_transformer, ref_net
        free_memory()

        for name in ("bare", "controlnet"):
            recorder.emit(
                round_floats(
                    {
                        **record,
                        "step": name,
                        "imagegen_ms": ours[name].ms,
                        "diffusers_ms": theirs[name].ms,
                        "ratio": ours[name].ms / theirs[name].ms,
                        "imagegen_peak_gb": ours[name].peak_gb,
                        "diffusers_peak_gb": theirs[name].peak_gb,
                    }
                )
            )
        recorder.emit(
            round_floats(
                {
                    **record,
                    "step": "overhead",
                    "imagegen": ours["controlnet"].ms / ours["bare"].ms,
                    "diffusers": theirs["controlnet"].ms / theirs["bare"].ms,
                    **{f"controlled_output_{k}": v for k, v in difference.items()},
                }
            )
        )


if __name__ == "__main__":
    main()
