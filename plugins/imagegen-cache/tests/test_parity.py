"""Step caching against diffusers' hooks: the same tiny FLUX.2 Klein base and Z-Image base checkpoints (CFG on),
the same thresholds; imagegen skips the same steps (per cond/uncond context) and gives the same image."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import (
    AutoencoderKL,
    AutoencoderKLFlux2,
    FirstBlockCacheConfig,
    FlowMatchEulerDiscreteScheduler,
    Flux2KleinPipeline,
    Flux2Transformer2DModel,
    MagCacheConfig,
    ZImagePipeline,
    ZImageTransformer2DModel,
)
from diffusers.hooks import first_block_cache, mag_cache
from diffusers.hooks._helpers import TransformerBlockRegistry
from diffusers.hooks.hooks import CacheContext, _set_cache_context
from diffusers.models.transformers.transformer_z_image import ZImageTransformerBlock
from imagegen_cache import plugin

import imagegen
from imagegen.testing import (
    KLEIN_TRANSFORMER,
    PIPELINE_VAE,
    ZIMAGE_TRANSFORMER,
    ZIMAGE_VAE,
    assert_images_match,
    make_text_parts,
    randomize_norms,
)

SIZE = (64, 48)  # width, height
STEPS = 7
PROMPT, NEGATIVE = "a red fox in the snow", "blurry"
KLEIN_SCHEDULER = {
    "base_image_seq_len": 256,
    "base_shift": 0.5,
    "max_image_seq_len": 4096,
    "max_shift": 1.15,
    "num_train_timesteps": 1000,
    "shift": 3.0,
    "use_dynamic_shifting": True,
}
KLEIN_TEXT = {"text_encoder_out_layers": [1, 2, 3], "max_sequence_length": 32}  # a short prompt, a small encoder
ZIMAGE_SCHEDULER = {"num_train_timesteps": 1000, "shift": 6.0, "use_dynamic_shifting": False}  # Z-Image (base)'s


def build_klein(folder: Path) -> Flux2KleinPipeline:
    """Klein base: 2 double + 2 single blocks, so the cache has a first block, middle blocks and a last one."""
    text = make_text_parts(folder, layers=4)
    torch.manual_seed(2)
    transformer = Flux2Transformer2DModel(**{**KLEIN_TRANSFORMER, "num_layers": 2, "num_single_layers": 2})
    vae = AutoencoderKLFlux2(**PIPELINE_VAE)
    for model in (transformer, vae):
        randomize_norms(model)
    pipe = Flux2KleinPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**KLEIN_SCHEDULER),
        vae=vae.eval(),
        transformer=transformer.eval(),
        is_distilled=False,
        **text,
    )
    pipe.save_pretrained(folder)
    (folder / "imagegen.json").write_text(json.dumps(KLEIN_TEXT))  # read by imagegen; diffusers gets them as kwargs
    return pipe


def build_zimage(folder: Path) -> ZImagePipeline:
    text = make_text_parts(folder, layers=3)
    torch.manual_seed(3)
    transformer = ZImageTransformer2DModel(**{**ZIMAGE_TRANSFORMER, "n_layers": 3})
    vae = AutoencoderKL(**ZIMAGE_VAE)
    for model in (transformer, vae):
        randomize_norms(model)
    pipe = ZImagePipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**ZIMAGE_SCHEDULER),
        vae=vae.eval(),
        transformer=transformer.eval(),
        **text,
    )
    pipe.save_pretrained(folder)
    return pipe


@pytest.fixture(scope="module")
def klein(tmp_path_factory):
    folder = tmp_path_factory.mktemp("klein_base")
    build_klein(folder)
    return folder


@pytest.fixture(scope="module")
def zimage(tmp_path_factory):
    folder = tmp_path_factory.mktemp("zimage_base")
    build_zimage(folder)
    return folder


def noise(family: str) -> np.ndarray:
    w, h = SIZE
    shape = (1, 16, h // 16, w // 16) if family == "klein" else (1, 4, h // 8, w // 8)
    return np.random.default_rng(7).standard_normal(shape).astype(np.float32)


@pytest.fixture(autouse=True)
def joint_tail_fix(monkeypatch):
    """diffusers 0.42.1's First-Block Cache fails on FLUX.2 ("Tensor - list"): its last block returns the joint
    [text, image] sequence while the first returns (text, image). Split it as diffusers' MagCache does (image
    tokens last) so the reference runs; the image stream's residual is the only one that reaches the output."""
    forward = first_block_cache.FBCBlockHook.new_forward

    def new_forward(self, module, *args, **kwargs):
        state = self.state_manager.get_state()
        joint = self.is_tail and state.should_compute and isinstance(state.head_block_output, list)
        output = forward(self, module, *args, **kwargs) if not joint else self.fn_ref.original_forward(*args, **kwargs)
        if joint:
            image, text = state.head_block_output
            state.tail_block_residuals = (output[:, -image.shape[1] :] - image, output[:, : text.shape[1]] - text)
        return output

    monkeypatch.setattr(first_block_cache.FBCBlockHook, "new_forward", new_forward)


def reference(family: str, folder: Path, config, monkeypatch) -> tuple[list, dict[str, list[int]]]:
    """diffusers' images and, per cache context, the steps whose blocks its hooks skipped."""
    skipped: dict[str, list[int]] = {}
    calls: dict[str, int] = {}
    head_hook = first_block_cache.FBCHeadBlockHook if family_config(config) == "fbc" else mag_cache.MagCacheHeadHook
    decide = head_hook.new_forward

    def recorded(hook, module, *args, **kwargs):  # the head hook sets should_compute for its context on every call
        out = decide(hook, module, *args, **kwargs)
        name = hook.state_manager._context.name
        if not hook.state_manager.get_state().should_compute:
            skipped.setdefault(name, []).append(calls.get(name, 0))
        calls[name] = calls.get(name, 0) + 1
        return out

    monkeypatch.setattr(head_hook, "new_forward", recorded)  # before enable_cache, which binds it
    if family == "zimage":  # diffusers registers ZImageTransformerBlock without naming its input, `x`
        metadata = TransformerBlockRegistry.get(ZImageTransformerBlock)
        monkeypatch.setattr(metadata, "hidden_states_argument_name", "x")
        monkeypatch.setattr(metadata, "_cached_parameter_indices", {"hidden_states": 0, "x": 0})
    cls = Flux2KleinPipeline if family == "klein" else ZImagePipeline
    pipe = cls.from_pretrained(folder, torch_dtype=torch.float32)
    if family_config(config) == "fbc":  # what CacheMixin.enable_cache does; Z-Image's model lacks the mixin
        first_block_cache.apply_first_block_cache(pipe.transformer, config)
    else:
        mag_cache.apply_mag_cache(pipe.transformer, config)
    kwargs = dict(
        prompt=PROMPT,
        guidance_scale=4.0,
        num_inference_steps=STEPS,
        latents=torch.from_numpy(noise(family)),
        width=SIZE[0],
        height=SIZE[1],
    )
    if family == "klein":  # Flux2KleinPipeline takes the negative prompt as embeddings only
        negative = pipe.encode_prompt(NEGATIVE, max_sequence_length=32, text_encoder_out_layers=(1, 2, 3))[0]
        images = pipe(
            **kwargs, negative_prompt_embeds=negative, max_sequence_length=32, text_encoder_out_layers=(1, 2, 3)
        ).images
    else:  # the Z-Image pipeline sets no cache context of its own: one context for the whole (CFG) batch
        _set_cache_context(pipe.transformer, CacheContext("cond"))
        images = pipe(**kwargs, negative_prompt=NEGATIVE).images
    return images, skipped


def family_config(config) -> str:
    return "fbc" if isinstance(config, FirstBlockCacheConfig) else "mag"


def ours(family: str, folder: Path, cache: str, monkeypatch) -> tuple[list, dict[str, list[int]]]:
    """imagegen's images and the skip record of the run's cache wrapper."""
    wrappers = []
    start = plugin.start
    monkeypatch.setattr(plugin, "start", lambda value, request: wrappers.append(start(value, request)) or wrappers[-1])
    model = "flux2-klein-base-4b" if family == "klein" else "zimage"
    pipe = imagegen.registry.get(model).pipeline(weights=folder, dtype="float32")
    result = pipe.generate(
        PROMPT,
        negative_prompt=NEGATIVE,
        guidance=4.0,
        steps=STEPS,
        latents=noise(family),
        width=SIZE[0],
        height=SIZE[1],
        cache=cache,
    )
    (wrapper,) = wrappers
    return result.images, {name: steps for name, steps in wrapper.skipped().items() if steps}


@pytest.mark.parametrize("family,threshold", [("klein", 0.68), ("zimage", 0.6)])
def test_first_block_cache_matches_diffusers(family, threshold, klein, zimage, monkeypatch):
    folder = klein if family == "klein" else zimage
    want, want_skipped = reference(family, folder, FirstBlockCacheConfig(threshold=threshold), monkeypatch)
    got, got_skipped = ours(family, folder, f"first-block:{threshold}", monkeypatch)
    print(family, "skipped", got_skipped)
    assert got_skipped == want_skipped
    assert 0 < sum(map(len, got_skipped.values())) < STEPS * len(got_skipped)  # some steps skipped, not all
    assert_images_match(got, want, max_diff=1)


@pytest.mark.parametrize("family", ["klein", "zimage"])
def test_mag_cache_matches_diffusers(family, klein, zimage, monkeypatch, tmp_path):
    folder = klein if family == "klein" else zimage
    ratios = [1.0, 1.1, 1.05, 1.02, 1.01, 1.0, 0.99, 0.98, 0.95, 0.9, 0.85, 0.8]  # resampled to STEPS, as diffusers
    config = MagCacheConfig(
        threshold=0.06, max_skip_steps=2, retention_ratio=0.2, num_inference_steps=STEPS, mag_ratios=ratios
    )
    want, want_skipped = reference(family, folder, config, monkeypatch)
    path = tmp_path / "ratios.json"
    path.write_text(json.dumps(ratios))
    got, got_skipped = ours(family, folder, f"mag:0.06,k=2,retention=0.2,ratios={path}", monkeypatch)
    print(family, "skipped", got_skipped)
    assert got_skipped == want_skipped and got_skipped
    assert_images_match(got, want, max_diff=1)


def test_mag_calibration_matches_diffusers(zimage, monkeypatch, tmp_path, capsys):
    """The measured ratios (mean over tokens of |residual| / |previous residual|) are diffusers' printed ones."""
    reference("zimage", zimage, MagCacheConfig(calibrate=True, num_inference_steps=STEPS), monkeypatch)
    printed = capsys.readouterr().out.split("mag_ratios=...):")[1].strip().splitlines()[0]
    want = json.loads(printed)
    path = tmp_path / "ratios.json"
    ours("zimage", zimage, f"mag:calibrate,ratios={path}", monkeypatch)
    got = json.loads(path.read_text())
    print("ratios", got)
    assert len(got) == STEPS and got[0] == want[0] == 1.0
    np.testing.assert_allclose(got, want, rtol=1e-4)
