"""The random draws of a run: imagegen's own noise (MLX, one stream per image) or torch's, as diffusers draws it.

`noise="mlx"` (the default): image i depends only on seed + i, so any image of a batch can be made alone.
`noise="torch"`: one `torch.Generator("cpu").manual_seed(seed)` per call, drawn in the order and shapes of the
diffusers pipeline, so a seed gives diffusers' picture; images of a batch share that generator, as in diffusers.
"""

from __future__ import annotations

from collections.abc import Sequence

import mlx.core as mx

from .errors import InvalidOptionError
from .torch_random import TorchGenerator

NOISE_KINDS = ("mlx", "torch")


def check_noise(value: str) -> str:
    if value not in NOISE_KINDS:
        raise InvalidOptionError(f"noise must be one of {', '.join(NOISE_KINDS)}, got '{value}'.")
    return value


def seeded_noise(shape: Sequence[int], seeds: Sequence[int], dtype: mx.Dtype = mx.float32) -> mx.array:
    """Standard normal noise, one independent stream per image: image i depends only on seeds[i]."""
    if len(seeds) != shape[0]:
        raise ValueError(f"{len(seeds)} seeds for a batch of {shape[0]}")
    parts = [mx.random.normal(tuple(shape[1:]), key=mx.random.key(s)) for s in seeds]
    return mx.stack(parts).astype(dtype)


class Noise:
    """Draws for one run. `batch_slot=(first, total)`: these images are rows first.. of a `total`-image torch-noise
    call (a replay of one image, a server part): the generator draws the whole call's noise and keeps those rows."""

    def __init__(self, kind: str, seeds: Sequence[int], batch_slot: tuple[int, int] | None = None):
        self.kind, self.seeds, self.batch_slot = check_noise(kind), tuple(seeds), batch_slot
        self._generator = TorchGenerator(self.seeds[0]) if kind == "torch" else None

    def latents(self, shape: Sequence[int], dtype: str = "float32") -> mx.array:
        """The batch's initial noise [B, ...] (float32 values; torch's are rounded to `dtype` as it draws them)."""
        shape = tuple(shape)
        if self._generator is None:
            return seeded_noise(shape, self.seeds)
        if self.batch_slot is None:
            return mx.array(self._generator.randn(shape, dtype))
        first, total = self.batch_slot
        if first + shape[0] > total:
            raise ValueError(f"rows {first}..{first + shape[0] - 1} of a {total}-image call")
        return mx.array(self._generator.randn((total, *shape[1:]), dtype)[first : first + shape[0]])

    def sample(self, shape: Sequence[int], dtype: str = "float32") -> mx.array:
        """Noise for a VAE posterior sample, drawn before the latents as diffusers' `latent_dist.sample` is."""
        if self._generator is None:
            key = mx.random.split(mx.random.key(self.seeds[0]))[1]  # a stream apart from the latents' own
            return mx.random.normal(tuple(shape), key=key)
        return mx.array(self._generator.randn(tuple(shape), dtype))
