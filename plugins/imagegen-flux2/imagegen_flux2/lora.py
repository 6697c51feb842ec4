"""FLUX.2 LoRA key tables: the layer names of diffusers and of BFL's original code (ai-toolkit, kohya, musubi, fal)
mapped onto this transformer's fused and split layers. Names follow diffusers 0.42.1 lora_conversion_utils
(`_convert_non_diffusers_flux2_lora_to_diffusers`, `_convert_kohya_flux2_lora_to_diffusers`,
`_LYCORIS_FLUX2_SUBPATH_MAP`)."""

from __future__ import annotations

from imagegen.lora import Targets, col_split, row_blocks, whole

from .transformer import QKV_FUSIONS, Flux2Transformer

# diffusers name in a double block -> BFL name
DOUBLE = {
    "attn.to_qkv": "img_attn.qkv",
    "attn.to_added_qkv": "txt_attn.qkv",
    "attn.to_out.0": "img_attn.proj",
    "attn.to_add_out": "txt_attn.proj",
    "ff.linear_in": "img_mlp.0",
    "ff.linear_out": "img_mlp.2",
    "ff_context.linear_in": "txt_mlp.0",
    "ff_context.linear_out": "txt_mlp.2",
}
# BFL name -> diffusers name of the layers outside the blocks
OUTSIDE = {
    "img_in": "x_embedder",
    "txt_in": "context_embedder",
    "time_in.in_layer": "time_guidance_embed.timestep_embedder.linear_1",
    "time_in.out_layer": "time_guidance_embed.timestep_embedder.linear_2",
    "guidance_in.in_layer": "time_guidance_embed.guidance_embedder.linear_1",
    "guidance_in.out_layer": "time_guidance_embed.guidance_embedder.linear_2",
    "final_layer.linear": "proj_out",
    "final_layer.adaLN_modulation.1": "norm_out.linear",
    "single_stream_modulation.lin": "single_stream_modulation.linear",
    "double_stream_modulation_img.lin": "double_stream_modulation_img.linear",
    "double_stream_modulation_txt.lin": "double_stream_modulation_txt.linear",
}
# BFL's final layer emits (shift, scale), diffusers' norm_out (scale, shift): a BFL-named delta swaps its halves
# (as diffusers' FLUX.1 converters do; its FLUX.2 converter maps the layer without swapping).
SWAPPED = {"final_layer.adaLN_modulation.1"}


def lora_targets(model: Flux2Transformer) -> dict[str, Targets]:
    inner, mlp = model.config.inner_dim, model.config.mlp_hidden_dim
    diffusers: Targets = {}
    bfl: Targets = {}
    for i in range(len(model.transformer_blocks)):
        ours = f"transformer_blocks.{i}."
        for fused, parts in QKV_FUSIONS.items():  # to_q / to_k / to_v fill row blocks of the fused projection
            diffusers.update(row_blocks(f"{ours}attn.{fused}", [f"{ours}attn.{p}" for p in parts], inner))
        for name, theirs in DOUBLE.items():
            diffusers[ours + name] = bfl[f"double_blocks.{i}.{theirs}"] = whole(ours + name)
    for i in range(len(model.single_transformer_blocks)):
        ours = f"single_transformer_blocks.{i}.attn."
        diffusers[ours + "to_qkv_mlp_proj"] = bfl[f"single_blocks.{i}.linear1"] = whole(ours + "to_qkv_mlp_proj")
        split = col_split([(ours + "to_out_attn", inner), (ours + "to_out_mlp", mlp)])
        diffusers[ours + "to_out"] = bfl[f"single_blocks.{i}.linear2"] = split
    for theirs, name in OUTSIDE.items():
        if name.startswith("time_guidance_embed.guidance_embedder") and not model.config.guidance_embeds:
            continue
        diffusers[name] = whole(name)
        bfl[theirs] = whole(name, swap_halves=theirs in SWAPPED)
    # some exports spell the double blocks "sformer_blocks" (diffusers accepts it)
    diffusers.update(
        {
            "sformer_blocks." + k.removeprefix("transformer_blocks."): v
            for k, v in diffusers.items()
            if k.startswith("transformer_blocks.")
        }
    )
    return {"diffusers": diffusers, "BFL": bfl}
