"""Procedural captioned shapes (the flux2-demo training set) and the image analysis that checks generated pictures.

Every picture is one flat-coloured shape on a flat background, drawn 4x supersampled and box-filtered so its edges
are anti-aliased, captioned "a {colour} {shape} on a {background} background". Everything is numpy + Pillow and
deterministic from a seed; nothing is downloaded. `analyze` reads a picture back (background colour from the border,
object colour and mask from the pixels that differ from it, shape from the mask's fill ratio and centroid), so the
demo's doc, its training script and its acceptance test share one definition of "the picture shows the prompt".
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

IMAGE_SIZE = 128
SHAPES = ("circle", "square", "triangle", "diamond")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "orange": (255, 140, 0),
    "yellow": (250, 230, 40),
    "green": (30, 170, 60),
    "cyan": (30, 200, 220),
    "blue": (30, 70, 220),
    "purple": (140, 50, 190),
    "pink": (255, 120, 190),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
}

# (shape, colour, background) combinations never shown in training. Drawn once with random.Random(10) under the
# constraints: 6 per shape, each colour at most 3 times as object and 3 times as background, every (colour,
# background) pair distinct, so each pair of attributes is still seen in training with another shape.
HELD_OUT: tuple[tuple[str, str, str], ...] = (
    ("circle", "cyan", "red"),
    ("circle", "pink", "cyan"),
    ("circle", "red", "purple"),
    ("circle", "white", "black"),
    ("circle", "white", "blue"),
    ("circle", "white", "purple"),
    ("diamond", "blue", "cyan"),
    ("diamond", "blue", "orange"),
    ("diamond", "orange", "black"),
    ("diamond", "orange", "red"),
    ("diamond", "purple", "blue"),
    ("diamond", "purple", "white"),
    ("square", "black", "pink"),
    ("square", "blue", "white"),
    ("square", "cyan", "green"),
    ("square", "green", "pink"),
    ("square", "orange", "yellow"),
    ("square", "yellow", "blue"),
    ("triangle", "black", "red"),
    ("triangle", "pink", "green"),
    ("triangle", "pink", "yellow"),
    ("triangle", "purple", "orange"),
    ("triangle", "yellow", "purple"),
    ("triangle", "yellow", "white"),
)

# Shape size (side of its bounding box, px at 128x128) and how far its centre may move from the middle.
SIZE_RANGE = (48.0, 72.0)
CENTRE_JITTER = 16.0
SQUARE_SCALE = 0.85  # a square of the full size looks much bigger than the other shapes

_CAPTION = re.compile(r"^an? (\w+) (\w+) on an? (\w+) background$")


@dataclass(frozen=True)
class Sample:
    image: np.ndarray  # (H, W, 3) uint8
    caption: str
    shape: str
    colour: str
    background: str


@dataclass(frozen=True)
class Analysis:
    shape: str | None  # None: no object found
    colour: str | None
    background: str
    fill: float  # object area / its bounding box area: square 1, circle pi/4, triangle and diamond 1/2
    centroid_y: float  # centroid height in the box from the top: 2/3 for an upright triangle, 1/2 otherwise
    area: float  # object area / image area


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def caption(shape: str, colour: str, background: str) -> str:
    return f"{_article(colour)} {colour} {shape} on {_article(background)} {background} background"


def parse_caption(text: str) -> tuple[str, str, str]:
    """`caption`'s inverse: (shape, colour, background)."""
    m = _CAPTION.match(text.strip().lower())
    if m is None or m[2] not in SHAPES or m[1] not in COLOURS or m[3] not in COLOURS:
        raise ValueError(f"not a shapes caption: {text!r}")
    return m[2], m[1], m[3]


def combinations(split: str = "train") -> list[tuple[str, str, str]]:
    """(shape, colour, background) triples of a split: "train", "held_out" or "all"."""
    every = [(s, c, b) for s in SHAPES for c in COLOURS for b in COLOURS if b != c]
    if split == "all":
        return every
    held = set(HELD_OUT)
    if split == "held_out":
        return [t for t in every if t in held]
    if split == "train":
        return [t for t in every if t not in held]
    raise ValueError(f"unknown split {split!r}")


def draw(
    shape: str,
    colour: str,
    background: str,
    centre: tuple[float, float] = (64.0, 64.0),
    size: float = 60.0,
    image_size: int = IMAGE_SIZE,
    supersample: int = 4,
) -> np.ndarray:
    """One picture as (H, W, 3) uint8; `centre` is (x, y) and `size` the bounding box side, both in pixels."""
    k = supersample
    canvas = Image.new("RGB", (image_size * k, image_size * k), COLOURS[background])
    pen = ImageDraw.Draw(canvas)
    cx, cy, half = centre[0] * k, centre[1] * k, size * k / 2
    fill = COLOURS[colour]
    if shape == "circle":
        pen.ellipse((cx - half, cy - half, cx + half, cy + half), fill=fill)
    elif shape == "square":
        h = half * SQUARE_SCALE
        pen.rectangle((cx - h, cy - h, cx + h, cy + h), fill=fill)
    elif shape == "triangle":
        pen.polygon([(cx, cy - half), (cx + half, cy + half), (cx - half, cy + half)], fill=fill)
    elif shape == "diamond":
        pen.polygon([(cx, cy - half), (cx + half, cy), (cx, cy + half), (cx - half, cy)], fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}")
    return np.asarray(canvas.reduce(k), dtype=np.uint8)


def random_sample(
    rng: np.random.Generator,
    combos: Sequence[tuple[str, str, str]],
    size_range: tuple[float, float] = SIZE_RANGE,
    jitter: float = CENTRE_JITTER,
) -> Sample:
    shape, colour, background = combos[rng.integers(len(combos))]
    size = rng.uniform(*size_range)
    cx, cy = IMAGE_SIZE / 2 + rng.uniform(-jitter, jitter, size=2)
    image = draw(shape, colour, background, (cx, cy), size)
    return Sample(image, caption(shape, colour, background), shape, colour, background)


def dataset(
    n: int,
    seed: int,
    split: str = "train",
    size_range: tuple[float, float] = SIZE_RANGE,
    jitter: float = CENTRE_JITTER,
) -> Iterator[Sample]:
    """`n` samples of a split, the same for the same seed."""
    rng = np.random.default_rng(seed)
    combos = combinations(split)
    for _ in range(n):
        yield random_sample(rng, combos, size_range, jitter)


def nearest_colour(rgb: np.ndarray) -> str:
    names = list(COLOURS)
    palette = np.array([COLOURS[n] for n in names], dtype=np.float32)
    return names[int(np.argmin(np.linalg.norm(palette - rgb, axis=-1)))]


def _largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 4-connected region of a boolean mask (label propagation by repeated neighbour minimum)."""
    h, w = mask.shape
    big = h * w
    labels = np.where(mask, np.arange(big).reshape(h, w), big)
    while True:
        padded = np.pad(labels, 1, constant_values=big)
        nxt = np.minimum.reduce([labels, padded[:-2, 1:-1], padded[2:, 1:-1], padded[1:-1, :-2], padded[1:-1, 2:]])
        nxt = np.where(mask, nxt, big)
        if np.array_equal(nxt, labels):
            break
        labels = nxt
    ids, counts = np.unique(labels[mask], return_counts=True)
    return labels == ids[np.argmax(counts)]


def _classify_shape(fill: float, centroid_y: float) -> str:
    prototypes = {"square": (1.0, 0.5), "circle": (np.pi / 4, 0.5), "triangle": (0.5, 2 / 3), "diamond": (0.5, 0.5)}
    # distances scaled so neighbouring prototypes are about equally far apart in both features
    return min(
        prototypes,
        key=lambda s: ((fill - prototypes[s][0]) / 0.25) ** 2 + ((centroid_y - prototypes[s][1]) / 0.167) ** 2,
    )


def analyze(image: np.ndarray | Image.Image, border: int = 4, min_contrast: float = 60.0) -> Analysis:
    """Read background colour, object colour and shape back from a picture."""
    img = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image, dtype=np.float32)[..., :3]
    frame = np.concatenate(
        [
            img[:border].reshape(-1, 3),
            img[-border:].reshape(-1, 3),
            img[:, :border].reshape(-1, 3),
            img[:, -border:].reshape(-1, 3),
        ]
    )
    bg = np.median(frame, axis=0)
    background = nearest_colour(bg)
    far = np.linalg.norm(img - bg, axis=-1) > min_contrast
    if far.sum() < 16:
        return Analysis(None, None, background, 0.0, 0.0, 0.0)
    obj = np.median(img[far], axis=0)
    # Position of each pixel on the segment background -> object: > 1/2 means mostly covered (anti-aliased edges).
    axis = obj - bg
    t = ((img - bg) @ axis) / float(axis @ axis)
    mask = _largest_component(t > 0.5)
    inner = mask & (t > 0.75)
    obj = np.median(img[inner if inner.sum() >= 8 else mask], axis=0)
    rows, cols = np.nonzero(mask)
    height, width = rows.max() - rows.min() + 1, cols.max() - cols.min() + 1
    area = float(mask.sum())
    fill = area / float(height * width)
    centroid_y = (rows.mean() - rows.min() + 0.5) / height
    return Analysis(
        _classify_shape(fill, centroid_y), nearest_colour(obj), background, fill, float(centroid_y), area / mask.size
    )


def matches(analysis: Analysis, shape: str, colour: str, background: str) -> dict[str, bool]:
    """Which attributes of a picture's analysis agree with its prompt; "all" is the verdict."""
    got = {
        "shape": analysis.shape == shape,
        "colour": analysis.colour == colour,
        "background": analysis.background == background,
    }
    got["all"] = all(got.values())
    return got


def score(images: Sequence[np.ndarray | Image.Image], prompts: Sequence[str]) -> dict[str, float]:
    """Fractions of pictures whose shape, colour, background and all three match their prompts."""
    hits = [matches(analyze(im), *parse_caption(p)) for im, p in zip(images, prompts, strict=True)]
    return {k: float(np.mean([h[k] for h in hits])) for k in ("shape", "colour", "background", "all")}
