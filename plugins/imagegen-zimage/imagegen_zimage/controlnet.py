"""Z-Image ControlNet in MLX, following diffusers 0.42.1 models/controlnets/controlnet_z_image.py
(ZImageControlNetModel): alibaba-pai's Z-Image-Turbo-Fun-Controlnet-Union 1.0, 2.0 and 2.1.

The ControlNet owns only its control layers, its control patch embedder and (1.0, 2.1) a control noise refiner;
like diffusers' `from_transformer`, it borrows everything else from the transformer it steers: the timestep, patch
and caption embedders, the pad tokens, RoPE and both refiners. It runs inside the transformer's call
(ZImageTransformer's `control` hook), so the caption refiner and (1.0) the noise refiner, whose outputs diffusers
computes twice, run once.

The control context (the control image's latents; for inpainting also the mask and the masked image's latents) is
embedded and run through the control layers beside the image tokens; each control layer emits a hint (after_proj)
that diffusers adds, times the conditioning scale, after the transformer layer at its place.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn

from imagegen.errors import WeightsError
from imagegen.nn.pacing import PacedBlocks, Pacer
from imagegen.weights import fuse_projections, load_module

from .config import ZImageControlNetConfig
from .transformer import (
    FUSIONS,
    Group,
    Prologue,
    Rope,
    ZImageTransformer,
    ZImageTransformerBlock,
    pad_tokens,
    patchify,
)


class ZImageControlBlock(ZImageTransformerBlock):
    """A transformer block over the control stream (diffusers' ZImageControlTransformerBlock): the first one
    (block_id 0) adds the projected control to the hidden states it follows; each one emits its output, projected
    by after_proj, as a hint."""

    def __init__(self, config: ZImageControlNetConfig, block_id: int):
        super().__init__(config)
        if block_id == 0:
            self.before_proj = nn.Linear(config.dim, config.dim)
        self.after_proj = nn.Linear(config.dim, config.dim)

    def __call__(self, c: mx.array, x: mx.array, rope: Rope, adaln: mx.array) -> tuple[mx.array, mx.array]:
        """(the control stream after this block, its hint); `x`: the hidden states the control follows."""
        if "before_proj" in self:
            c = self.before_proj(c) + x
        c = super().__call__(c, rope, adaln)
        return c, self.after_proj(c)


def run_control(
    blocks: Sequence[Callable], c: mx.array, x: mx.array, rope: Rope, adaln: mx.array, pace: Pacer
) -> tuple[mx.array, list[mx.array]]:
    """The control stream through `blocks`: (its final state, one hint per block)."""
    hints = []
    for block in blocks:
        c, hint = block(c, x, rope, adaln)
        pace(c, hint)
        hints.append(hint)
    return c, hints


class ZImageControlNet(PacedBlocks, nn.Module):
    """ZImageControlNetModel's own layers; module names are the checkpoint's keys (q/k/v and w1/w3 fused at load,
    as in the transformer). `add_control_noise_refiner`: None (1.0) runs a plain noise refiner of its own over the
    control tokens; "control_layers" (2.0) and "control_noise_refiner" (2.1) first run those control blocks beside
    the image tokens, and their hints steer the transformer's noise refiner the ControlNet runs again."""

    def __init__(self, config: ZImageControlNetConfig):
        super().__init__()
        self.config = config
        self.control_layers = [ZImageControlBlock(config, block_id=place) for place in config.control_layers_places]
        self.control_all_x_embedder = {
            f"{p}-{pf}": nn.Linear(pf * p * p * config.control_in_dim, config.dim)
            for p, pf in zip(config.all_patch_size, config.all_f_patch_size)
        }
        mode, count = config.add_control_noise_refiner, config.n_refiner_layers
        if mode is None:
            self.control_noise_refiner = [ZImageTransformerBlock(config) for _ in range(count)]
        elif mode == "control_noise_refiner":
            self.control_noise_refiner = [ZImageControlBlock(config, block_id=i) for i in range(count)]

    @property
    def paced_lists(self) -> tuple[str, ...]:  # type: ignore[override]  (which lists exist depends on the layout)
        return ("control_layers", "control_noise_refiner") if "control_noise_refiner" in self else ("control_layers",)

    def sanitize(self, weights: dict[str, mx.array]) -> dict[str, mx.array]:
        """Fuse q/k/v and w1/w3 as the transformer does. 2.0 files also carry a control noise refiner that diffusers'
        single-file conversion drops ("control_layers" mode does not use it): drop it too."""
        if self.config.add_control_noise_refiner == "control_layers":
            weights = {k: v for k, v in weights.items() if not k.startswith("control_noise_refiner.")}
        prefixes = (f"{name}.{i}." for name in self.paced_lists for i in range(len(getattr(self, name))))
        return fuse_projections(weights, prefixes, FUSIONS)

    def check_fits(self, transformer: ZImageTransformer, where: str) -> None:
        """Refuse a ControlNet built for another transformer, naming the config field."""
        mine, theirs = self.config, transformer.config
        for field in ("dim", "n_heads", "n_refiner_layers", "qk_norm"):
            if getattr(mine, field) != getattr(theirs, field):
                raise WeightsError(
                    f"{where}: {field} {getattr(mine, field)} does not match the transformer's "
                    f"{getattr(theirs, field)}: this ControlNet is for another model."
                )
        channels = theirs.in_channels
        if mine.control_in_dim not in (channels, 2 * channels + 1):
            raise WeightsError(
                f"{where}: control_in_dim {mine.control_in_dim} must be the transformer's "
                f"{channels} latent channels or {2 * channels + 1} (control, mask, masked image)."
            )
        if transformer.patch_key not in self.control_all_x_embedder:
            raise WeightsError(
                f"{where}: all_patch_size / all_f_patch_size lack the transformer's patch {transformer.patch_key}."
            )
        for field, limit in (
            ("control_layers_places", theirs.n_layers),
            ("control_refiner_layers_places", theirs.n_refiner_layers),
        ):
            places = getattr(mine, field) or ()
            if any(not 0 <= place < limit for place in places):
                raise WeightsError(f"{where}: {field} {list(places)} must be layer indices below {limit}.")

    def hints(
        self,
        transformer: ZImageTransformer,
        group: Group,
        start: Prologue,
        context: mx.array,
        scale: mx.array,
        pace: Pacer,
    ) -> dict[int, mx.array]:
        """{transformer layer: hint} for one layout group; `context` [Bg, H, W, control_in_dim] in NHWC latents."""
        config, dtype = self.config, start.image.dtype
        _, control_layers, *refiner = self.paced_blocks()  # compiled one by one when the pipeline paces
        c = self.control_all_x_embedder[transformer.patch_key](patchify(context.astype(dtype), transformer.patch_size))
        c = pad_tokens(c, start.image.shape[1], transformer.x_pad_token)  # diffusers puts x_pad_token there too
        image = start.image
        if config.add_control_noise_refiner is None:
            for block in refiner[0]:
                c = block(c, group.image_rope, start.adaln)
                pace(c)
        else:
            blocks = control_layers if config.add_control_noise_refiner == "control_layers" else refiner[0]
            c, found = run_control(blocks, c, start.embedded, group.image_rope, start.adaln, pace)
            steer = {place: hint * scale for place, hint in zip(config.control_refiner_layers_places, found)}
            image = start.embedded  # the ControlNet's own pass of the transformer's noise refiner, steered
            for index, block in enumerate(start.noise_refiner):
                image = block(image, group.image_rope, start.adaln)
                if index in steer:
                    image = image + steer[index]
                pace(image)
        unified = mx.concatenate([image, start.cap], axis=1)
        _, found = run_control(
            control_layers, mx.concatenate([c, start.cap], axis=1), unified, group.rope, start.adaln, pace
        )
        return {place: hint * scale for place, hint in zip(config.control_layers_places, found)}


@dataclass(frozen=True)
class ControlInput:
    """A request's control for the transformer's `control` hook: the ControlNet, the control context of the whole
    batch [B, H, W, control_in_dim] and the conditioning scale (an array, so compiled steps take it as an input)."""

    net: ZImageControlNet
    context: mx.array
    scale: mx.array

    def __call__(
        self, transformer: ZImageTransformer, group: Group, start: Prologue, pace: Pacer
    ) -> dict[int, mx.array]:
        context = self.context if group.index is None else self.context[group.index]
        return self.net.hints(transformer, group, start, context, self.scale, pace)


def block_samples(
    net: ZImageControlNet,
    transformer: ZImageTransformer,
    latents: mx.array,
    t: mx.array,
    cap_feats: mx.array,
    context: mx.array,
    cap_lens: Sequence[int],
    scale: float = 1.0,
) -> dict[int, list[mx.array]]:
    """What diffusers' ZImageControlNetModel.forward returns, per sample: {layer: [hint of sample i, over its image
    tokens then its caption run]} (diffusers pads the samples to the longest)."""
    b, h, w, _ = latents.shape
    layout = transformer.layout(cap_lens, h, w)
    t = mx.broadcast_to(t, (b,))
    control = ControlInput(net, context, mx.array(scale, dtype=transformer.x_pad_token.dtype))
    samples: dict[int, list[mx.array | None]] = {place: [None] * b for place in net.config.control_layers_places}
    for group in layout.groups:
        rows = list(range(b)) if group.index is None else group.index.tolist()
        picked = [a if group.index is None else a[group.index] for a in (latents, t, cap_feats)]
        start = transformer.prologue(*picked, layout, group)
        for place, hint in control(transformer, group, start, Pacer(0)).items():
            for j, row in enumerate(rows):
                samples[place][row] = hint[j]
    return samples  # type: ignore[return-value]


def load_controlnet(folder: Path, transformer: ZImageTransformer, dtype: str, quantize: str | None) -> ZImageControlNet:
    """A ControlNet folder in diffusers' layout (config.json + safetensors), checked against the transformer before
    its weights are read."""
    config_file = Path(folder) / "config.json"
    net = ZImageControlNet(ZImageControlNetConfig.from_file(config_file))
    net.check_fits(transformer, str(config_file))
    load_module(net, folder, dtype, quantize, controlnet_quant_predicate)
    return net


def controlnet_quant_predicate(path: str, module: nn.Module) -> bool:
    """As the transformer's: the control blocks' attention and feed-forward Linears; the adaLN modulation, the patch
    embedder and the hint projections stay in the load dtype (every hint is added straight into the stream)."""
    return (
        path.startswith(("control_layers.", "control_noise_refiner."))
        and ".adaLN_modulation." not in path
        and not path.endswith(("before_proj", "after_proj"))
    )
