"""The Z-Image ControlNet's hints against diffusers' ZImageControlNetModel (from_transformer) on tiny random
configs of the three real layouts: 1.0 (own plain noise refiner), 2.0 (control layers steer the noise refiner),
2.1 (a control noise refiner steers it); and the refusals of a ControlNet that does not fit the transformer."""

from __future__ import annotations

import json
import re

import mlx.core as mx
import numpy as np
import pytest
import torch
from diffusers import ZImageControlNetModel, ZImageTransformer2DModel
from imagegen_zimage.config import ZImageTransformerConfig
from imagegen_zimage.controlnet import ZImageControlNet, block_samples, load_controlnet
from imagegen_zimage.transformer import ZImageTransformer

import imagegen
from imagegen.testing import ZIMAGE_TRANSFORMER, randomize_norms
from imagegen.weights import load_module

TRANSFORMER = {**ZIMAGE_TRANSFORMER, "n_layers": 4, "n_refiner_layers": 2, "axes_lens": [256, 32, 32]}
SHARED = dict(all_patch_size=(2,), all_f_patch_size=(1,), dim=32, n_refiner_layers=2, n_heads=2, n_kv_heads=2)
# (control_layers_places, control_refiner_layers_places, add_control_noise_refiner, control_in_dim) per release
KINDS = {
    "1.0": dict(control_layers_places=[0, 2], control_in_dim=4),
    "2.0": dict(
        control_layers_places=[0, 1, 3],
        control_refiner_layers_places=[0, 1],
        add_control_noise_refiner="control_layers",
        control_in_dim=9,
    ),
    "2.1": dict(
        control_layers_places=[0, 2, 3],
        control_refiner_layers_places=[0, 1],
        add_control_noise_refiner="control_noise_refiner",
        control_in_dim=9,
    ),
}
CAP_LENS = (7, 40)  # caption runs of 32 and 64 tokens: two layout groups
GRID = (6, 10)  # latent H x W: 15 image tokens, padded to 32


def randomize(model: torch.nn.Module) -> None:
    """Norms, biases and pad tokens (imagegen.testing), and random (not zero-initialised) before/after projections:
    zero hints would prove nothing."""
    randomize_norms(model)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "_proj" in name:
                p.normal_(0.0, 0.3)


@pytest.fixture(scope="module")
def transformer(tmp_path_factory):
    torch.manual_seed(0)
    ref = ZImageTransformer2DModel(**TRANSFORMER).eval()
    randomize(ref)
    folder = tmp_path_factory.mktemp("zt") / "transformer"
    ref.save_pretrained(folder)
    model = ZImageTransformer(ZImageTransformerConfig.from_file(folder / "config.json"))
    load_module(model, folder, dtype="float32")
    return ref, model


def build_controlnet(folder, kind: str, seed: int = 1) -> ZImageControlNetModel:
    torch.manual_seed(seed)
    net = ZImageControlNetModel(**SHARED, **KINDS[kind]).eval()
    randomize(net)
    net.save_pretrained(folder)  # its own layers only: from_transformer lends the rest afterwards
    return net


def inputs(control_in_dim: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    h, w = GRID
    latents = rng.standard_normal((len(CAP_LENS), h, w, 4)).astype(np.float32)
    context = rng.standard_normal((len(CAP_LENS), h, w, control_in_dim)).astype(np.float32)
    caps = [rng.standard_normal((n, 16)).astype(np.float32) for n in CAP_LENS]
    return latents, context, caps, np.array([0.3, 0.8], np.float32)


def torch_layout(a: np.ndarray) -> list[torch.Tensor]:
    return [torch.from_numpy(x).permute(2, 0, 1)[:, None] for x in a]  # NHWC -> per sample [C, F=1, H, W]


@pytest.mark.parametrize("kind", list(KINDS))
def test_hints_match_diffusers(transformer, tmp_path, kind):
    ref_transformer, model = transformer
    net_ref = ZImageControlNetModel.from_transformer(build_controlnet(tmp_path, kind), ref_transformer)
    net = load_controlnet(tmp_path, model, "float32", None)
    latents, context, caps, t = inputs(KINDS[kind]["control_in_dim"])
    with torch.no_grad():
        want = net_ref(
            torch_layout(latents),
            torch.from_numpy(t),
            [torch.from_numpy(c) for c in caps],
            torch_layout(context),
            conditioning_scale=0.7,
        )
    padded = np.zeros((len(caps), max(CAP_LENS), 16), np.float32)
    for i, c in enumerate(caps):
        padded[i, : len(c)] = c
    got = block_samples(
        net, model, mx.array(latents), mx.array(t), mx.array(padded), mx.array(context), CAP_LENS, scale=0.7
    )
    assert sorted(got) == sorted(want) == KINDS[kind]["control_layers_places"]
    worst = 0.0
    for place, hints in want.items():
        scale = hints.abs().max().item()
        assert scale > 1e-2  # the hints are not vanishing
        for i, hint in enumerate(got[place]):
            expected = hints[i, : hint.shape[0]].numpy()  # diffusers pads the shorter sample
            np.testing.assert_allclose(np.array(hint), expected, rtol=0, atol=2e-5 * scale)
            worst = max(worst, float(np.abs(np.array(hint) - expected).max()) / scale)
    print(f"{kind}: max hint error relative to max |hint| {worst:.1e}")


@pytest.mark.parametrize("pace", [0, 1])
def test_transformer_with_hints_matches_diffusers(transformer, tmp_path, pace):
    """The transformer adds each hint after its layer, as diffusers' controlnet_block_samples; pace 1: both models'
    blocks compiled one by one, as the pipelines run them."""
    ref_transformer, model = transformer
    net_ref = ZImageControlNetModel.from_transformer(build_controlnet(tmp_path, "2.1"), ref_transformer)
    net = load_controlnet(tmp_path, model, "float32", None)
    latents, context, caps, t = inputs(9, seed=3)
    with torch.no_grad():
        x, tt, cc = torch_layout(latents), torch.from_numpy(t), [torch.from_numpy(c) for c in caps]
        samples = net_ref(x, tt, cc, torch_layout(context), conditioning_scale=0.75)
        out = ref_transformer(x, tt, cc, controlnet_block_samples=samples, return_dict=False)[0]
    want = np.stack([o[:, 0].permute(1, 2, 0).numpy() for o in out])
    from imagegen_zimage.controlnet import ControlInput

    padded = np.zeros((len(caps), max(CAP_LENS), 16), np.float32)
    for i, c in enumerate(caps):
        padded[i, : len(c)] = c
    control = ControlInput(net, mx.array(context), mx.array(0.75))
    model.pace(pace)
    net.pace(pace)
    got = np.array(
        model(mx.array(latents), mx.array(t), mx.array(padded), model.layout(CAP_LENS, *GRID), control=control)
    )
    model.pace(0)
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-5 * np.abs(want).max())


def test_2_0_file_with_an_unused_noise_refiner_loads(transformer, tmp_path):
    """alibaba-pai's 2.0 file also holds control_noise_refiner weights "control_layers" mode never reads; diffusers'
    single-file conversion drops them, and so does the loader."""
    _, model = transformer
    build_controlnet(tmp_path, "2.0")
    extra = ZImageControlNet(ZImageControlNetConfig_2_1())
    from mlx.utils import tree_flatten

    weights = dict(mx.load(str(tmp_path / "diffusion_pytorch_model.safetensors")))
    weights.update({k: v for k, v in tree_flatten(extra.parameters()) if k.startswith("control_noise_refiner.")})
    mx.save_safetensors(str(tmp_path / "diffusion_pytorch_model.safetensors"), weights)
    assert "control_noise_refiner" not in load_controlnet(tmp_path, model, "float32", None)


def ZImageControlNetConfig_2_1():  # noqa: N802 (a config, named as the release)
    from imagegen_zimage.config import ZImageControlNetConfig

    return ZImageControlNetConfig(**SHARED, **KINDS["2.1"])


@pytest.mark.parametrize(
    "field, value, words",
    [
        ("dim", 64, "dim 64 does not match the transformer's 32"),
        ("control_in_dim", 5, "control_in_dim 5 must be the transformer's 4 latent channels or 9"),
        ("control_layers_places", [0, 4], "control_layers_places [0, 4] must be layer indices below 4"),
    ],
)
def test_a_controlnet_for_another_model_is_refused(transformer, tmp_path, field, value, words):
    _, model = transformer
    config = {**SHARED, **KINDS["1.0"], field: value}
    if field == "dim":
        config["n_heads"] = 4
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(imagegen.WeightsError, match=re.escape("config.json: " + words)):
        load_controlnet(tmp_path, model, "float32", None)
