"""FLUX.2 configs: the transformer's `transformer/config.json` and the pipeline's `model_index.json` (diffusers 0.42.1).

The VAE's config lives beside its model in vae.py."""

from __future__ import annotations

from imagegen import HFConfig


class Flux2TransformerConfig(HFConfig):
    """`Flux2Transformer2DModel` config. Defaults are diffusers' (the FLUX.2-dev sizes); Klein's files set them."""

    required = (
        "in_channels",
        "num_layers",
        "num_single_layers",
        "attention_head_dim",
        "num_attention_heads",
        "joint_attention_dim",
    )

    patch_size: int = 1
    in_channels: int = 128
    out_channels: int | None = None  # None: same as in_channels
    num_layers: int = 8
    num_single_layers: int = 48
    attention_head_dim: int = 128
    num_attention_heads: int = 48
    joint_attention_dim: int = 15360
    timestep_guidance_channels: int = 256
    mlp_ratio: float = 3.0
    axes_dims_rope: tuple[int, ...] = (32, 32, 32, 32)  # (T, H, W, L) channels of each head
    rope_theta: float = 2000.0
    eps: float = 1e-6
    guidance_embeds: bool = True  # Klein: false (step-distilled, no guidance embedder)

    @property
    def inner_dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @property
    def mlp_hidden_dim(self) -> int:
        return int(self.inner_dim * self.mlp_ratio)

    @property
    def out_dim(self) -> int:
        return self.patch_size * self.patch_size * (self.out_channels or self.in_channels)


class Flux2PipelineConfig(HFConfig):
    """`model_index.json` of a Klein checkpoint: what the pipeline needs beyond its components' configs."""

    is_distilled: bool = False  # diffusers' Flux2KleinPipeline default; distilled Klein files set true (no CFG)
