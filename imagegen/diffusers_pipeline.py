"""The base of pipelines over a diffusers folder (model_index.json, text_encoder + tokenizer, transformer, vae,
scheduler): loading, pacing, decoding one image at a time and the memory estimate. A family says what differs."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

import mlx.core as mx
from PIL import Image

from . import distributed, hub, scheduler
from .config import read_pipeline_index
from .image import to_bytes, to_pil
from .memory import pipeline_weight_bytes
from .nn.compiled import CompileCache
from .pipeline import Pipeline, Request
from .registry import ModelSpec
from .text import load_text_encoder
from .weights import load_model, to_dtype

MAX_TEXT_TOKENS = 512  # both families' max_sequence_length: the text tokens a step may attend to
# Peak-activation model (bytes): the transformer keeps ~16 hidden-sized bf16 maps per token in flight, and the VAE
# decoder a few 128-channel full-size bf16 maps for the one image it decodes.
TRANSFORMER_MAPS, VAE_CHANNELS, VAE_MAPS = 16, 128, 6


class DiffusersPipeline(Pipeline):
    """Loads the three components and the scheduler; subclasses set the class attributes and the four stages."""

    family_name: ClassVar[str] = ""  # in messages: "FLUX.2"
    pipeline_classes: ClassVar[tuple[str, ...]] = ()  # model_index.json's _class_name values this family loads
    transformer_class: ClassVar[type]
    transformer_config: ClassVar[type]
    quant_predicate: ClassVar[Callable[..., Any] | None] = None  # staticmethod in the subclass
    vae_class: ClassVar[type]

    def __init__(
        self,
        spec: ModelSpec,
        weights: Path,
        dtype: str = "bfloat16",
        quantize: str | None = None,
        on_load: Callable[[str, float], None] | None = None,
        pace: int = 1,
        vae: str | Path | None = None,
    ):
        """`pace`: the host waits every `pace` transformer blocks (imagegen.nn.pacing: bounded memory), the blocks
        compiled one by one; 0 never waits, the whole call compiled as one graph (`self.compiled`). `vae`: another
        VAE of the family's class, in diffusers layout (config.json and weights at the folder's root, as
        black-forest-labs/FLUX.2-small-decoder ships): a folder or a cached repo id (recorded in `components`)."""
        super().__init__(spec, weights, dtype, quantize, on_load)
        root = Path(weights)
        self.model_index = read_pipeline_index(root, self.pipeline_classes, self.family_name)
        self.configure(root)
        with self.loading("text encoder"):
            self.text_encoder = load_text_encoder(
                root / "text_encoder", root / "tokenizer", dtype, quantize, self.text_layers
            )
        with self.loading("transformer"):
            self.transformer = load_model(
                self.transformer_class,
                self.transformer_config,
                root / "transformer",
                dtype,
                quantize,
                type(self).quant_predicate,
            )
        if hasattr(self.transformer, "sequence_parallel"):  # in a rank of `imagegen run --gpus N`: its token shard
            self.transformer.sequence_parallel = distributed.from_environment()
        with self.loading("vae"):
            self.vae = self.vae_class.from_folder(self.vae_folder(root, vae), dtype)
        self.scheduler = scheduler.FlowMatchEulerConfig.from_file(root / "scheduler" / "scheduler_config.json")
        self.model_dtype = to_dtype(dtype)
        self.latent_channels = self.transformer.config.in_channels
        self.multiple = 2 * self.vae.scale_factor  # the transformer patchifies latents 2x2
        self.compiled = CompileCache()  # whole transformer calls of unpaced steps, by the step's shape
        self.pace(pace)

    text_layers: tuple[int, ...] = ()

    def configure(self, root: Path) -> None:
        """Read family settings from the checkpoint before anything loads (e.g. which text layers to use)."""

    def vae_folder(self, root: Path, vae: str | Path | None) -> Path:
        if vae is None:
            return root / "vae"
        self.components["vae"] = str(vae)
        return hub.resolve_component(vae, "--vae")

    def pace(self, every: int) -> None:
        """The host waits every `every` transformer blocks; 0: never (the step runs as one compiled graph)."""
        self.paced = every
        self.transformer.pace(every)

    def weights_changed(self) -> None:
        # compiled functions captured the arrays of the layers adapters replaced
        self.compiled.clear()
        self.transformer.compiled_blocks.clear()

    # 4. latents -> images, one at a time: the VAE's peak memory stays flat in the batch size
    def vae_latents(self, request: Request, latents: mx.array) -> mx.array:
        """The denoised state as the VAE's NHWC latents [B, h, w, C] (families that pack tokens unpack here)."""
        return latents

    def decode(self, request: Request, latents: mx.array) -> list[Image.Image]:
        """Over several ranks (imagegen.distributed), every rank decodes a band of rows and rank 0 alone returns
        the images (a tiled decode runs on rank 0 alone)."""
        spread = getattr(self.transformer, "sequence_parallel", None)
        if spread is not None and spread.rank and request.tile:
            return []
        images = []
        for one in self.vae_latents(request, latents).astype(self.vae.dtype):
            image = self.vae.decode_latents(
                one[None], tile=bool(request.tile), group=spread.group if spread is not None else None
            )
            pixels = to_bytes(image)
            mx.eval(pixels)  # on every rank: each takes part in the decode's collectives
            images.extend(to_pil(pixels) if spread is None or spread.rank == 0 else [])
        return images


def estimate_memory(
    spec: ModelSpec,
    weights: Path | None,
    dtype: str,
    quantize: str | None,
    width: int,
    height: int,
    batch: int,
    *,
    hidden_size: Callable[[Path], int],
    cfg_doubles: bool = False,
) -> int:
    """A diffusers-layout family's spec hook (bind `hidden_size` with functools.partial): peak bytes of its weights
    plus the larger of the transformer's activations (with `cfg_doubles`, a model taking guidance runs twice the
    batch) and the VAE's; 0 when the weights are not at hand."""
    cfg = 2 if cfg_doubles and spec.accepts("guidance") else 1
    if weights is None or not (Path(weights) / "transformer").is_dir():
        return 0
    root = Path(weights)
    tokens = (width // 16) * (height // 16) + MAX_TEXT_TOKENS
    transformer_activations = cfg * batch * tokens * hidden_size(root) * 2 * TRANSFORMER_MAPS
    vae_activations = width * height * VAE_CHANNELS * 2 * VAE_MAPS
    return int(pipeline_weight_bytes(root, dtype, quantize) + max(transformer_activations, vae_activations))
