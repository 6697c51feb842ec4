"""The bundled demo model does what it says, refuses what it cannot do (issue 18, item 22)."""

from __future__ import annotations

import numpy as np
import pytest

import imagegen


@pytest.fixture(scope="module")
def demo():
    return imagegen.registry.get("flux2-demo").pipeline()


def test_prompts_in_any_letter_case_draw_the_same_picture(demo):
    lower = demo.generate("a red circle on a blue background", steps=2, seed=1).images[0]
    upper = demo.generate("A RED Circle On A Blue BACKGROUND", steps=2, seed=1).images[0]
    assert np.array_equal(np.asarray(lower), np.asarray(upper))


def test_sizes_it_was_not_trained_for_are_refused(demo):
    with pytest.raises(imagegen.InvalidOptionError, match="256x256 is larger than 'flux2-demo' allows"):
        demo.generate("a red circle on a blue background", width=256, height=256)


def test_it_does_not_claim_to_edit_and_says_what_it_knows():
    spec = imagegen.registry.get("flux2-demo")
    # no reference editing (it never saw reference images); the edits endpoint serves its img2img / inpainting
    assert not spec.accepts("images") and spec.accepts("init_image")
    assert spec.tasks == (imagegen.TEXT_TO_IMAGE, imagegen.IMAGE_EDIT)
    assert "circle" in spec.description and "purple" in spec.description and "128x128" in spec.description
