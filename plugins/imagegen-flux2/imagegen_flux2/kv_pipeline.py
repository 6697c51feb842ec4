"""FLUX.2 Klein KV pipeline (9B-KV): the reference images' keys and values are computed once, in one pass of the
reference tokens alone, and every denoising step attends to them instead of running those tokens again. Follows
diffusers 0.42.1 Flux2KleinKVPipeline (pipeline_flux2_klein_kv.py), whose first step "extracts" the same K/V.

Beyond diffusers: the K/V depend only on the reference images (reference tokens attend only to each other, at a fixed
timestep), so they are kept across requests, keyed by image content: a second edit of the same picture (the server
holds the pipeline) skips the VAE encode and the reference pass entirely.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import mlx.core as mx
from PIL import Image

import imagegen
from imagegen.errors import WeightsError

from .pipeline import KV_PIPELINE, Conditioning, Flux2Pipeline, pipeline_class, prepare_reference

CACHED_REFERENCE_SETS = 2  # K/V of a 1024x1024 reference is ~2 GB on 9B (32 layers x 4096 tokens x 2 x 4096 bf16)


def reference_key(images: Sequence[Image.Image], multiple: int, dtype: str) -> str:
    """The cache key of a set of reference images: their prepared pixels, in order, and the model dtype."""
    digest = hashlib.sha256(dtype.encode())
    for image in images:
        prepared = prepare_reference(image, multiple).convert("RGB")
        digest.update(f"{prepared.size}".encode())
        digest.update(prepared.tobytes())
    return digest.hexdigest()


class Flux2KVPipeline(Flux2Pipeline):
    def __init__(self, spec: imagegen.ModelSpec, weights: Path, **kwargs):
        super().__init__(spec, weights, **kwargs)
        self.reference_cache: OrderedDict[str, list] = OrderedDict()  # key -> K/V per attention layer (LRU)
        self.reference_passes = 0  # reference passes run (the rest of the requests with references were cache hits)

    def check_kind(self, root: Path) -> None:
        if pipeline_class(root) != KV_PIPELINE:
            raise WeightsError(
                f"{root} is not a FLUX.2 Klein KV checkpoint (model_index.json's _class_name is not "
                f"{KV_PIPELINE}); use 'flux2-klein-9b' for plain Klein folders."
            )
        self.distilled = True  # the KV model is step-distilled: no CFG

    # 1. prompts -> conditioning; reference images -> their K/V (cached)
    def encode(self, request: imagegen.Request) -> Conditioning:
        conditioning = super().encode(replace(request, images=()))
        if not request.images:
            return conditioning
        return replace(conditioning, reference_kv=self.reference_kv(request.images))

    def reference_kv(self, images: Sequence[Image.Image]) -> list:
        key = reference_key(images, self.multiple, self.dtype)
        if key in self.reference_cache:
            self.reference_cache.move_to_end(key)
            return self.reference_cache[key]
        tokens, grids = self.encode_references(images)
        rope = self.transformer.rope(0, (0, 0), grids)  # the reference tokens alone, at their own positions
        kv = self.transformer.reference_kv(tokens, rope)
        mx.eval(kv)
        self.reference_passes += 1
        self.reference_cache[key] = kv
        while len(self.reference_cache) > CACHED_REFERENCE_SETS:
            self.reference_cache.popitem(last=False)
        return kv
