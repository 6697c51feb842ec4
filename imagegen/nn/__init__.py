"""Neural-network building blocks shared by every family."""

from .attention import attention, attention_blhd, causal_mask, combine_masks, padding_mask, recording
from .autoencoder_kl import AutoencoderKL, AutoencoderKLConfig
from .layers import TimestepEmbedding, timestep_embedding

__all__ = [
    "attention",
    "attention_blhd",
    "causal_mask",
    "combine_masks",
    "padding_mask",
    "recording",
    "TimestepEmbedding",
    "timestep_embedding",
    "AutoencoderKL",
    "AutoencoderKLConfig",
]
