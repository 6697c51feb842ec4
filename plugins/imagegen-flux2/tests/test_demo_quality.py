"""Acceptance test of the bundled flux2-demo model: >= 90% of the pictures imagegen draws show what their prompts say.

The prompts are every held-out (shape, colour, background) combination of `training/shapes.py` (never seen in
training) and as many seen ones, two seeds each; `shapes.analyze` reads background colour, object colour and shape
back from each picture. The numbers are printed (pytest -s) and quoted in docs/demo-model.md.
"""

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

import imagegen

REPO = Path(__file__).resolve().parents[3]
SEEDS = (0, 1000)  # first seed of each batch; image i of a batch gets seed + i
MIN_ACCURACY = 0.9


def _load_shapes():
    spec = importlib.util.spec_from_file_location("demo_shapes", REPO / "training" / "shapes.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


shapes = _load_shapes()


def _prompts() -> dict[str, list[str]]:
    held = [shapes.caption(*t) for t in shapes.combinations("held_out")]
    train = shapes.combinations("train")
    pick = np.random.default_rng(1234).choice(len(train), len(held), replace=False)
    return {"held_out": held, "seen": [shapes.caption(*train[i]) for i in pick]}


@pytest.fixture(scope="module")
def scores() -> dict[str, dict[str, float]]:
    pipe = imagegen.registry.get("flux2-demo").pipeline()
    out = {}
    for name, prompts in _prompts().items():
        images, all_prompts = [], []
        for seed in SEEDS:
            for i in range(0, len(prompts), 12):
                batch = prompts[i : i + 12]
                result = pipe.generate(batch, seed=seed + i)
                assert len(result.images) == len(batch)
                assert all(im.size == (shapes.IMAGE_SIZE, shapes.IMAGE_SIZE) for im in result.images)
                images += result.images
                all_prompts += batch
        out[name] = shapes.score(images, all_prompts)
    return out


@pytest.mark.parametrize("split", ["held_out", "seen"])
def test_pictures_match_prompts(scores, split, capsys):
    result = scores[split]
    with capsys.disabled():
        print(f"\nflux2-demo {split}: " + ", ".join(f"{k} {v:.1%}" for k, v in result.items()))
    assert result["all"] >= MIN_ACCURACY, result


def test_analysis_reads_training_pictures():
    """The checker itself: it reads back every attribute of pictures drawn by the training set's generator."""
    samples = list(shapes.dataset(64, seed=7, split="all"))
    result = shapes.score([s.image for s in samples], [s.caption for s in samples])
    assert result["all"] == 1.0, result
