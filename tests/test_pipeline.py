"""The pipeline contract on the example plugin: validation, seeds, progress, threads, latents."""

from __future__ import annotations

import threading

import mlx.core as mx
import numpy as np
import pytest

import imagegen


@pytest.fixture
def pipe(hello_plugin):
    return imagegen.registry.get("hello").pipeline()


def test_generate_returns_images_seeds_timings(pipe):
    result = pipe.generate(["a", "b"], width=32, height=16, seed=5, num_images=2, steps=2)
    assert [im.size for im in result.images] == [(32, 16)] * 4
    assert result.seeds == [5, 6, 7, 8] and result.request.prompts == ("a", "a", "b", "b")
    assert set(result.timings) == {"encode", "denoise", "decode", "total"}


def test_image_i_of_a_batch_equals_a_single_run_with_its_seed(pipe):
    batch = pipe.generate("same", width=32, height=32, seed=11, num_images=3)
    alone = pipe.generate("same", width=32, height=32, seed=13)
    assert np.array_equal(np.asarray(batch.images[2]), np.asarray(alone.images[0]))
    noise = imagegen.seeded_noise((2, 4), [1, 2])
    assert np.array_equal(np.array(noise[1]), np.array(imagegen.seeded_noise((1, 4), [2])[0]))


def test_denoise_yields_steps_then_result(pipe):
    run = pipe.run("x", width=16, height=16, steps=3, seed=0)
    stages = [(s.stage, s.index, s.total) for s in run]
    assert stages == [("encode", 1, 1), ("denoise", 1, 3), ("denoise", 2, 3), ("denoise", 3, 3), ("decode", 1, 1)]
    assert run.result is not None and run.result.seed == 0


def test_latents_given_by_caller_are_used(pipe):
    def first_step(**options):
        return next(
            s.latents for s in pipe.run("x", width=16, height=16, seed=1, steps=2, **options) if s.stage == "denoise"
        )

    latents = mx.zeros((1, 16, 16, 3))
    given = first_step(latents=latents)
    assert not np.array_equal(np.array(given), np.array(first_step()))
    assert np.array_equal(np.array(given), np.array(first_step(latents=latents + 0)))


@pytest.mark.parametrize(
    "options,message",
    [
        ({"negative_prompt": "no"}, "does not support the option 'negative_prompt'"),
        ({"guidance": 2.0}, "'guidance'"),
        ({"width": 20}, "multiple of 16"),
        ({"steps": 0}, "steps must be a positive integer"),
        ({"num_images": 0}, "num_images"),
        ({"seed": -1}, "seed"),
        ({"sampler": "dpm"}, "does not support the option.s.: sampler"),
    ],
)
def test_invalid_options(pipe, options, message):
    with pytest.raises(imagegen.InvalidOptionError, match=message):
        pipe.generate("x", **options)


def test_concurrent_calls_are_serialised_and_correct(pipe):
    expected = np.asarray(pipe.generate("t", width=32, height=32, seed=3).images[0])
    results = []

    def work():
        results.append(np.asarray(pipe.generate("t", width=32, height=32, seed=3).images[0]))

    threads = [threading.Thread(target=work) for _ in range(4)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert len(results) == 4 and all(np.array_equal(r, expected) for r in results)
