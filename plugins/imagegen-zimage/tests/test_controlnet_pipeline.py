"""Whole pipelines with a ControlNet against diffusers' ZImageControlNetPipeline and ZImageControlNetInpaintPipeline:
the same tiny random checkpoint and ControlNet folders (diffusers layout), the same `latents=`, float32; and the
requests a pipeline refuses."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import ZImageControlNetInpaintPipeline, ZImageControlNetModel, ZImageControlNetPipeline
from imagegen_zimage.plugin import variant

import imagegen
from imagegen.testing import assert_images_match, draw, draw_reference, randomize_norms, sibling_module, smooth_picture

base = sibling_module(__file__, "test_pipeline")  # its pictures and masks
SIZE = base.SIZE
SHARED = dict(all_patch_size=(2,), all_f_patch_size=(1,), dim=32, n_refiner_layers=1, n_heads=2, n_kv_heads=2)
UNION_1 = dict(control_layers_places=[0, 1], control_in_dim=4)  # the 1.0 layout: control image latents only
UNION_2 = dict(
    control_layers_places=[0, 1],
    control_refiner_layers_places=[0],  # 2.1: control, mask, masked image
    add_control_noise_refiner="control_noise_refiner",
    control_in_dim=9,
)


def make_controlnet(folder, config: dict, seed: int) -> ZImageControlNetModel:
    torch.manual_seed(seed)
    net = ZImageControlNetModel(**SHARED, **config).eval()
    randomize_norms(net)
    with torch.no_grad():  # diffusers zero-initialises the projections: random ones make the hints count
        for name, p in net.named_parameters():
            if "_proj" in name:
                p.normal_(0.0, 0.3)
    net.save_pretrained(folder)
    return net


@pytest.fixture(scope="module")
def turbo(tmp_path_factory, tiny_zimage):
    """The session's tiny Z-Image Turbo and two ControlNets for it (the 1.0 and 2.1 layouts)."""
    root = tmp_path_factory.mktemp("zimage-control")
    nets = {
        name: (root / name, make_controlnet(root / name, config, seed))
        for name, config, seed in (("union1", UNION_1, 5), ("union2", UNION_2, 6))
    }
    return *tiny_zimage, nets


def ours(folder, controlnet=None, turbo=True) -> imagegen.Pipeline:
    return variant(turbo=turbo).pipeline(weights=folder, dtype="float32", controlnet=controlnet)


def control_picture(seed: int = 7):
    return smooth_picture(*SIZE, seed)


@pytest.mark.parametrize("net, scale", [("union1", None), ("union2", 0.6)])
def test_controlnet_pipeline_matches_diffusers(turbo, net, scale):
    """1.0: two prompts of different caption runs (two layout groups); 2.1 without inpainting: zero mask and image
    channels, a custom scale."""
    folder, pipe, nets = turbo
    prompts = ["a red fox in the snow", "Café 🦊 " * 9] if net == "union1" else "a house"
    latents = base.noise(2 if net == "union1" else 1, seed=3)
    scaled = {} if scale is None else {"controlnet_conditioning_scale": scale}
    reference = ZImageControlNetPipeline(**pipe.components, controlnet=nets[net][1])
    copy = list(prompts) if isinstance(prompts, list) else prompts  # diffusers templates a list in place
    want = draw_reference(
        reference, latents, 3, SIZE, prompt=copy, control_image=control_picture(), guidance_scale=0.0, **scaled
    )
    options = {} if scale is None else {"control_scale": scale}
    got = draw(ours(folder, nets[net][0]), prompts, latents, 3, SIZE, control_image=control_picture(), **options)
    assert_images_match(got, want)
    plain = draw(ours(folder), prompts, latents, 3, SIZE)
    assert np.abs(np.asarray(plain[0], np.int16) - np.asarray(got[0], np.int16)).max() > 5  # the control counts


def test_controlnet_with_cfg_matches_diffusers(turbo, tiny_zimage_base):
    """Z-Image base with CFG: the control context goes with both halves of the batch."""
    _, _, nets = turbo
    folder, pipe = tiny_zimage_base
    latents = base.noise(1, seed=4)
    reference = ZImageControlNetPipeline(**pipe.components, controlnet=nets["union1"][1])
    want = draw_reference(
        reference,
        latents,
        3,
        SIZE,
        prompt="a lighthouse",
        negative_prompt="blurry",
        control_image=control_picture(2),
        guidance_scale=4.0,
    )
    got = draw(
        ours(folder, nets["union1"][0], turbo=False),
        "a lighthouse",
        latents,
        3,
        SIZE,
        negative_prompt="blurry",
        guidance=4.0,
        control_image=control_picture(2),
    )
    assert_images_match(got, want)


def test_controlnet_inpaint_matches_diffusers(turbo):
    folder, pipe, nets = turbo
    latents = base.noise(1, seed=5)
    reference = ZImageControlNetInpaintPipeline(**pipe.components, controlnet=nets["union2"][1])
    want = draw_reference(
        reference,
        latents,
        3,
        SIZE,
        prompt="a boat",
        image=base.picture(1),
        mask_image=base.square_mask(),
        control_image=control_picture(),
        guidance_scale=0.0,
    )
    got = ours(folder, nets["union2"][0]).generate(
        "a boat",
        init_image=base.picture(1),
        mask=base.square_mask(),
        control_image=control_picture(),
        latents=latents,
        steps=3,
        width=SIZE[0],
        height=SIZE[1],
    )
    assert_images_match(got.images, want)
    assert got.request.run_steps == 3  # from noise, as diffusers: no strength


def test_control_requests_that_cannot_run_are_refused(turbo):
    folder, _, nets = turbo
    plain, union1, union2 = ours(folder), ours(folder, nets["union1"][0]), ours(folder, nets["union2"][0])
    size = dict(width=SIZE[0], height=SIZE[1], steps=1)
    cases = [
        (
            plain,
            dict(control_image=control_picture()),
            "control_image needs a ControlNet: load the model with --controlnet DIR",
        ),
        (union1, dict(control_scale=0.5), "control_scale needs a control image"),
        (union1, dict(control_image=control_picture(), init_image=base.picture()), "an init image needs a mask"),
        (
            union2,
            dict(control_image=control_picture(), init_image=base.picture(), mask=base.square_mask(), strength=0.5),
            "strength does not apply",
        ),
        (
            union1,
            dict(control_image=control_picture(), init_image=base.picture(), mask=base.square_mask()),
            "needs a ControlNet with control_in_dim 9 (Union 2.x); the loaded one has 4",
        ),
    ]
    for pipe, options, words in cases:
        with pytest.raises(imagegen.InvalidOptionError, match=words.replace("(", r"\(").replace(")", r"\)")):
            pipe.generate("x", **size, **options)
    with pytest.raises(imagegen.InvalidOptionError, match="control_scale must be >= 0"):
        union1.generate("x", control_image=control_picture(), control_scale=-1, **size)
    with pytest.raises(imagegen.InvalidOptionError, match="does not support --controlnet"):
        imagegen.registry.get("flux2-klein-4b").pipeline(weights=folder, controlnet=nets["union1"][0])


def test_controlnet_inpaint_torch_noise_matches_diffusers_generator(turbo):
    """noise="torch": the seed's float32 draw of ZImageControlNetInpaintPipeline (the VAE means take no draws)."""
    folder, pipe, nets = turbo
    reference = ZImageControlNetInpaintPipeline(**pipe.components, controlnet=nets["union2"][1])
    want = reference(
        prompt="a boat",
        image=base.picture(2),
        mask_image=base.square_mask(),
        control_image=control_picture(3),
        num_inference_steps=2,
        guidance_scale=0.0,
        width=SIZE[0],
        height=SIZE[1],
        controlnet_conditioning_scale=1.0,
        generator=torch.Generator("cpu").manual_seed(21),
    ).images
    got = ours(folder, nets["union2"][0]).generate(
        "a boat",
        init_image=base.picture(2),
        mask=base.square_mask(),
        control_image=control_picture(3),
        control_scale=1.0,
        steps=2,
        seed=21,
        noise="torch",
        width=SIZE[0],
        height=SIZE[1],
    )
    assert_images_match(got.images, want)
