"""to_pil rounds on the device exactly as diffusers' postprocess does on the host (numpy, float32)."""

from __future__ import annotations

import mlx.core as mx
import numpy as np

from imagegen.image import to_bytes, to_pil


def test_same_bytes_as_diffusers_postprocess():
    rng = np.random.default_rng(0)
    images = rng.uniform(-1.2, 1.2, (2, 64, 48, 3)).astype(np.float32)
    images.reshape(-1)[:512] = (np.arange(512) % 256 + 0.5) / 255 * 2 - 1  # values at exact halves of a level
    want = (np.clip(images / 2 + 0.5, 0, 1) * 255).round().astype(np.uint8)  # diffusers' numpy_to_pil path
    got = [np.asarray(image) for image in to_pil(mx.array(images))]
    assert all(g.dtype == np.uint8 for g in got)
    np.testing.assert_array_equal(np.stack(got), want)
    bf16 = mx.array(images).astype(mx.bfloat16)
    want = (np.clip(np.array(bf16.astype(mx.float32)) / 2 + 0.5, 0, 1) * 255).round().astype(np.uint8)
    np.testing.assert_array_equal(np.stack([np.asarray(i) for i in to_pil(bf16)]), want)


def test_bytes_evaluated_with_the_decode_give_the_same_images():
    """The pipelines evaluate to_bytes in the decode's own graph and hand the uint8 pixels to to_pil."""
    images = np.random.default_rng(1).uniform(-1.2, 1.2, (1, 16, 16, 3)).astype(np.float32)
    pixels = to_bytes(mx.array(images))
    mx.eval(pixels)
    assert pixels.dtype == mx.uint8
    got, want = to_pil(pixels)[0], to_pil(mx.array(images))[0]
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
