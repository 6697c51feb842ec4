"""Z-Image configs: the transformer's `transformer/config.json` (diffusers' ZImageTransformer2DModel) and a
ControlNet's `config.json` (diffusers' ZImageControlNetModel)."""

from __future__ import annotations

from typing import Literal, Self

from pydantic import model_validator

from imagegen import HFConfig

ADALN_EMBED_DIM = 256  # diffusers' ADALN_EMBED_DIM: the timestep embedding width is min(dim, 256)


class BlockShape:
    """The sizes a Z-Image block derives from `dim` and `n_heads` (the transformer's and a ControlNet's blocks)."""

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def ffn_dim(self) -> int:
        return int(self.dim / 3 * 8)  # diffusers' FeedForward hidden size, float math included

    @property
    def adaln_dim(self) -> int:
        return min(self.dim, ADALN_EMBED_DIM)


class ZImageTransformerConfig(BlockShape, HFConfig):
    """Defaults are diffusers' constructor defaults (the 6B Z-Image shapes)."""

    required = ("in_channels", "dim", "n_layers", "n_heads", "cap_feat_dim")

    all_patch_size: tuple[int, ...] = (2,)
    all_f_patch_size: tuple[int, ...] = (1,)
    in_channels: int = 16
    dim: int = 3840
    n_layers: int = 30
    n_refiner_layers: int = 2
    n_heads: int = 30
    n_kv_heads: int = 30  # recorded only: diffusers' attention gives keys and values n_heads heads too
    norm_eps: float = 1e-5
    qk_norm: bool = True
    cap_feat_dim: int = 2560
    siglip_feat_dim: int | None = None  # set only by Z-Image Omni checkpoints
    rope_theta: float = 256.0
    t_scale: float = 1000.0
    axes_dims: tuple[int, ...] = (32, 48, 48)
    axes_lens: tuple[int, ...] = (1024, 512, 512)

    @model_validator(mode="after")
    def _check(self) -> Self:
        if self.siglip_feat_dim is not None:
            raise ValueError("Z-Image Omni (SigLIP) checkpoints are not supported; only text-to-image")
        if self.dim % self.n_heads or sum(self.axes_dims) != self.dim // self.n_heads:
            raise ValueError(f"axes_dims {self.axes_dims} must sum to the head dim {self.dim}/{self.n_heads}")
        if len(self.axes_dims) != len(self.axes_lens) or len(self.all_patch_size) != len(self.all_f_patch_size):
            raise ValueError("axes_dims/axes_lens and all_patch_size/all_f_patch_size must pair up")
        return self


class ZImageControlNetConfig(BlockShape, HFConfig):
    """diffusers' ZImageControlNetModel: alibaba-pai's Z-Image-Turbo-Fun-Controlnet-Union 1.0 (6 control layers,
    control_in_dim 16, its own plain noise refiner), 2.0 (15 layers, control_in_dim 33 for inpainting, the control
    layers also steer the noise refiner) and 2.1 (a control noise refiner of its own steers it)."""

    required = ("control_layers_places", "control_in_dim")

    control_layers_places: tuple[int, ...]  # the transformer layers each control layer's hint is added after
    control_refiner_layers_places: tuple[int, ...] | None = None  # the noise-refiner layers steered (2.x)
    control_in_dim: int  # latent channels of the control context: C, or 2C + 1 (control, mask, masked image)
    add_control_noise_refiner: Literal["control_layers", "control_noise_refiner"] | None = None
    all_patch_size: tuple[int, ...] = (2,)
    all_f_patch_size: tuple[int, ...] = (1,)
    dim: int = 3840
    n_refiner_layers: int = 2
    n_heads: int = 30
    n_kv_heads: int = 30  # recorded only, as for the transformer
    norm_eps: float = 1e-5
    qk_norm: bool = True

    @model_validator(mode="after")
    def _check(self) -> Self:
        if not self.control_layers_places or self.control_layers_places[0] != 0:
            raise ValueError("control_layers_places must start with 0 (its block adds the control to the stream)")
        if self.add_control_noise_refiner is not None and not self.control_refiner_layers_places:
            raise ValueError("add_control_noise_refiner needs control_refiner_layers_places")
        return self
