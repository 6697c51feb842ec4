"""Neural-network building blocks shared by every family."""

from mlx.nn import (
    Conv2d,
    Embedding,
    GroupNorm,
    LayerNorm,
    Linear,
    Module,
    QuantizedLinear,
    RMSNorm,
)

from .attention import attention, attention_blhd, causal_mask, combine_masks, padding_mask, recording, repeat_kv
from .autoencoder_kl import AutoencoderKL, AutoencoderKLConfig
from .layers import TimestepEmbedding, timestep_embedding

__all__ = [
    "Conv2d", "Embedding", "GroupNorm", "LayerNorm", "Linear", "Module", "QuantizedLinear", "RMSNorm",
    "attention", "attention_blhd", "causal_mask", "combine_masks", "padding_mask", "recording", "repeat_kv",
    "TimestepEmbedding", "timestep_embedding",
    "AutoencoderKL", "AutoencoderKLConfig",
]
