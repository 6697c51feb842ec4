"""The whole Z-Image pipeline against diffusers' ZImagePipeline: same tiny random checkpoint folder (diffusers
layout), same `latents=`, float32. Turbo, base with CFG (negative prompt, normalization, truncation), batches."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from imagegen_zimage.plugin import variant
from PIL import Image

import imagegen
from imagegen.testing import assert_images_match, draw, draw_reference, sibling_module, smooth_picture

tiny = sibling_module(__file__, "tiny")
SIZE, build, noise = tiny.SIZE, tiny.build, tiny.noise


def ours(folder: Path, turbo: bool) -> imagegen.Pipeline:
    return variant(turbo=turbo).pipeline(weights=folder, dtype="float32")


def reference(pipe, prompt, latents, steps, **kw) -> list[Image.Image]:
    prompt = list(prompt) if isinstance(prompt, list) else prompt  # diffusers templates the list in place
    return draw_reference(pipe, latents, steps, SIZE, prompt=prompt, **kw)


def test_turbo_matches_diffusers(tiny_zimage):
    folder, pipe = tiny_zimage
    latents = noise(2)
    prompts = ["a red fox in the snow", "Café 🦊"]  # different caption lengths in one batch
    want = reference(pipe, prompts, latents, 3, guidance_scale=0.0)
    got = draw(ours(folder, True), prompts, latents, 3, SIZE)
    assert_images_match(got, want)


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"cfg_normalization": 1.0},
        {"cfg_truncation": 0.1},  # normalized times are 0, 0.14, 0.4: CFG only on the first step
    ],
)
def test_base_cfg_matches_diffusers(tiny_zimage_base, options):
    folder, pipe = tiny_zimage_base
    latents = noise(1, seed=5)
    want = reference(pipe, "a lighthouse at dusk", latents, 3, guidance_scale=4.0, negative_prompt="blurry", **options)
    got = draw(
        ours(folder, False), "a lighthouse at dusk", latents, 3, SIZE, negative_prompt="blurry", guidance=4.0, **options
    )
    assert_images_match(got, want)
    if options:  # the option really changed the picture
        plain = reference(pipe, "a lighthouse at dusk", latents, 3, guidance_scale=4.0, negative_prompt="blurry")
        assert np.abs(np.asarray(plain[0], np.int16) - np.asarray(got[0], np.int16)).max() > 5


def test_base_default_negative_and_batch(tiny_zimage_base):
    folder, pipe = tiny_zimage_base
    latents = noise(2, seed=6)
    want = reference(pipe, ["a cat", "two dogs on a sofa"], latents, 2, guidance_scale=3.0)
    got = draw(ours(folder, False), ["a cat", "two dogs on a sofa"], latents, 2, SIZE, guidance=3.0)
    assert_images_match(got, want)


def test_dynamic_shift_scheduler(tmp_path):
    """The Z-Image base scheduler may shift with mu: the pipeline passes calculate_shift's mu."""
    pipe = build(
        tmp_path, {"num_train_timesteps": 1000, "use_dynamic_shifting": True, "base_shift": 0.5, "max_shift": 1.15}
    )
    latents = noise(1, seed=2)
    got = draw(ours(tmp_path, True), "x", latents, 2, SIZE)
    assert_images_match(got, reference(pipe, "x", latents, 2, guidance_scale=0.0))


def test_turbo_refuses_cfg_options_and_bad_values(tiny_zimage, tiny_zimage_base):
    turbo, base = ours(tiny_zimage[0], True), ours(tiny_zimage_base[0], False)
    with pytest.raises(imagegen.InvalidOptionError, match="negative_prompt"):
        turbo.generate("x", negative_prompt="no", width=64, height=48)
    with pytest.raises(imagegen.InvalidOptionError, match="cfg_truncation"):
        turbo.generate("x", cfg_truncation=0.5, width=64, height=48)
    with pytest.raises(imagegen.InvalidOptionError, match="within"):
        base.generate("x", cfg_truncation=1.5, width=64, height=48)
    with pytest.raises(imagegen.InvalidOptionError, match="latents must have shape"):
        turbo.generate("x", latents=np.zeros((1, 4, 2, 2), np.float32), width=64, height=48)


def test_cli_model_options_and_reproduction(tiny_zimage_base, tmp_path):
    from typer.testing import CliRunner

    from imagegen.cli import get_app
    from imagegen.image import read_metadata

    out = tmp_path / "z.png"
    args = [
        "run",
        "-m",
        "zimage",
        "--weights",
        str(tiny_zimage_base[0]),
        "a cat",
        "--size",
        "64x48",
        "--steps",
        "2",
        "--seed",
        "1",
        "--dtype",
        "float32",
        "-o",
        str(out),
    ]
    result = CliRunner().invoke(
        get_app(),
        [
            *args,
            "--option",
            "cfg_truncation=0.1",
            "-O",
            "cfg_normalization=true",
            "--negative",
            "dark",
            "--guidance",
            "3",
        ],
    )
    assert result.exit_code == 0, result.output
    meta = read_metadata(out)
    assert meta["options"] == {"cfg_truncation": 0.1, "cfg_normalization": True}
    again = CliRunner().invoke(
        get_app(), ["run", "--from", str(out), "--weights", str(tiny_zimage_base[0]), "-o", str(tmp_path / "again.png")]
    )
    assert again.exit_code == 0, again.output
    assert np.array_equal(np.asarray(Image.open(out)), np.asarray(Image.open(tmp_path / "again.png")))
    bad = CliRunner().invoke(get_app(), [*args, "--option", "cfg_truncation=2"])
    assert bad.exit_code == 1 and "cfg_truncation must be within [0, 1]" in bad.output


# ---- torch noise, img2img and inpainting against ZImageImg2ImgPipeline / ZImageInpaintPipeline ----------------


def picture(seed: int = 0) -> Image.Image:
    return smooth_picture(*SIZE, seed)


def square_mask() -> Image.Image:
    mask = np.zeros(SIZE[::-1], np.uint8)
    mask[8:40, 16:48] = 255  # white = repaint
    return Image.fromarray(mask)


def test_turbo_torch_noise_matches_diffusers_generator(tiny_zimage):
    folder, pipe = tiny_zimage
    prompts = ["a red fox in the snow", "a boat"]
    want = pipe(
        prompt=list(prompts),
        num_inference_steps=2,
        width=SIZE[0],
        height=SIZE[1],
        guidance_scale=0.0,
        num_images_per_prompt=2,
        generator=torch.Generator("cpu").manual_seed(11),
    ).images
    got = ours(folder, True).generate(
        prompts, steps=2, width=SIZE[0], height=SIZE[1], seed=11, noise="torch", num_images=2
    )
    assert_images_match(got.images, want)
    # image 3 of that call alone, from the metadata's (index, count)
    third = ours(folder, True).generate(
        "a boat", steps=2, width=SIZE[0], height=SIZE[1], seed=11, noise="torch", noise_slot=(2, 4)
    )
    assert_images_match(third.images, want[2:3])


def test_img2img_matches_diffusers(tiny_zimage):
    from diffusers import ZImageImg2ImgPipeline

    folder, pipe = tiny_zimage
    reference_pipe = ZImageImg2ImgPipeline(**pipe.components)
    want = reference_pipe(
        prompt="a red fox",
        image=picture(),
        num_inference_steps=4,
        guidance_scale=0.0,
        generator=torch.Generator("cpu").manual_seed(4),
    ).images  # strength: default 0.6
    got = ours(folder, True).generate("a red fox", init_image=picture(), steps=4, seed=4, noise="torch")
    assert got.request.run_steps == 3 and got.images[0].size == SIZE
    assert_images_match(got.images, want)


def inpaint_reference(pipe, image: Image.Image, strength: float, seed: int) -> list[Image.Image]:
    """diffusers' Z-Image base inpainting of `image` under square_mask(): "a lighthouse", negative "blurry",
    guidance 4, 4 steps, torch noise from `seed`."""
    from diffusers import ZImageInpaintPipeline

    return ZImageInpaintPipeline(**pipe.components)(
        prompt="a lighthouse",
        negative_prompt="blurry",
        image=image,
        mask_image=square_mask(),
        strength=strength,
        num_inference_steps=4,
        guidance_scale=4.0,
        generator=torch.Generator("cpu").manual_seed(seed),
    ).images


def test_base_inpaint_with_cfg_and_negative_matches_diffusers(tiny_zimage_base):
    folder, pipe = tiny_zimage_base
    want = inpaint_reference(pipe, picture(1), strength=0.8, seed=9)
    got = ours(folder, False).generate(
        "a lighthouse",
        negative_prompt="blurry",
        init_image=picture(1),
        mask=np.asarray(square_mask()),
        strength=0.8,
        steps=4,
        guidance=4.0,
        seed=9,
        noise="torch",
    )
    assert_images_match(got.images, want)


def test_img2img_refuses_bad_input(tiny_zimage, tmp_path):
    turbo = ours(tiny_zimage[0], True)
    with pytest.raises(imagegen.InvalidOptionError, match=r"strength must be within \(0, 1\]"):
        turbo.generate("x", init_image=picture(), strength=0)
    with pytest.raises(imagegen.InvalidOptionError, match="mask needs an init image"):
        turbo.generate("x", mask=square_mask(), width=64, height=48)
    with pytest.raises(imagegen.InvalidOptionError, match="leaves no step out of 3: use at least 10000000000000000000"):
        turbo.generate("x", init_image=picture(), strength=1e-19, steps=3)
    (tmp_path / "broken.png").write_bytes(b"not a png")
    with pytest.raises(imagegen.InvalidImageError, match="Cannot read .*broken.png"):
        turbo.generate("x", init_image=tmp_path / "broken.png")
    with pytest.raises(imagegen.InvalidOptionError, match="noise must be one of mlx, torch"):
        turbo.generate("x", noise="numpy", width=64, height=48)


def test_cli_inpaint_matches_diffusers_and_replays(tiny_zimage_base, tmp_path, monkeypatch):
    import shutil

    from typer.testing import CliRunner

    from imagegen.cli import get_app
    from imagegen.image import read_metadata

    folder, pipe = tiny_zimage_base
    monkeypatch.chdir(tmp_path)
    picture(2).save("photo.png")
    square_mask().save("mask.png")
    want = inpaint_reference(pipe, picture(2), strength=0.7, seed=8)
    args = [
        "run",
        "-m",
        "zimage",
        "--weights",
        str(folder),
        "a lighthouse",
        "--negative",
        "blurry",
        "--guidance",
        "4",
        "--init-image",
        "photo.png",
        "--mask",
        "mask.png",
        "--strength",
        "0.7",
        "--steps",
        "4",
        "--seed",
        "8",
        "--noise",
        "torch",
        "--dtype",
        "float32",
        "-o",
        "out.png",
    ]
    result = CliRunner().invoke(get_app(), args)
    assert result.exit_code == 0, result.output
    assert_images_match([Image.open("out.png").convert("RGB")], want)
    meta = read_metadata("out.png")
    assert (meta["init_image"], meta["mask"]) == ("photo.png", "mask.png") and len(meta["inputs"]["photo.png"]) == 64
    assert str(tmp_path) not in json.dumps(meta)
    assert (meta["noise"], meta["strength"], meta["width"], meta["height"]) == ("torch", 0.7, *SIZE)
    # --from elsewhere: the inputs are found beside the PNG by name and checked by hash
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    for name in ("out.png", "photo.png", "mask.png"):
        shutil.copy(name, elsewhere / name)
    monkeypatch.chdir(tmp_path / "elsewhere")
    weights = ["--weights", str(folder)]  # a PNG's weights folder is never loaded from the PNG itself
    again = CliRunner().invoke(get_app(), ["run", "--from", "out.png", "-o", "again.png", *weights])
    assert again.exit_code == 0, again.output
    assert np.array_equal(np.asarray(Image.open("out.png")), np.asarray(Image.open("again.png")))
    picture(3).save("photo.png")  # changed since: refused, not silently replaced
    changed = CliRunner().invoke(get_app(), ["run", "--from", "out.png", "-o", "third.png", *weights])
    assert changed.exit_code == 1 and "'photo.png' (sha256" in changed.output and "pass it again" in changed.output


def test_turbo_and_base_folders_are_told_apart(tiny_zimage, tiny_zimage_base):
    """Their scheduler configs differ (shift 3.0 vs 6.0), as is_distilled tells FLUX.2 Klein variants apart."""
    with pytest.raises(imagegen.WeightsError, match="Z-Image Turbo checkpoint .* use --model zimage-turbo"):
        ours(tiny_zimage[0], False)
    with pytest.raises(imagegen.WeightsError, match="Z-Image base checkpoint .* use --model zimage"):
        ours(tiny_zimage_base[0], True)


def test_a_flux2_folder_is_refused_by_name(tmp_path, tiny_zimage):
    import shutil

    shutil.copytree(tiny_zimage[0], tmp_path / "w")
    index = tmp_path / "w" / "model_index.json"
    index.write_text(index.read_text().replace("ZImagePipeline", "Flux2KleinPipeline"))
    with pytest.raises(imagegen.WeightsError, match="holds a Flux2KleinPipeline checkpoint, not Z-Image"):
        ours(tmp_path / "w", True)
