"""Full-width parity on the CPU: FLUX.2 Klein 4B / 9B and Z-Image transformer blocks at their real widths (heads,
head dims, joint/caption dims, MLP ratios, RoPE axes), with fewer blocks than the real depth, against diffusers in
float32 on identical random weights. Complements the GPU runs (full depth, bf16) where GPU time ran short.

    python benchmarks/parity_fullwidth.py [--models flux2-klein-4b,flux2-klein-9b,zimage-turbo] [--out FILE]"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import mlx.core as mx
import numpy as np
import torch

# Real configs, depth reduced to one block of each kind (the width of every layer is the checkpoint's)
KLEIN = {
    "flux2-klein-4b": dict(num_attention_heads=24, attention_head_dim=128, joint_attention_dim=7680),
    "flux2-klein-9b": dict(num_attention_heads=32, attention_head_dim=128, joint_attention_dim=12288),
}
ZIMAGE = dict(
    all_patch_size=(2,),
    all_f_patch_size=(1,),
    in_channels=16,
    dim=3840,
    n_layers=1,
    n_refiner_layers=1,
    n_heads=30,
    n_kv_heads=30,
    cap_feat_dim=2560,
    axes_dims=[32, 48, 48],
    axes_lens=[1536, 512, 512],
)


def relative(got: np.ndarray, want: np.ndarray) -> dict[str, float]:
    err = np.abs(got - want)
    return {
        "max_rel_err": float(err.max() / np.abs(want).max()),
        "mean_rel_err": float(err.mean() / np.abs(want).mean()),
    }


def klein(model: str, folder: Path) -> dict:
    from diffusers import Flux2KleinPipeline, Flux2Transformer2DModel
    from imagegen_flux2.config import Flux2TransformerConfig
    from imagegen_flux2.transformer import Flux2Transformer

    from imagegen.weights import load_module

    torch.manual_seed(0)
    ref = Flux2Transformer2DModel(
        patch_size=1,
        in_channels=128,
        num_layers=1,
        num_single_layers=1,
        mlp_ratio=3.0,
        timestep_guidance_channels=256,
        axes_dims_rope=[32, 32, 32, 32],
        rope_theta=2000,
        guidance_embeds=False,
        **KLEIN[model],
    ).eval()
    ref.save_pretrained(folder)
    ours = Flux2Transformer(Flux2TransformerConfig.from_file(folder / "config.json"))
    load_module(ours, folder, dtype="float32")
    rng = np.random.default_rng(1)
    grid, text = (8, 8), 64
    x = rng.standard_normal((1, grid[0] * grid[1], 128)).astype(np.float32)
    c = rng.standard_normal((1, text, KLEIN[model]["joint_attention_dim"])).astype(np.float32)
    t = np.array([0.7], dtype=np.float32)
    with torch.no_grad():
        want = ref(
            hidden_states=torch.from_numpy(x),
            encoder_hidden_states=torch.from_numpy(c),
            timestep=torch.from_numpy(t),
            guidance=None,
            txt_ids=Flux2KleinPipeline._prepare_text_ids(torch.zeros(1, text, 1)),
            img_ids=Flux2KleinPipeline._prepare_latent_ids(torch.zeros(1, 1, *grid)),
            return_dict=False,
        )[0]
    got = ours(mx.array(x), mx.array(c), mx.array(t), ours.rope(text, grid))
    return relative(np.array(got), want.numpy())


def zimage(folder: Path) -> dict:
    from diffusers import ZImageTransformer2DModel
    from imagegen_zimage.config import ZImageTransformerConfig
    from imagegen_zimage.transformer import ZImageTransformer

    from imagegen.weights import load_module

    torch.manual_seed(0)
    ref = ZImageTransformer2DModel(**ZIMAGE).eval()
    ref.save_pretrained(folder)
    ours = ZImageTransformer(ZImageTransformerConfig.from_file(folder / "config.json"))
    load_module(ours, folder, dtype="float32")
    rng = np.random.default_rng(1)
    latents = rng.standard_normal((1, 16, 16, 16)).astype(np.float32)
    caption = rng.standard_normal((40, ZIMAGE["cap_feat_dim"])).astype(np.float32)
    t = np.array([0.3], dtype=np.float32)
    with torch.no_grad():
        want = (
            ref(
                [torch.from_numpy(latents[0]).permute(2, 0, 1)[:, None]],
                torch.from_numpy(t),
                [torch.from_numpy(caption)],
                return_dict=False,
            )[0][0][:, 0]
            .permute(1, 2, 0)
            .numpy()
        )
    got = ours(mx.array(latents), mx.array(t), mx.array(caption)[None], ours.layout([40], 16, 16))
    return relative(np.array(got)[0], want)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="flux2-klein-4b,flux2-klein-9b,zimage-turbo")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    mx.set_default_device(mx.cpu)
    records = []
    for model in args.models.split(","):
        start = time.time()
        with tempfile.TemporaryDirectory() as tmp:
            errors = zimage(Path(tmp)) if model == "zimage-turbo" else klein(model, Path(tmp))
        record = {
            "section": "parity-fullwidth",
            "model": model,
            "dtype": "float32",
            "device": "cpu",
            "blocks": "1 of each kind at full width",
            **errors,
            "s": round(time.time() - start, 1),
        }
        print(json.dumps(record), flush=True)
        records.append(record)
    if args.out:
        args.out.write_text("".join(json.dumps(r) + "\n" for r in records))
    return 0


if __name__ == "__main__":
    sys.exit(main())
