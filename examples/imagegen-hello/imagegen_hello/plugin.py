"""A procedural 'model': the prompt picks two colours, the seed picks a wave pattern, and a few
"denoising" steps blend seeded noise into it. It needs no weights, so it runs anywhere."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path

import mlx.core as mx

import imagegen
from imagegen.image import from_pil, to_pil


def prompt_colours(prompt: str) -> mx.array:
    """Two RGB colours in [-1, 1] derived from the prompt's hash."""
    digest = hashlib.sha256(prompt.encode()).digest()
    return mx.array([b / 127.5 - 1 for b in digest[:6]]).reshape(2, 3)


class HelloPipeline(imagegen.Pipeline):
    def encode(self, request: imagegen.Request) -> mx.array:
        colours = mx.stack([prompt_colours(p) for p in request.prompts])  # [B, 2, 3]
        if request.images:  # editing: the references' mean colour replaces the second colour
            mean = mx.mean(mx.concatenate([from_pil(i).reshape(-1, 3) for i in request.images]), axis=0)
            colours[:, 1] = mean
        return colours

    def prepare_latents(self, request: imagegen.Request) -> mx.array:
        # the caller's own noise ([B, H, W, 3]) or seeded noise
        return self.initial_latents(request, (request.batch_size, request.height, request.width, 3))

    def denoise_steps(self, request: imagegen.Request, colours: mx.array, latents: mx.array) -> Iterator[mx.array]:
        h, w = request.height, request.width
        y, x = mx.arange(h)[:, None] / h, mx.arange(w)[None, :] / w
        phase = mx.array([s % 97 / 97 * 6.283 for s in request.seeds])[:, None, None]
        wave = (mx.sin(6.283 * (x + y) * 3 + phase) + 1) / 2  # [B, H, W]
        target = colours[:, None, None, 0] * wave[..., None] + colours[:, None, None, 1] * (1 - wave[..., None])
        for i in range(1, request.steps + 1):
            t = i / request.steps
            yield (1 - t) * latents * 0.5 + t * target

    def decode(self, request: imagegen.Request, latents: mx.array) -> list:
        return to_pil(latents)


def load(spec: imagegen.ModelSpec, weights: Path | None, **kwargs) -> HelloPipeline:
    return HelloPipeline(spec, weights, **kwargs)


@imagegen.hookimpl
def register_models(register):
    register(
        imagegen.ModelSpec(
            id="hello-waves",
            family="hello",
            load=load,
            aliases=("hello",),
            needs_weights=False,
            family_default=True,
            description="Procedural seeded wave patterns (example plugin)",
            default_steps=4,
            default_size=(256, 256),
            options=frozenset({"latents"}),
        )
    )
    register(
        imagegen.ModelSpec(
            id="hello-remix",
            family="hello",
            load=load,
            needs_weights=False,
            description="Wave patterns in the colours of reference images (example editing model)",
            default_steps=4,
            default_size=(256, 256),
            options=frozenset({"latents", "images"}),
            tasks=(imagegen.TEXT_TO_IMAGE, imagegen.IMAGE_EDIT),
        )
    )
