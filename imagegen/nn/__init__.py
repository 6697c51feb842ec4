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

from .attention import attention, causal_mask, combine_masks, padding_mask, repeat_kv
from .autoencoder_kl import AutoencoderKL, AutoencoderKLConfig
from .layers import TimestepEmbedding, timestep_embedding

__all__ = [
    "Conv2d", "Embedding", "GroupNorm", "LayerNorm", "Linear", "Module", "QuantizedLinear", "RMSNorm",
    "attention", "causal_mask", "combine_masks", "padding_mask", "repeat_kv",
    "TimestepEmbedding", "timestep_embedding",
    "AutoencoderKL", "AutoencoderKLConfig",
]
