"""qk_norm_rope: the plain path against numpy, and (on a CUDA machine) the fused kernel against the plain path."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from imagegen.nn import attention_blhd, cuda_kernels
from imagegen.nn.attention_inputs import qk_norm_rope
from imagegen.rope import rope_cos_sin, rope_tables

HEADS, HEAD_DIM = 3, 64


def _source(rng, length, extra=0, dtype=mx.float32, eps=1e-6):
    """A projection [1, length, 3HD + extra] (extra columns make its q/k/v slices strided; a view that starts two
    tokens into its buffer) with random q/k norms."""
    x = mx.array(rng.standard_normal((1, length + 2, 3 * HEADS * HEAD_DIM + extra)).astype(np.float32)).astype(dtype)
    x = x[:, 2:]
    norms = []
    for _ in range(2):
        norm = nn.RMSNorm(HEAD_DIM, eps=eps)
        norm.weight = mx.array(rng.uniform(0.5, 1.5, HEAD_DIM).astype(np.float32)).astype(dtype)
        norms.append(norm)
    return x, norms[0], norms[1]


def _tables(length):
    """Full-width tables [length, D], as views starting three rows into larger ones."""
    ids = np.stack([np.arange(length + 3), np.arange(length + 3)[::-1] % 7], axis=-1)
    cos, sin = rope_tables(*rope_cos_sin(ids, (HEAD_DIM // 2, HEAD_DIM // 2), 10000.0))
    return cos[3:], sin[3:]


def _numpy_reference(sources, cos, sin):
    qs, ks, vs = [], [], []
    for x, norm_q, norm_k in sources:
        x = np.array(x.astype(mx.float32))
        b, length, _ = x.shape
        heads = x[..., : 3 * HEADS * HEAD_DIM].reshape(b, length, 3, HEADS, HEAD_DIM)
        for part, norm, out in ((0, norm_q, qs), (1, norm_k, ks)):
            t = heads[:, :, part]
            t = t / np.sqrt((t * t).mean(-1, keepdims=True) + norm.eps) * np.array(norm.weight.astype(mx.float32))
            out.append(t)
        vs.append(heads[:, :, 2])
    q, k, v = (np.concatenate(a, axis=1) for a in (qs, ks, vs))
    c, s = np.array(cos)[:, None], np.array(sin)[:, None]

    def rotate(t):
        swapped = t.reshape(*t.shape[:-1], -1, 2)[..., ::-1].reshape(t.shape)
        return t * c + swapped * s

    return rotate(q), rotate(k), v


@pytest.mark.parametrize("streams", [1, 2])
def test_plain_path_matches_numpy(streams, monkeypatch):
    monkeypatch.setattr(cuda_kernels, "ENABLED", False)
    rng = np.random.default_rng(0)
    sources = [_source(rng, 5, extra=0), _source(rng, 7, extra=32)][-streams:]
    cos, sin = _tables(sum(s[0].shape[1] for s in sources))
    got = qk_norm_rope(sources, HEADS, HEAD_DIM, cos, sin)
    for g, w in zip(got, _numpy_reference(sources, cos, sin)):
        assert g.shape == (1, w.shape[1], HEADS, HEAD_DIM)
        np.testing.assert_allclose(np.array(g), w, rtol=1e-5, atol=1e-5)


def test_attention_blhd_matches_bhld_attention():
    rng = np.random.default_rng(1)
    q, k, v = (mx.array(rng.standard_normal((2, 6, HEADS, HEAD_DIM)).astype(np.float32)) for _ in range(3))
    got = attention_blhd(q, k, v)
    scores = np.einsum("blhd,bmhd->bhlm", np.array(q), np.array(k)) / np.sqrt(HEAD_DIM)
    weights = np.exp(scores - scores.max(-1, keepdims=True))
    weights /= weights.sum(-1, keepdims=True)
    want = np.einsum("bhlm,bmhd->blhd", weights, np.array(v)).reshape(2, 6, HEADS * HEAD_DIM)
    np.testing.assert_allclose(np.array(got), want, rtol=1e-5, atol=1e-5)


@pytest.mark.cuda
@pytest.mark.skipif(not cuda_kernels._cuda(), reason="the fused kernel runs on CUDA only")
@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16])
@pytest.mark.parametrize("streams", [1, 2])
def test_fused_kernel_matches_plain_path(streams, dtype, monkeypatch):
    rng = np.random.default_rng(2)
    sources = [_source(rng, 40, 0, dtype), _source(rng, 200, 96, dtype)][-streams:]
    cos, sin = _tables(sum(s[0].shape[1] for s in sources))
    fused = qk_norm_rope(sources, HEADS, HEAD_DIM, cos, sin)
    monkeypatch.setattr(cuda_kernels, "ENABLED", False)
    plain = qk_norm_rope(sources, HEADS, HEAD_DIM, cos, sin)
    for f, p in zip(fused, plain):
        f, p = np.array(f.astype(mx.float32)), np.array(p.astype(mx.float32))
        if dtype == mx.float32:
            np.testing.assert_allclose(f, p, rtol=1e-5, atol=1e-5)
        else:  # one bf16 rounding step apart at most
            assert np.abs(f - p).max() <= 2**-7 * max(1.0, np.abs(p).max())
