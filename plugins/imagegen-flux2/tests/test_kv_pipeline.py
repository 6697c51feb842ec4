"""FLUX.2 Klein 9B-KV against diffusers' Flux2KleinKVPipeline: the same tiny random checkpoint saved as a KV folder,
the same reference images and `latents=`, float32; and the reference K/V cache across requests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from diffusers import Flux2KleinKVPipeline
from imagegen_flux2.kv_pipeline import Flux2KVPipeline
from imagegen_flux2.plugin import klein, klein_kv
from PIL import Image

import imagegen
from imagegen.testing import assert_images_match, draw, draw_reference, sibling_module

tiny = sibling_module(__file__, "tiny")


@pytest.fixture(scope="module")
def kv_folder(tmp_path_factory, tiny_klein) -> tuple[Path, Flux2KleinKVPipeline]:
    """The session's tiny Klein saved again as a KV checkpoint (folder/"kv")."""
    folder = tmp_path_factory.mktemp("klein-kv")
    plain = tiny_klein[1]
    pipe = Flux2KleinKVPipeline(
        scheduler=plain.scheduler,
        vae=plain.vae,
        text_encoder=plain.text_encoder,
        tokenizer=plain.tokenizer,
        transformer=plain.transformer,
    )
    pipe.save_pretrained(folder / "kv")
    return folder, pipe


def references() -> list[Image.Image]:
    rng = np.random.default_rng(5)
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for w, h in ((80, 64), (64, 72))]


def test_editing_matches_diffusers_kv_pipeline(kv_folder):
    folder, theirs = kv_folder
    ours = Flux2KVPipeline(klein_kv(), folder / "kv", dtype="float32")
    latents = tiny.noise(1, seed=3)
    refs = references()
    want = draw_reference(
        theirs,
        latents,
        3,
        tiny.SIZE,
        image=refs,
        prompt="make it blue",
        max_sequence_length=ours.max_sequence_length,
        text_encoder_out_layers=ours.text_layers,
    )
    got = draw(ours, "make it blue", latents, 3, tiny.SIZE, images=refs)
    assert_images_match(got, want)

    def final_latents(**options) -> np.ndarray:
        steps = ours.run("make it blue", latents=latents, steps=3, width=tiny.SIZE[0], height=tiny.SIZE[1], **options)
        return np.array([s.latents for s in steps if s.stage == "denoise"][-1])

    with_refs, alone = final_latents(images=refs), final_latents()
    assert np.abs(with_refs - alone).max() > 1e-3 * np.abs(alone).max()  # the references reach the result


def test_text_to_image_without_references_matches_diffusers(kv_folder):
    folder, theirs = kv_folder
    ours = Flux2KVPipeline(klein_kv(), folder / "kv", dtype="float32")
    latents = tiny.noise(2, seed=4)
    want = draw_reference(
        theirs,
        latents,
        2,
        tiny.SIZE,
        prompt=["a red fox", "a boat"],
        max_sequence_length=ours.max_sequence_length,
        text_encoder_out_layers=ours.text_layers,
    )
    got = draw(ours, ["a red fox", "a boat"], latents, 2, tiny.SIZE)
    assert_images_match(got, want)


def test_reference_kv_is_reused_across_requests(kv_folder):
    folder, _ = kv_folder
    ours = Flux2KVPipeline(klein_kv(), folder / "kv", dtype="float32")
    refs, latents = references(), tiny.noise(1, seed=3)
    first = ours.generate("make it blue", images=refs, latents=latents, steps=2, width=64, height=48)
    again = ours.generate(
        "make it green", images=[r.copy() for r in refs], latents=latents, steps=2, width=64, height=48
    )
    assert ours.reference_passes == 1  # same pictures (other objects, other prompt): no second reference pass
    assert not np.array_equal(np.asarray(first.images[0]), np.asarray(again.images[0]))
    ours.generate("make it blue", images=refs[:1], latents=latents, steps=2, width=64, height=48)
    assert ours.reference_passes == 2  # another set of references
    repeat = ours.generate("make it blue", images=refs, latents=latents, steps=2, width=64, height=48)
    np.testing.assert_array_equal(np.asarray(repeat.images[0]), np.asarray(first.images[0]))


def test_kv_and_plain_folders_are_told_apart(kv_folder, tiny_klein):
    folder, _ = kv_folder
    with pytest.raises(imagegen.WeightsError, match="flux2-klein-9b-kv"):
        klein("9B", base=False).pipeline(weights=folder / "kv", dtype="float32")
    with pytest.raises(imagegen.WeightsError, match="not a FLUX.2 Klein KV checkpoint"):
        klein_kv().pipeline(weights=tiny_klein[0], dtype="float32")
