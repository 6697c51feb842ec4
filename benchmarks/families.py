"""The benchmarked models: real configs (full size) and tiny ones (CPU tests), random-weight checkpoints written in the
diffusers layout, and for each implementation (imagegen, diffusers, mflux) how to call its transformer, VAE and text
encoder on identical inputs; plus the FLOPs of one transformer step.

Configs are the checkpoints' own files: black-forest-labs/FLUX.2-klein-4B and -9B (transformer, vae, scheduler),
Tongyi-MAI/Z-Image-Turbo, Qwen/Qwen3-4B and Qwen/Qwen3-8B (the text encoders). torch, diffusers and mflux are
imported inside the methods that need them, so a missing package fails only the sections that use it."""

from __future__ import annotations

import inspect
import json
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np

BF16 = "bfloat16"


@dataclass(frozen=True)
class Scale:
    """The shapes a run uses: the real ones, or tiny ones that run on a CPU in seconds."""

    size: int  # main image side in pixels
    sizes: tuple[int, ...]  # other sides, for how the step cost grows with pixels
    text_len: int  # prompt tokens (Klein pads every prompt to this)
    batch: int  # the larger batch
    tiny: bool


FULL = Scale(size=1024, sizes=(512, 2048), text_len=512, batch=4, tiny=False)
TINY = Scale(size=32, sizes=(16, 64), text_len=32, batch=2, tiny=True)

# Qwen/Qwen3-4B and Qwen/Qwen3-8B config.json (the FLUX.2 Klein and Z-Image text encoders)
QWEN3_4B = dict(
    architectures=["Qwen3ForCausalLM"],
    attention_bias=False,
    attention_dropout=0.0,
    bos_token_id=151643,
    eos_token_id=151645,
    head_dim=128,
    hidden_act="silu",
    hidden_size=2560,
    initializer_range=0.02,
    intermediate_size=9728,
    max_position_embeddings=40960,
    max_window_layers=36,
    model_type="qwen3",
    num_attention_heads=32,
    num_hidden_layers=36,
    num_key_value_heads=8,
    rms_norm_eps=1e-6,
    rope_scaling=None,
    rope_theta=1000000,
    sliding_window=None,
    tie_word_embeddings=True,
    use_cache=True,
    use_sliding_window=False,
    vocab_size=151936,
)
QWEN3_8B = {**QWEN3_4B, "hidden_size": 4096, "intermediate_size": 12288, "tie_word_embeddings": False}
# Tiny Qwen3 with 28 layers: Klein reads hidden states 9, 18 and 27
QWEN3_TINY = dict(
    QWEN3_4B,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=28,
    num_attention_heads=2,
    num_key_value_heads=1,
    head_dim=16,
    vocab_size=416,
    max_window_layers=28,
    bos_token_id=None,
    eos_token_id=None,
)

# black-forest-labs/FLUX.2-klein-4B / -9B transformer/config.json
KLEIN_4B = dict(
    attention_head_dim=128,
    axes_dims_rope=[32, 32, 32, 32],
    eps=1e-6,
    guidance_embeds=False,
    in_channels=128,
    joint_attention_dim=7680,
    mlp_ratio=3.0,
    num_attention_heads=24,
    num_layers=5,
    num_single_layers=20,
    out_channels=None,
    patch_size=1,
    rope_theta=2000,
    timestep_guidance_channels=256,
)
KLEIN_9B = {
    **KLEIN_4B,
    "joint_attention_dim": 12288,
    "num_attention_heads": 32,
    "num_layers": 8,
    "num_single_layers": 24,
}
KLEIN_TINY = {
    **KLEIN_4B,
    "attention_head_dim": 8,
    "axes_dims_rope": [2, 2, 2, 2],
    "in_channels": 16,
    "joint_attention_dim": 96,
    "num_attention_heads": 2,
    "num_layers": 1,
    "num_single_layers": 2,
    "timestep_guidance_channels": 32,
}
# vae/config.json (AutoencoderKLFlux2); the tiny one has 4 latent channels, so 16 transformer channels
FLUX2_VAE = dict(
    act_fn="silu",
    batch_norm_eps=1e-4,
    batch_norm_momentum=0.1,
    block_out_channels=[128, 256, 512, 512],
    down_block_types=["DownEncoderBlock2D"] * 4,
    in_channels=3,
    latent_channels=32,
    layers_per_block=2,
    mid_block_add_attention=True,
    norm_num_groups=32,
    out_channels=3,
    patch_size=[2, 2],
    sample_size=1024,
    up_block_types=["UpDecoderBlock2D"] * 4,
    use_post_quant_conv=True,
    use_quant_conv=True,
)
FLUX2_VAE_TINY = {
    **FLUX2_VAE,
    "block_out_channels": [8, 8, 8, 8],
    "latent_channels": 4,
    "layers_per_block": 1,
    "norm_num_groups": 4,
    "sample_size": 64,
}
# scheduler/scheduler_config.json of Klein
KLEIN_SCHEDULER = dict(
    base_image_seq_len=256,
    base_shift=0.5,
    max_image_seq_len=4096,
    max_shift=1.15,
    num_train_timesteps=1000,
    shift=3.0,
    use_dynamic_shifting=True,
)

# Tongyi-MAI/Z-Image-Turbo transformer/config.json, vae/config.json (the FLUX.1 VAE), scheduler_config.json
ZIMAGE = dict(
    all_f_patch_size=[1],
    all_patch_size=[2],
    axes_dims=[32, 48, 48],
    axes_lens=[1536, 512, 512],
    cap_feat_dim=2560,
    dim=3840,
    in_channels=16,
    n_heads=30,
    n_kv_heads=30,
    n_layers=30,
    n_refiner_layers=2,
    norm_eps=1e-5,
    qk_norm=True,
    rope_theta=256.0,
    t_scale=1000.0,
)
ZIMAGE_TINY = {
    **ZIMAGE,
    "axes_dims": [8, 4, 4],
    "axes_lens": [256, 64, 64],
    "cap_feat_dim": 32,
    "dim": 32,
    "n_heads": 2,
    "n_kv_heads": 2,
    "n_layers": 2,
    "n_refiner_layers": 1,
}
ZIMAGE_VAE = dict(
    act_fn="silu",
    block_out_channels=[128, 256, 512, 512],
    down_block_types=["DownEncoderBlock2D"] * 4,
    force_upcast=True,
    in_channels=3,
    latent_channels=16,
    layers_per_block=2,
    mid_block_add_attention=True,
    norm_num_groups=32,
    out_channels=3,
    sample_size=1024,
    scaling_factor=0.3611,
    shift_factor=0.1159,
    up_block_types=["UpDecoderBlock2D"] * 4,
    use_post_quant_conv=False,
    use_quant_conv=False,
)
ZIMAGE_VAE_TINY = {
    **ZIMAGE_VAE,
    "block_out_channels": [8, 8, 8, 8],
    "layers_per_block": 1,
    "norm_num_groups": 4,
    "sample_size": 64,
}
ZIMAGE_SCHEDULER = dict(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=False)


MFLUX_LATENT_CHANNELS = {"Flux2": 32, "ZImage": 16}


def torch_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def to_torch(a: np.ndarray, device: str, dtype: Any = None) -> Any:
    import torch

    t = torch.from_numpy(np.ascontiguousarray(a)).to(device)
    return t.to(dtype) if dtype is not None else t


def to_numpy(x: Any) -> np.ndarray:
    """An mx or torch array as float32 numpy."""
    if isinstance(x, mx.array):
        return np.array(x.astype(mx.float32))
    return x.detach().float().cpu().numpy()


def quiet() -> None:
    """No progress bars or advisory warnings from transformers and diffusers between the JSON lines."""
    import diffusers
    import transformers

    for library in (transformers, diffusers):
        library.utils.logging.set_verbosity_error()
        library.utils.logging.disable_progress_bar()


def _kwargs_for(cls: type, config: dict[str, Any]) -> dict[str, Any]:
    """The config entries cls.__init__ takes (mflux's constructors name a subset of the diffusers keys)."""
    names = inspect.signature(cls.__init__).parameters
    return {k: tuple(v) if isinstance(v, list) else v for k, v in config.items() if k in names}


def _randomize_norms(model: Any) -> None:
    """Norm weights start at one and pad tokens at zero: randomize them, so parity sees them (mildly: full size)."""
    from imagegen.testing import randomize_norms

    randomize_norms(model, spread=0.1, biases=False)


class Family(ABC):
    """What every benchmarked model provides; Flux2 and ZImage fill it in."""

    default_steps: int
    text_layers: tuple[int, ...]  # Qwen3 hidden states the pipeline conditions on
    thinking: bool  # the chat template's enable_thinking
    latent_channels: int  # VAE latent channels
    pads_prompt: bool  # every prompt token up to max_length reaches the transformer (else only the prompt's own)
    has_refs = False

    def __init__(self, model_id: str, scale: Scale):
        self.id, self.scale = model_id, scale

    @property
    def max_length(self) -> int:
        """Prompt tokens the pipelines pad or truncate to (Klein feeds all of them to the transformer)."""
        return self.scale.text_len

    # -- checkpoint -------------------------------------------------------------------------------
    def write_folder(self, folder: Path, device: str) -> None:
        """A random-weight checkpoint in the diffusers layout, built on `device` in bfloat16 and saved."""
        import torch
        from transformers import AutoTokenizer

        from imagegen.testing import make_tokenizer

        quiet()
        make_tokenizer(folder / "tokenizer")
        previous = torch.get_default_dtype()
        torch.manual_seed(0)
        try:
            torch.set_default_dtype(torch.bfloat16)
            with torch.device(device):
                pipe = self.build_diffusers(AutoTokenizer.from_pretrained(folder / "tokenizer"))
        finally:
            torch.set_default_dtype(previous)
        pipe.save_pretrained(folder, safe_serialization=True)
        if self.max_length != 512:  # tiny runs: keep the prompt as short as diffusers is told to make it
            (folder / "imagegen.json").write_text(json.dumps({"max_sequence_length": self.max_length}))

    @abstractmethod
    def pipeline_class(self) -> type:
        """The diffusers pipeline class."""

    @abstractmethod
    def build_diffusers(self, tokenizer: Any) -> Any:
        """The diffusers pipeline with random components of the real configs (on torch's current device)."""

    def diffusers_pipeline(self, folder: Path, device: str) -> Any:
        import torch

        quiet()
        pipe = self.pipeline_class().from_pretrained(folder, dtype=torch.bfloat16).to(device)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    # -- text encoder -----------------------------------------------------------------------------
    def qwen3_config(self) -> dict[str, Any]:
        return QWEN3_TINY if self.scale.tiny else QWEN3_4B

    def qwen3_torch(self, base: bool) -> Any:
        from transformers import Qwen3Config, Qwen3ForCausalLM, Qwen3Model

        model = (Qwen3Model if base else Qwen3ForCausalLM)(Qwen3Config(**self.qwen3_config())).eval()
        _randomize_norms(model)
        return model

    # -- shapes -----------------------------------------------------------------------------------
    @abstractmethod
    def tokens(self, size: int, refs: int = 0) -> int:
        """Image tokens of one sample at size x size (reference images the same size)."""

    @abstractmethod
    def flops(self, size: int, text_len: int, batch: int = 1, refs: int = 0) -> float:
        """Matmul and attention FLOPs of one transformer forward (norms, RoPE, activations not counted)."""

    def vae_latents(self, size: int, seed: int = 0, channels: int | None = None) -> np.ndarray:
        """Raw VAE latents [1, C, size/8, size/8] (NCHW, as diffusers and mflux take them)."""
        rng = np.random.default_rng(seed)
        c = channels or self.latent_channels
        return rng.standard_normal((1, c, size // 8, size // 8)).astype(np.float32)

    def mflux_latents(self, size: int) -> np.ndarray:
        """mflux's VAEs have the real latent channels and (Z-Image's) full-size blocks even in tiny runs, where a
        CPU decodes them only at 8x8 pixels."""
        return self.vae_latents(8 if self.scale.tiny else size, channels=MFLUX_LATENT_CHANNELS[type(self).__name__])


class Flux2(Family):
    """FLUX.2 Klein (distilled): 4 steps, Qwen3 layers 9/18/27 per token, reference images for editing."""

    default_steps = 4
    text_layers = (9, 18, 27)
    thinking = False
    pads_prompt = True
    has_refs = True

    def __init__(self, model_id: str, scale: Scale):
        super().__init__(model_id, scale)
        big = model_id.endswith("9b")
        self.transformer_config = KLEIN_TINY if scale.tiny else (KLEIN_9B if big else KLEIN_4B)
        self.vae_config = FLUX2_VAE_TINY if scale.tiny else FLUX2_VAE
        self.qwen3 = QWEN3_TINY if scale.tiny else (QWEN3_8B if big else QWEN3_4B)
        self.latent_channels = self.vae_config["latent_channels"]

    def qwen3_config(self) -> dict[str, Any]:
        return self.qwen3

    def pipeline_class(self) -> type:
        from diffusers import Flux2KleinPipeline

        return Flux2KleinPipeline

    def build_diffusers(self, tokenizer: Any) -> Any:
        from diffusers import AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler, Flux2Transformer2DModel

        transformer = Flux2Transformer2DModel(**self.transformer_config).eval()
        _randomize_norms(transformer)
        vae = AutoencoderKLFlux2(**self.vae_config).eval()
        return self.pipeline_class()(
            scheduler=FlowMatchEulerDiscreteScheduler(**KLEIN_SCHEDULER),
            vae=vae,
            text_encoder=self.qwen3_torch(base=False),
            tokenizer=tokenizer,
            transformer=transformer,
            is_distilled=True,
        )

    def tokens(self, size: int, refs: int = 0) -> int:
        return (size // 16) ** 2 * (1 + refs)

    def flops(self, size: int, text_len: int, batch: int = 1, refs: int = 0) -> float:
        c = self.transformer_config
        d = c["num_attention_heads"] * c["attention_head_dim"]
        m = int(d * c["mlp_ratio"])
        n_img = self.tokens(size, refs)
        n = n_img + text_len
        attention = 4 * n * n * d  # QK^T and AV over all heads
        double = 2 * n * d * 3 * d + attention + 2 * n * d * d + 2 * n * 3 * d * m
        single = 2 * n * d * (3 * d + 2 * m) + attention + 2 * n * (d + m) * d
        embed = 2 * n_img * c["in_channels"] * d * 2 + 2 * text_len * c["joint_attention_dim"] * d
        return float(batch * (c["num_layers"] * double + c["num_single_layers"] * single + embed))

    # -- step inputs: numpy, shared by the three implementations -------------------------------------
    def step_inputs(self, size: int, batch: int = 1, refs: int = 0, seed: int = 0) -> dict[str, Any]:
        from imagegen_flux2.transformer import latent_ids, reference_ids, text_ids

        rng = np.random.default_rng(seed)
        c, length = self.transformer_config, self.scale.text_len
        grid = (size // 16, size // 16)
        ref_grids = (grid,) * refs
        n = self.tokens(size, refs)
        ids = np.concatenate([latent_ids(*grid), reference_ids(ref_grids)])
        return {
            "x": rng.standard_normal((batch, n, c["in_channels"])).astype(np.float32),
            "text": rng.standard_normal((batch, length, c["joint_attention_dim"])).astype(np.float32),
            "t": np.full((batch,), 0.7, np.float32),
            "grid": grid,
            "ref_grids": ref_grids,
            "img_ids": ids,
            "txt_ids": text_ids(length),
        }

    def imagegen_step(self, transformer: Any, inputs: dict[str, Any], compiled: bool, pace: int = 0) -> Any:
        x, text = (mx.array(inputs[k]).astype(mx.bfloat16) for k in ("x", "text"))
        t = mx.array(inputs["t"])
        rope = transformer.rope(text.shape[1], inputs["grid"], inputs["ref_grids"])
        transformer.pace(pace)
        forward = mx.compile(transformer) if compiled and not pace else transformer
        return lambda: forward(x, text, t, rope)

    def diffusers_step(self, transformer: Any, inputs: dict[str, Any], device: str) -> Any:
        import torch

        # dtypes, strides and call as Flux2KleinPipeline makes them (a torch.compile'd transformer is not recompiled):
        # latents packed by a permute ([B, C, N] in memory), ids expanded over the batch before moving to the device
        text, t = (to_torch(inputs[k], device, torch.bfloat16) for k in ("text", "t"))
        x = to_torch(inputs["x"].transpose(0, 2, 1), device, torch.bfloat16).permute(0, 2, 1)
        b = x.shape[0]
        img_ids = torch.from_numpy(inputs["img_ids"]).unsqueeze(0).expand(b, -1, -1).to(device)
        txt_ids = torch.from_numpy(np.stack([inputs["txt_ids"]] * b)).to(device)
        return lambda: transformer(
            hidden_states=x,
            timestep=t,
            guidance=None,
            encoder_hidden_states=text,
            txt_ids=txt_ids,
            img_ids=img_ids,
            joint_attention_kwargs=None,
            return_dict=False,
        )[0]

    def mflux_transformer(self) -> Any:
        from mflux.models.flux2.model.flux2_transformer.transformer import Flux2Transformer

        model = Flux2Transformer(**_kwargs_for(Flux2Transformer, self.transformer_config))
        model.set_dtype(mx.bfloat16)
        mx.eval(model.parameters())
        return model

    def mflux_step(self, model: Any, inputs: dict[str, Any], compiled: bool) -> Any:
        x, text = (mx.array(inputs[k]).astype(mx.bfloat16) for k in ("x", "text"))
        t, img_ids, txt_ids = mx.array(inputs["t"]), mx.array(inputs["img_ids"]), mx.array(inputs["txt_ids"])

        def predict(x, text, t, img_ids, txt_ids):  # mflux's own predict closure, without CFG
            return model(hidden_states=x, encoder_hidden_states=text, timestep=t, img_ids=img_ids, txt_ids=txt_ids)

        forward = mx.compile(predict) if compiled else predict
        return lambda: forward(x, text, t, img_ids, txt_ids)

    def mflux_vae(self) -> Any:
        from mflux.models.flux2.model.flux2_vae.vae import Flux2VAE

        vae = Flux2VAE(decoder_block_out_channels=(32,) * 4 if self.scale.tiny else (128, 256, 512, 512))
        vae.set_dtype(mx.bfloat16)
        mx.eval(vae.decoder.parameters())  # the encoder is never run: leave its initialisation unevaluated
        return vae

    # -- pipelines ---------------------------------------------------------------------------------
    def imagegen_components(self, pipe: Any, folder: Path) -> dict[str, Any]:
        if pipe is not None:
            return {"transformer": pipe.transformer, "vae": pipe.vae, "text_encoder": pipe.text_encoder}
        return _load_components(folder, self.imagegen_transformer(folder), "imagegen_flux2.vae", "AutoencoderKLFlux2")

    def imagegen_transformer(self, folder: Path, quantize: str | None = None) -> Any:
        from imagegen_flux2.config import Flux2TransformerConfig
        from imagegen_flux2.transformer import Flux2Transformer, quant_predicate

        from imagegen.weights import load_module

        model = Flux2Transformer(Flux2TransformerConfig.from_file(folder / "transformer" / "config.json"))
        load_module(model, folder / "transformer", BF16, quantize, quant_predicate)
        return model

    def diffusers_encode(self, pipe: Any, prompt: str, device: str) -> Any:
        return pipe.encode_prompt(prompt, device=device, max_sequence_length=self.max_length)[0]

    def diffusers_generate(
        self, pipe: Any, prompt: str, size: int, steps: int, latents: Any = None, seed: int = 0
    ) -> list:
        import torch

        generator = torch.Generator(pipe.device).manual_seed(seed)
        return pipe(
            prompt=prompt,
            height=size,
            width=size,
            num_inference_steps=steps,
            guidance_scale=1.0,
            generator=generator,
            latents=latents,
            max_sequence_length=self.max_length,
        ).images

    def noise(self, size: int, seed: int = 0) -> np.ndarray:
        """diffusers' `latents=` for one image: [1, 4 * latent_channels, size/16, size/16]."""
        rng = np.random.default_rng(seed)
        return rng.standard_normal((1, 4 * self.latent_channels, size // 16, size // 16)).astype(np.float32)


class ZImage(Family):
    """Z-Image Turbo: a single-stream DiT over [image, caption] tokens; Qwen3's second-to-last hidden state."""

    default_steps = 9  # the Turbo model card's num_inference_steps
    text_layers = (-2,)
    thinking = True
    pads_prompt = False

    def __init__(self, model_id: str, scale: Scale):
        super().__init__(model_id, scale)
        self.transformer_config = ZIMAGE_TINY if scale.tiny else ZIMAGE
        self.vae_config = ZIMAGE_VAE_TINY if scale.tiny else ZIMAGE_VAE
        self.latent_channels = self.vae_config["latent_channels"]

    @property
    def max_length(self) -> int:
        return 512  # both pipelines' max_sequence_length; only the prompt's own tokens reach the transformer

    def pipeline_class(self) -> type:
        from diffusers import ZImagePipeline

        return ZImagePipeline

    def build_diffusers(self, tokenizer: Any) -> Any:
        from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, ZImageTransformer2DModel

        transformer = ZImageTransformer2DModel(**self.transformer_config).eval()
        _randomize_norms(transformer)
        vae = AutoencoderKL(**self.vae_config).eval()
        return self.pipeline_class()(
            scheduler=FlowMatchEulerDiscreteScheduler(**ZIMAGE_SCHEDULER),
            vae=vae,
            text_encoder=self.qwen3_torch(base=True),
            tokenizer=tokenizer,
            transformer=transformer,
        )

    def tokens(self, size: int, refs: int = 0) -> int:
        return (size // 16) ** 2

    def flops(self, size: int, text_len: int, batch: int = 1, refs: int = 0) -> float:
        c = self.transformer_config
        d = c["dim"]
        f = int(d / 3 * 8)
        image = -(-self.tokens(size) // 32) * 32
        caption = -(-text_len // 32) * 32

        def block(n: int) -> int:
            return 2 * n * d * 3 * d + 4 * n * n * d + 2 * n * d * d + 2 * n * 3 * d * f

        refiners = c["n_refiner_layers"] * (block(image) + block(caption))
        patch = 4 * c["in_channels"]
        embed = 2 * image * patch * d * 2 + 2 * caption * c["cap_feat_dim"] * d
        return float(batch * (refiners + c["n_layers"] * block(image + caption) + embed))

    def step_inputs(self, size: int, batch: int = 1, refs: int = 0, seed: int = 0) -> dict[str, Any]:
        if refs:
            raise ValueError("Z-Image Turbo takes no reference images")
        rng = np.random.default_rng(seed)
        c, h = self.transformer_config, size // 8
        return {
            "latents": rng.standard_normal((batch, h, h, c["in_channels"])).astype(np.float32),  # NHWC
            "caps": rng.standard_normal((batch, self.scale.text_len, c["cap_feat_dim"])).astype(np.float32),
            "t": np.full((batch,), 0.3, np.float32),
        }

    def imagegen_step(self, transformer: Any, inputs: dict[str, Any], compiled: bool, pace: int = 0) -> Any:
        latents, caps = (mx.array(inputs[k]).astype(mx.bfloat16) for k in ("latents", "caps"))
        t = mx.array(inputs["t"])
        b, h, w, _ = latents.shape
        layout = transformer.layout([caps.shape[1]] * b, h, w)

        def forward(latents, t, caps):
            return transformer(latents, t, caps, layout)

        transformer.pace(pace)
        forward = mx.compile(forward) if compiled and not pace else forward
        return lambda: forward(latents, t, caps)

    def diffusers_step(self, transformer: Any, inputs: dict[str, Any], device: str) -> Any:
        import torch

        latents = to_torch(inputs["latents"], device, torch.bfloat16).permute(0, 3, 1, 2)[:, :, None]  # [B,C,1,H,W]
        caps = to_torch(inputs["caps"], device, torch.bfloat16)
        t = to_torch(inputs["t"], device)
        xs, cs = list(latents.unbind(0)), list(caps.unbind(0))

        def forward() -> Any:
            out = transformer(xs, t, cs, return_dict=False)[0]
            return torch.stack([o[:, 0] for o in out]).permute(0, 2, 3, 1)  # back to NHWC

        return forward

    def mflux_transformer(self) -> Any:
        from mflux.models.z_image.model.z_image_transformer.transformer import ZImageTransformer

        model = ZImageTransformer(**_kwargs_for(ZImageTransformer, self.transformer_config))
        model.set_dtype(mx.bfloat16)
        mx.eval(model.parameters())
        return model

    def mflux_step(self, model: Any, inputs: dict[str, Any], compiled: bool) -> Any:
        if inputs["latents"].shape[0] != 1:
            raise ValueError("mflux's Z-Image transformer takes one image at a time")
        x = mx.array(inputs["latents"][0]).astype(mx.bfloat16).transpose(2, 0, 1)[:, None]  # [C, 1, H, W]
        caps = mx.array(inputs["caps"][0]).astype(mx.bfloat16)
        t, sigmas = mx.array(inputs["t"]), mx.array([1.0, 0.0])

        def predict(x, t, caps):  # mflux's own predict closure, without CFG
            return model(x=x, timestep=t, sigmas=sigmas, cap_feats=caps)

        forward = mx.compile(predict) if compiled else predict
        return lambda: forward(x, t, caps)

    def mflux_vae(self) -> Any:
        from mflux.models.z_image.model.z_image_vae.vae import VAE

        vae = VAE()
        vae.set_dtype(mx.bfloat16)
        mx.eval(vae.decoder.parameters())  # the encoder is never run: leave its initialisation unevaluated
        return vae

    def imagegen_components(self, pipe: Any, folder: Path) -> dict[str, Any]:
        if pipe is not None and all(hasattr(pipe, k) for k in ("transformer", "vae", "text_encoder")):
            return {"transformer": pipe.transformer, "vae": pipe.vae, "text_encoder": pipe.text_encoder}
        return _load_components(folder, self.imagegen_transformer(folder), "imagegen.nn", "AutoencoderKL")

    def imagegen_transformer(self, folder: Path, quantize: str | None = None) -> Any:
        from imagegen_zimage.config import ZImageTransformerConfig
        from imagegen_zimage.transformer import ZImageTransformer, quant_predicate

        from imagegen.weights import load_module

        model = ZImageTransformer(ZImageTransformerConfig.from_file(folder / "transformer" / "config.json"))
        load_module(model, folder / "transformer", BF16, quantize, quant_predicate)
        return model

    def diffusers_encode(self, pipe: Any, prompt: str, device: str) -> Any:
        embeds, _ = pipe.encode_prompt(
            prompt, device=device, do_classifier_free_guidance=False, max_sequence_length=self.max_length
        )
        return embeds[0]

    def diffusers_generate(
        self, pipe: Any, prompt: str, size: int, steps: int, latents: Any = None, seed: int = 0
    ) -> list:
        import torch

        generator = torch.Generator(pipe.device).manual_seed(seed)
        return pipe(
            prompt=prompt,
            height=size,
            width=size,
            num_inference_steps=steps,
            guidance_scale=0.0,
            generator=generator,
            latents=latents,
            max_sequence_length=self.max_length,
        ).images

    def noise(self, size: int, seed: int = 0) -> np.ndarray:
        """diffusers' `latents=` for one image: [1, latent_channels, size/8, size/8]."""
        rng = np.random.default_rng(seed)
        return rng.standard_normal((1, self.latent_channels, size // 8, size // 8)).astype(np.float32)


def _load_components(folder: Path, transformer: Any, vae_module: str, vae_class: str) -> dict[str, Any]:
    """The imagegen components loaded one by one, for a family whose pipeline is not available."""
    import importlib

    from imagegen.text import load_text_encoder

    vae = getattr(importlib.import_module(vae_module), vae_class).from_folder(folder / "vae", BF16)
    text_encoder = load_text_encoder(folder / "text_encoder", folder / "tokenizer", BF16)
    return {"transformer": transformer, "vae": vae, "text_encoder": text_encoder}


FAMILIES: dict[str, type[Family]] = {"flux2-klein-4b": Flux2, "flux2-klein-9b": Flux2, "zimage-turbo": ZImage}
# How much longer than Klein 4B a section takes, for the time budget
COST = {"flux2-klein-4b": 1.0, "flux2-klein-9b": 2.2, "zimage-turbo": 2.0}


def family(model_id: str, scale: Scale) -> Family:
    if model_id not in FAMILIES:
        raise ValueError(f"unknown model '{model_id}' (known: {', '.join(FAMILIES)})")
    return FAMILIES[model_id](model_id, scale)
