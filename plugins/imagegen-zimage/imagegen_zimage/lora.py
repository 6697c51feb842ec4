"""Z-Image LoRA key tables: diffusers' layer names and the original / ComfyUI ones (fused `attention.qkv`,
`attention.out`, `x_embedder`, `final_layer`) mapped onto this transformer's fused layers. Names follow diffusers 0.42.1
`_convert_non_diffusers_z_image_lora_to_diffusers` and ComfyUI's Lumina2 / NextDiT model."""

from __future__ import annotations

from imagegen.lora import Targets, row_blocks, whole

from .transformer import FUSIONS, ZImageTransformer

ORIGINAL = {"attention.qkv": "attention.to_qkv", "attention.out": "attention.to_out.0"}  # per block


def lora_targets(model: ZImageTransformer) -> dict[str, Targets]:
    config = model.config
    diffusers: Targets = {}
    original: Targets = {}
    for blocks in model.paced_lists:
        for i, block in enumerate(getattr(model, blocks)):
            ours = f"{blocks}.{i}."
            for fused, parts in FUSIONS.items():  # q/k/v and w1/w3 fill row blocks of the fused projections
                size = config.dim if fused.startswith("attention") else config.ffn_dim
                diffusers.update(row_blocks(ours + fused, [ours + p for p in parts], size))
                diffusers[ours + fused] = whole(ours + fused)
            names = ["attention.to_out.0", "feed_forward.w2"] + (["adaLN_modulation.0"] if block.modulation else [])
            diffusers.update({ours + name: whole(ours + name) for name in names})
            original.update({ours + theirs: whole(ours + name) for theirs, name in ORIGINAL.items()})
    for key in model.all_x_embedder:
        for name in (
            f"all_x_embedder.{key}",
            f"all_final_layer.{key}.linear",
            f"all_final_layer.{key}.adaLN_modulation.1",
        ):
            diffusers[name] = whole(name)
    patch = model.patch_key
    original.update(
        {
            "x_embedder": whole(f"all_x_embedder.{patch}"),
            "final_layer.linear": whole(f"all_final_layer.{patch}.linear"),
            "final_layer.adaLN_modulation.1": whole(f"all_final_layer.{patch}.adaLN_modulation.1"),
        }
    )
    for name in ("t_embedder.mlp.0", "t_embedder.mlp.2", "cap_embedder.1"):
        diffusers[name] = whole(name)
    return {"diffusers": diffusers, "original": original}
