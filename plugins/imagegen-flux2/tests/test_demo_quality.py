"""Acceptance test of the embedded flux2-demo model: >= 90% of generated pictures show what their prompts say.

The prompts are every held-out (shape, colour, background) combination of `training/shapes.py` (never seen in
training) and as many seen ones; `shapes.analyze` reads background colour, object colour and shape back from each
picture. `generate` is the one piece that names a pipeline.
"""

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import Flux2KleinPipeline
from PIL import Image

REPO = Path(__file__).resolve().parents[3]
DEMO = REPO / "plugins" / "imagegen-flux2" / "imagegen_flux2" / "demo"
SEEDS = (0,)
MIN_ACCURACY = 0.9


def _load_shapes():
    spec = importlib.util.spec_from_file_location("demo_shapes", REPO / "training" / "shapes.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


shapes = _load_shapes()
SETTINGS = json.loads((DEMO / "imagegen.json").read_text())


def generate(prompts: list[str], seeds: list[int]) -> list[Image.Image]:
    """One picture per (prompt, seed) from the demo folder, with the call settings of its imagegen.json."""
    pipe = Flux2KleinPipeline.from_pretrained(DEMO, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    width, height = SETTINGS["default_size"]
    images = []
    for i in range(0, len(prompts), 16):
        images += pipe(
            prompt=prompts[i : i + 16],
            height=height,
            width=width,
            num_inference_steps=SETTINGS["default_steps"],
            guidance_scale=SETTINGS["default_guidance"],
            generator=[torch.Generator().manual_seed(s) for s in seeds[i : i + 16]],
            max_sequence_length=SETTINGS["max_sequence_length"],
            text_encoder_out_layers=tuple(SETTINGS["text_encoder_out_layers"]),
        ).images
    return images


def _prompts() -> dict[str, list[str]]:
    held = [shapes.caption(*t) for t in shapes.combinations("held_out")]
    train = shapes.combinations("train")
    pick = np.random.default_rng(1234).choice(len(train), len(held), replace=False)
    return {"held_out": held, "seen": [shapes.caption(*train[i]) for i in pick]}


@pytest.fixture(scope="module")
def scores() -> dict[str, dict[str, float]]:
    groups = _prompts()
    prompts = [p for group in groups.values() for p in group for _ in SEEDS]
    seeds = [s for group in groups.values() for _ in group for s in SEEDS]
    images = generate(prompts, seeds)
    assert all(im.size == tuple(SETTINGS["default_size"]) for im in images)
    out, start = {}, 0
    for name, group in groups.items():
        n = len(group) * len(SEEDS)
        out[name] = shapes.score(images[start : start + n], prompts[start : start + n])
        start += n
    return out


@pytest.mark.parametrize("split", ["held_out", "seen"])
def test_pictures_match_prompts(scores, split, capsys):
    result = scores[split]
    with capsys.disabled():
        print(f"\nflux2-demo {split}: " + ", ".join(f"{k} {v:.1%}" for k, v in result.items()))
    assert result["all"] >= MIN_ACCURACY, result
