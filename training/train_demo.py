"""Trains the flux2-demo model: FLUX.2 Klein's real classes in tiny configs, fit to `shapes.py`, in diffusers' layout.

Stages (each checkpointed under --work, so a rerun resumes where a crash stopped it):
  1. tokenizer: byte-level BPE with Qwen2's pre-tokenizer, trained on the captions, plus the Qwen chat tokens.
  2. vae: AutoencoderKLFlux2 (8x down) trained on 128x128 pictures (L1 + MSE + small KL).
  3. latents: the training pictures encoded as the Klein pipeline's `_encode_vae_image` does (mode, 2x2 patchify,
     BatchNorm-normalized); the VAE's `bn` running mean/var are set to these latents' statistics first.
  4. decoder: the VAE decoder alone fine-tuned on the encoder's means (+ an image-gradient L1 for sharp edges); the
     encoder, hence the latent space, is left as it is.
  5. transformer: Flux2Transformer2DModel and the Qwen3 text encoder trained jointly with the flow-matching objective
     (x_t = (1 - s) x0 + s noise, target noise - x0, the transformer gets timestep s = t / 1000), on sigmas drawn
     half uniform and half through the pipeline's `compute_empirical_mu` time shift, so the few-step schedule of
     `Flux2KleinPipeline` (no CFG, `is_distilled: true`) lands on well-trained noise levels.
  6. save: `Flux2KleinPipeline.save_pretrained` in bfloat16, plus `imagegen.json` (the call settings the demo needs).
  7. evaluate: `Flux2KleinPipeline.from_pretrained(out)` draws seen and held-out prompts, `shapes.score` checks them.

Usage: python training/train_demo.py [--device cuda] [--seed 0] [--out DIR] [--work DIR]
On one H100 (--device cuda --threads 8) the whole run takes about 12 minutes (training/results/); docs/demo-model.md
describes the model and its measured quality.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler, Flux2KleinPipeline, Flux2Transformer2DModel
from diffusers.pipelines.flux2.pipeline_flux2_klein import compute_empirical_mu
from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import BPE
from tokenizers.trainers import BpeTrainer
from transformers import Qwen2Tokenizer, Qwen3Config, Qwen3ForCausalLM
from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX  # transformers rebuilds Qwen2's on load

sys.path.insert(0, str(Path(__file__).resolve().parent))
import shapes  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "plugins" / "imagegen-flux2" / "imagegen_flux2" / "demo"

# What `imagegen run` (and diffusers' __call__) must pass for this model; written to imagegen.json.
SETTINGS = {
    "max_sequence_length": 32,
    "text_encoder_out_layers": [1, 2, 3],
    "default_size": [shapes.IMAGE_SIZE, shapes.IMAGE_SIZE],
    "default_steps": 8,
    "default_guidance": 1.0,
    # what `imagegen models` says the model knows
    "description": f"'a {{colour}} {{shape}} on a {{colour}} background'; shapes: {', '.join(shapes.SHAPES)}; "
    f"colours: {', '.join(shapes.COLOURS)}",
}

VAE_CONFIG = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [16, 32, 64, 64],
    "layers_per_block": 1,
    "latent_channels": 8,
    "norm_num_groups": 8,
    "sample_size": shapes.IMAGE_SIZE,
    "mid_block_add_attention": True,
    "batch_norm_eps": 1e-4,
    "batch_norm_momentum": 0.1,
    "patch_size": [2, 2],
}

# Layer 4 is never read (out layers 1..3), like Qwen3-4B's layers after 27 in Klein: hidden_states[-1] would be the
# final-norm output, which Klein never uses either.
TEXT_CONFIG = {
    "hidden_size": 128,
    "intermediate_size": 384,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 32,
    "max_position_embeddings": 512,
    "rope_theta": 1_000_000.0,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": True,
}

TRANSFORMER_CONFIG = {
    "patch_size": 1,
    "in_channels": 4 * VAE_CONFIG["latent_channels"],
    "num_layers": 2,
    "num_single_layers": 4,
    "attention_head_dim": 64,
    "num_attention_heads": 3,
    "joint_attention_dim": len(SETTINGS["text_encoder_out_layers"]) * TEXT_CONFIG["hidden_size"],
    "timestep_guidance_channels": 256,
    "mlp_ratio": 3.0,
    "axes_dims_rope": [16, 16, 16, 16],
    "rope_theta": 2000,
    "eps": 1e-6,
    "guidance_embeds": False,
}

# FLUX.2 Klein's scheduler_config.json.
SCHEDULER_CONFIG = {
    "base_image_seq_len": 256,
    "base_shift": 0.5,
    "invert_sigmas": False,
    "max_image_seq_len": 4096,
    "max_shift": 1.15,
    "num_train_timesteps": 1000,
    "shift": 3.0,
    "shift_terminal": None,
    "stochastic_sampling": False,
    "time_shift_type": "exponential",
    "use_beta_sigmas": False,
    "use_dynamic_shifting": True,
    "use_exponential_sigmas": False,
    "use_karras_sigmas": False,
}

# The generator's pictures vary less than the autoencoder's (shapes.SIZE_RANGE, shapes.CENTRE_JITTER): a narrower
# distribution is what a few hours of one CPU core can learn to draw crisply, and seeds still move and resize shapes.
GENERATOR_SIZE_RANGE = (52.0, 68.0)
GENERATOR_JITTER = 8.0

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
THINK_TOKENS = ["<think>", "</think>"]  # added tokens but not special, as in Qwen3's tokenizer.json
# Qwen3's chat template (Qwen/Qwen3-4B tokenizer_config.json): enable_thinking=False appends the empty think block.
CHAT_TEMPLATE = Path(__file__).resolve().parent / "qwen3_chat_template.jinja"


@dataclass
class Options:
    seed: int = 0
    device: str = "cpu"
    threads: int = 1
    work: str = "/tmp/flux2-demo-work"
    out: str = str(DEFAULT_OUT)
    vae_steps: int = 2500
    vae_batch: int = 8
    vae_lr: float = 5e-4
    kl_weight: float = 5e-4
    decoder_steps: int = 2000
    decoder_lr: float = 2e-4
    num_latents: int = 16000
    steps: int = 8000
    batch: int = 32
    lr: float = 6e-4
    warmup: int = 300
    ema: float = 0.999
    checkpoint_every: int = 250
    eval_seeds: int = 2


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def cosine_lr(step: int, total: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def save_checkpoint(path: Path, state: dict) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    tmp.replace(path)  # atomic: a crash mid-save keeps the previous checkpoint


def _state(part):
    if isinstance(part, np.random.Generator):
        return part.bit_generator.state
    if isinstance(part, torch.Generator):
        return part.get_state()
    return part if isinstance(part, dict) else part.state_dict()


def save_progress(path: Path, step: int, **parts) -> None:
    """Checkpoint modules, optimizers, generators (and plain dicts) under their names, with the step reached."""
    save_checkpoint(path, {**{name: _state(part) for name, part in parts.items()}, "step": step})


def resume(path: Path, name: str, **parts) -> tuple[int, dict]:
    """Restore what save_progress wrote into `parts` (dicts are left to the caller); the step to start from."""
    if not path.exists():
        return 0, {}
    state = torch.load(path, weights_only=False)
    for key, part in parts.items():
        if isinstance(part, np.random.Generator):
            part.bit_generator.state = state[key]
        elif isinstance(part, torch.Generator):
            part.set_state(state[key])
        else:
            part.load_state_dict(state[key])
    log(f"{name}: resumed at step {state['step']}")
    return state["step"], state


class Steps:
    """The bookkeeping every training loop shares: optimizer step with clipping, running loss, progress lines and
    when to checkpoint."""

    def __init__(self, name: str, opt: torch.optim.Optimizer, params, start: int, total: int, every: int):
        self.name, self.opt, self.params = name, opt, list(params)
        self.start, self.total, self.every = start, total, every
        self.t0, self.running = time.time(), None

    def update(self, loss: torch.Tensor) -> None:
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.opt.step()

    def report(self, step: int, loss: torch.Tensor, extra: str = "") -> bool:
        """Log every 50 steps; True when a checkpoint is due after `step`."""
        value = loss.item()
        self.running = value if self.running is None else 0.98 * self.running + 0.02 * value
        if (step + 1) % 50 == 0:
            rate = (step + 1 - self.start) / (time.time() - self.t0)
            log(f"{self.name} step {step + 1}/{self.total} loss {self.running:.4f}{extra} ({rate:.2f} it/s)")
        return (step + 1) % self.every == 0 or step + 1 == self.total


# ---------------------------------------------------------------------------------------------------------- tokenizer


def build_tokenizer(folder: Path) -> None:
    """Byte-level BPE over the captions, laid out as Qwen2's tokenizer so transformers and `tokenizers` agree."""
    tok = Tokenizer(BPE(unk_token=None, continuing_subword_prefix="", end_of_word_suffix="", fuse_unk=False))
    tok.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Lowercase()])  # "A Red Circle" works too
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    corpus = [shapes.caption(*t) for t in shapes.combinations("all")] * 2
    corpus += ["user\n", "assistant\n", "system\n", "\n\n"] * 50
    trainer = BpeTrainer(
        vocab_size=1024,
        min_frequency=2,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=SPECIAL_TOKENS,
    )
    tok.train_from_iterator(corpus, trainer)
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in THINK_TOKENS])
    hf = Qwen2Tokenizer(
        tokenizer_object=tok,
        pad_token="<|endoftext|>",
        eos_token="<|im_end|>",
        unk_token=None,
        bos_token=None,
        model_max_length=512,
    )
    hf.chat_template = CHAT_TEMPLATE.read_text()
    hf.save_pretrained(folder)


def load_tokenizer(folder: Path) -> Qwen2Tokenizer:
    return Qwen2Tokenizer.from_pretrained(folder)


def tokenize(tokenizer: Qwen2Tokenizer, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Input ids and attention mask exactly as `Flux2KleinPipeline._get_qwen3_prompt_embeds` builds them."""
    ids, masks = [], []
    for prompt in prompts:
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True, enable_thinking=False
        )
        enc = tokenizer(
            text,
            return_tensors="pt",
            padding="max_length",
            truncation=True,
            max_length=SETTINGS["max_sequence_length"],
        )
        ids.append(enc["input_ids"])
        masks.append(enc["attention_mask"])
    return torch.cat(ids), torch.cat(masks)


def prompt_embeds(text_encoder: Qwen3ForCausalLM, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Stacked hidden states (B, L, layers * hidden), the pipeline's encoding (skipping the unused lm_head)."""
    out = text_encoder.model(input_ids=ids, attention_mask=mask, output_hidden_states=True, use_cache=False)
    h = torch.stack([out.hidden_states[k] for k in SETTINGS["text_encoder_out_layers"]], dim=1)
    b, n, l, d = h.shape
    return h.permute(0, 2, 1, 3).reshape(b, l, n * d)


# -------------------------------------------------------------------------------------------------------------- vae


def to_tensor(images: list[np.ndarray], device: torch.device) -> torch.Tensor:
    x = torch.from_numpy(np.stack(images)).to(device).permute(0, 3, 1, 2).float()
    return x / 127.5 - 1.0


def train_vae(vae: AutoencoderKLFlux2, opts: Options, device: torch.device, work: Path) -> None:
    ckpt = work / "vae_train.pt"
    opt = torch.optim.AdamW(vae.parameters(), lr=opts.vae_lr, weight_decay=0.0)
    rng = np.random.default_rng(opts.seed + 1)
    gen = torch.Generator(device).manual_seed(opts.seed + 1)
    start, _ = resume(ckpt, "vae", vae=vae, opt=opt, rng=rng, gen=gen)
    combos = shapes.combinations("train")
    vae.train()
    steps = Steps("vae", opt, vae.parameters(), start, opts.vae_steps, opts.checkpoint_every)
    for step in range(start, opts.vae_steps):
        for group in opt.param_groups:
            group["lr"] = cosine_lr(step, opts.vae_steps, opts.vae_lr, 100)
        x = to_tensor([shapes.random_sample(rng, combos).image for _ in range(opts.vae_batch)], device)
        posterior = vae.encode(x).latent_dist
        z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=gen, device=device)
        y = vae.decode(z).sample
        kl = 0.5 * (posterior.mean.pow(2) + posterior.var - 1.0 - posterior.logvar).mean()
        loss = F.l1_loss(y, x) + F.mse_loss(y, x) + opts.kl_weight * kl
        steps.update(loss)
        if steps.report(step, loss, f" kl {kl.item():.3f}"):
            save_progress(ckpt, step + 1, vae=vae, opt=opt, rng=rng, gen=gen)
    vae.eval()


def image_gradients(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return x[..., 1:, :] - x[..., :-1, :], x[..., :, 1:] - x[..., :, :-1]


def finetune_decoder(vae: AutoencoderKLFlux2, opts: Options, device: torch.device, work: Path) -> None:
    """Sharpen the decoder on the encoder's means; the encoder (so the latents and BN stats) stays as it is."""
    ckpt = work / "decoder_train.pt"
    params = list(vae.decoder.parameters()) + list(vae.post_quant_conv.parameters())
    opt = torch.optim.AdamW(params, lr=opts.decoder_lr, weight_decay=0.0)
    rng = np.random.default_rng(opts.seed + 4)
    start, _ = resume(ckpt, "decoder", vae=vae, opt=opt, rng=rng)
    combos = shapes.combinations("train")
    vae.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    vae.decoder.train()
    steps = Steps("decoder", opt, params, start, opts.decoder_steps, opts.checkpoint_every)
    for step in range(start, opts.decoder_steps):
        for group in opt.param_groups:
            group["lr"] = cosine_lr(step, opts.decoder_steps, opts.decoder_lr, 50)
        x = to_tensor([shapes.random_sample(rng, combos).image for _ in range(opts.vae_batch)], device)
        with torch.no_grad():
            z = vae.encode(x).latent_dist.mode()
        y = vae.decode(z).sample
        loss = F.l1_loss(y, x) + F.mse_loss(y, x)
        loss = loss + sum(F.l1_loss(gy, gx) for gy, gx in zip(image_gradients(y), image_gradients(x)))
        steps.update(loss)
        if steps.report(step, loss):
            save_progress(ckpt, step + 1, vae=vae, opt=opt, rng=rng)
    vae.eval().requires_grad_(False)


@torch.no_grad()
def encode_latents(vae: AutoencoderKLFlux2, opts: Options, device: torch.device) -> tuple[torch.Tensor, list[str]]:
    """Patchified VAE means of the training pictures (N, 4C, h, w); sets the VAE's BatchNorm stats from them."""
    latents, captions, batch = [], [], []
    samples = shapes.dataset(opts.num_latents, opts.seed + 2, "train", GENERATOR_SIZE_RANGE, GENERATOR_JITTER)
    for sample in samples:
        batch.append(sample.image)
        captions.append(sample.caption)
        if len(batch) == 64:
            z = vae.encode(to_tensor(batch, device)).latent_dist.mode()
            latents.append(Flux2KleinPipeline._patchify_latents(z).cpu())
            batch = []
            if len(latents) % 50 == 0:
                log(f"latents: {len(captions)}/{opts.num_latents}")
    if batch:
        z = vae.encode(to_tensor(batch, device)).latent_dist.mode()
        latents.append(Flux2KleinPipeline._patchify_latents(z).cpu())
    z = torch.cat(latents).double()
    vae.bn.running_mean.copy_(z.mean(dim=(0, 2, 3)).float())
    vae.bn.running_var.copy_(z.var(dim=(0, 2, 3)).float())
    vae.bn.num_batches_tracked.fill_(1)
    return z.float(), captions


def normalize_latents(vae: AutoencoderKLFlux2, z: torch.Tensor) -> torch.Tensor:
    """(N, 4C, h, w) -> (N, h*w, 4C), as `_encode_vae_image` + `_pack_latents` leave them."""
    mean = vae.bn.running_mean.view(1, -1, 1, 1).cpu()
    std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps).cpu()
    return Flux2KleinPipeline._pack_latents((z - mean) / std)


# ------------------------------------------------------------------------------------------------------ transformer


def sample_sigmas(n: int, mu: float, gen: torch.Generator, device: torch.device) -> torch.Tensor:
    """Half uniform, half through the pipeline's exponential time shift (where its few steps actually sample)."""
    u = torch.rand(n, generator=gen, device=device).clamp(1e-4, 1.0)
    shifted = math.exp(mu) / (math.exp(mu) + (1.0 / u - 1.0))
    pick = torch.rand(n, generator=gen, device=device) < 0.5
    return torch.where(pick, shifted, u)


def train_transformer(
    transformer: Flux2Transformer2DModel,
    text_encoder: Qwen3ForCausalLM,
    latents: torch.Tensor,
    caption_index: torch.Tensor,
    ids: torch.Tensor,
    mask: torch.Tensor,
    opts: Options,
    device: torch.device,
    work: Path,
) -> None:
    ckpt = work / "train.pt"
    modules = torch.nn.ModuleDict({"transformer": transformer, "text_encoder": text_encoder})
    ema = {k: v.detach().clone() for k, v in modules.state_dict().items()}
    opt = torch.optim.AdamW(modules.parameters(), lr=opts.lr, betas=(0.9, 0.99), weight_decay=0.01)
    gen = torch.Generator(device).manual_seed(opts.seed + 3)
    start, state = resume(ckpt, "transformer", modules=modules, opt=opt, gen=gen)
    ema = state.get("ema", ema)
    floats = [k for k, v in modules.state_dict().items() if v.dtype.is_floating_point]
    live = [modules.state_dict()[k] for k in floats]  # views of the parameters, updated in place by the optimizer
    shadow = [ema[k] for k in floats]
    latents, caption_index = latents.to(device), caption_index.to(device)
    ids, mask = ids.to(device), mask.to(device)
    h = w = shapes.IMAGE_SIZE // 16
    img_ids = Flux2KleinPipeline._prepare_latent_ids(torch.zeros(1, 1, h, w))[0].to(device)
    txt_ids = Flux2KleinPipeline._prepare_text_ids(torch.zeros(1, SETTINGS["max_sequence_length"], 1))[0].to(device)
    mu = compute_empirical_mu(image_seq_len=h * w, num_steps=SETTINGS["default_steps"])
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    modules.train()
    steps = Steps("transformer", opt, modules.parameters(), start, opts.steps, opts.checkpoint_every)
    for step in range(start, opts.steps):
        for group in opt.param_groups:
            group["lr"] = cosine_lr(step, opts.steps, opts.lr, opts.warmup)
        pick = torch.randint(len(latents), (opts.batch,), generator=gen, device=device)
        x0 = latents[pick]
        cap = caption_index[pick]
        noise = torch.randn(x0.shape, generator=gen, device=device)
        sigma = sample_sigmas(opts.batch, mu, gen, device)
        xt = (1.0 - sigma[:, None, None]) * x0 + sigma[:, None, None] * noise
        with autocast:
            embeds = prompt_embeds(text_encoder, ids[cap], mask[cap])
            pred = transformer(
                hidden_states=xt,
                encoder_hidden_states=embeds,
                timestep=sigma,
                img_ids=img_ids,
                txt_ids=txt_ids,
                guidance=None,
                return_dict=False,
            )[0]
        loss = F.mse_loss(pred.float(), noise - x0)
        steps.update(loss)
        decay = min(opts.ema, (1 + step) / (10 + step))
        with torch.no_grad():
            torch._foreach_lerp_(shadow, live, 1.0 - decay)
        if steps.report(step, loss):
            save_progress(ckpt, step + 1, modules=modules, ema=ema, opt=opt, gen=gen)
    modules.load_state_dict(ema)
    modules.eval()


# ---------------------------------------------------------------------------------------------------- save, evaluate


def save_folder(
    out: Path,
    vae: AutoencoderKLFlux2,
    text_encoder: Qwen3ForCausalLM,
    transformer: Flux2Transformer2DModel,
    tokenizer_dir: Path,
) -> None:
    if out.exists():
        shutil.rmtree(out)
    pipe = Flux2KleinPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULER_CONFIG),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=load_tokenizer(tokenizer_dir),  # fresh: a used tokenizer saves its padding state in tokenizer.json
        transformer=transformer,
        is_distilled=True,
    )
    pipe.to(torch.device("cpu"), torch.bfloat16)
    pipe.save_pretrained(out, safe_serialization=True)
    config_path = out / "tokenizer" / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    for key in ("is_local", "local_files_only"):  # where transformers loaded it from, not part of the tokenizer
        config.pop(key, None)
    config_path.write_text(json.dumps(config, indent=2) + "\n")
    (out / "imagegen.json").write_text(json.dumps(SETTINGS, indent=2) + "\n")
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    log(f"saved {out} ({size / 2**20:.2f} MiB)")


def generate(pipe: Flux2KleinPipeline, prompts: list[str], seeds: list[int], steps: int) -> list:
    """One picture per (prompt, seed), with the settings of imagegen.json."""
    width, height = SETTINGS["default_size"]
    return pipe(
        prompt=prompts,
        height=height,
        width=width,
        num_inference_steps=steps,
        guidance_scale=SETTINGS["default_guidance"],
        generator=[torch.Generator().manual_seed(s) for s in seeds],
        max_sequence_length=SETTINGS["max_sequence_length"],
        text_encoder_out_layers=tuple(SETTINGS["text_encoder_out_layers"]),
    ).images


def evaluate(out: Path, seeds: int, steps_list: list[int], grid_path: Path | None = None) -> dict:
    """Accuracy of diffusers' own pipeline on every held-out prompt and as many seen ones, `seeds` seeds each."""
    pipe = Flux2KleinPipeline.from_pretrained(out, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    held = [shapes.caption(*t) for t in shapes.combinations("held_out")]
    train = shapes.combinations("train")
    seen = [shapes.caption(*train[i]) for i in np.random.default_rng(1234).choice(len(train), len(held), replace=False)]
    results = {}
    for steps in steps_list:
        for name, prompts in (("held_out", held), ("seen", seen)):
            all_prompts = [p for p in prompts for _ in range(seeds)]
            all_seeds = [s for _ in prompts for s in range(seeds)]
            t0 = time.time()
            images = [
                im
                for i in range(0, len(all_prompts), 16)
                for im in generate(pipe, all_prompts[i : i + 16], all_seeds[i : i + 16], steps)
            ]
            secs = (time.time() - t0) / len(images)
            results[f"{name}@{steps}"] = {**shapes.score(images, all_prompts), "n": len(images), "s_per_image": secs}
            log(f"eval steps={steps} {name}: {results[f'{name}@{steps}']}")
            if grid_path is not None and steps == SETTINGS["default_steps"] and name == "held_out":
                rows = [
                    np.concatenate([np.asarray(im) for im in images[i : i + 8]], axis=1)
                    for i in range(0, min(len(images), 32), 8)
                ]
                from PIL import Image

                Image.fromarray(np.concatenate(rows, axis=0)).save(grid_path)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for field, default in asdict(Options()).items():
        parser.add_argument(f"--{field.replace('_', '-')}", type=type(default), default=default)
    parser.add_argument("--eval-only", action="store_true", help="only evaluate the folder at --out")
    args = parser.parse_args()
    opts = Options(**{k: v for k, v in vars(args).items() if k != "eval_only"})
    torch.set_num_threads(opts.threads)
    device = torch.device(opts.device)
    work, out = Path(opts.work), Path(opts.out)
    work.mkdir(parents=True, exist_ok=True)
    times_path = work / "times.json"
    times = json.loads(times_path.read_text()) if times_path.exists() else {}

    def stage_done(name: str, t0: float) -> None:
        times[name] = times.get(name, 0.0) + time.time() - t0
        times_path.write_text(json.dumps(times, indent=2))

    if args.eval_only:
        print(json.dumps(evaluate(out, opts.eval_seeds, [4, 8, 16], work / "grid.png"), indent=2))
        return
    log(f"options: {asdict(opts)}")

    t0 = time.time()
    tokenizer_dir = work / "tokenizer"
    if not (tokenizer_dir / "tokenizer.json").exists():
        build_tokenizer(tokenizer_dir)
    tokenizer = load_tokenizer(tokenizer_dir)
    captions_all = [shapes.caption(*t) for t in shapes.combinations("all")]
    ids, mask = tokenize(tokenizer, captions_all)
    log(f"tokenizer: {len(tokenizer)} tokens; longest prompt {int(mask.sum(1).max())} of {ids.shape[1]}")

    torch.manual_seed(opts.seed)
    vae = AutoencoderKLFlux2(**VAE_CONFIG).to(device)
    vocab = (len(tokenizer) + 63) // 64 * 64
    pad_id = tokenizer.pad_token_id
    text_encoder = Qwen3ForCausalLM(
        Qwen3Config(vocab_size=vocab, pad_token_id=pad_id, eos_token_id=tokenizer.eos_token_id, **TEXT_CONFIG)
    )
    # Unit-scale embeddings give the transformer O(1) text features from the first step (Qwen's are large too).
    torch.nn.init.normal_(text_encoder.model.embed_tokens.weight, std=1.0)
    text_encoder.to(device)
    transformer = Flux2Transformer2DModel(**TRANSFORMER_CONFIG).to(device)
    with torch.no_grad():  # the training encoding must be the pipeline's own
        ref = Flux2KleinPipeline._get_qwen3_prompt_embeds(
            text_encoder,
            tokenizer,
            captions_all[:2],
            max_sequence_length=SETTINGS["max_sequence_length"],
            hidden_states_layers=SETTINGS["text_encoder_out_layers"],
        )
        torch.testing.assert_close(prompt_embeds(text_encoder, ids[:2].to(device), mask[:2].to(device)), ref)
    for name, m in (("vae", vae), ("text_encoder", text_encoder), ("transformer", transformer)):
        log(f"{name}: {sum(p.numel() for p in m.parameters()) / 1e6:.2f}M parameters")
    stage_done("setup", t0)

    def stage(name: str, path: Path, produce) -> dict:
        """Run a stage once (produce() returns what to keep); a rerun loads what it kept."""
        if not path.exists():
            t0 = time.time()
            save_checkpoint(path, produce())
            stage_done(name, t0)
        return torch.load(path, weights_only=False)

    def vae_stage(train) -> dict:
        train(vae, opts, device, work)
        return {"vae": vae.state_dict()}

    vae.load_state_dict(stage("vae", work / "vae.pt", lambda: vae_stage(train_vae))["vae"])
    vae.eval().requires_grad_(False)
    vae.load_state_dict(stage("decoder", work / "vae_decoder.pt", lambda: vae_stage(finetune_decoder))["vae"])

    def latents_stage() -> dict:
        latents, captions = encode_latents(vae, opts, device)
        return {"bn": vae.bn.state_dict(), "latents": latents, "captions": captions}

    state = stage("latents", work / "latents.pt", latents_stage)
    vae.bn.load_state_dict(state["bn"])
    latents = normalize_latents(vae, state["latents"])
    index = {c: i for i, c in enumerate(captions_all)}
    caption_index = torch.tensor([index[c] for c in state["captions"]])
    log(f"latents: {tuple(latents.shape)}, normalized std {latents.std():.3f}")

    def transformer_stage() -> dict:
        train_transformer(transformer, text_encoder, latents, caption_index, ids, mask, opts, device, work)
        return {"transformer": transformer.state_dict(), "text_encoder": text_encoder.state_dict()}

    state = stage("transformer", work / "done.pt", transformer_stage)
    transformer.load_state_dict(state["transformer"])
    text_encoder.load_state_dict(state["text_encoder"])

    save_folder(out, vae.cpu(), text_encoder.cpu(), transformer.cpu(), tokenizer_dir)
    log(f"stage times (s): {json.dumps({k: round(v) for k, v in times.items()})}")
    t0 = time.time()
    results = evaluate(out, opts.eval_seeds, [SETTINGS["default_steps"]], work / "grid.png")
    stage_done("evaluate", t0)
    (work / "results.json").write_text(json.dumps({"results": results, "times": times}, indent=2))
    print(json.dumps({"results": results, "times": times}, indent=2))


if __name__ == "__main__":
    main()
