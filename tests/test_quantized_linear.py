"""Quantized layers with many tokens multiply by their dequantized weight: the same result as MLX's quantized
matmul (up to float rounding order) in every mode, the same parameters and keys, and the quantized kernel below
the token threshold."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

from imagegen import quantize as q
from imagegen.nn import quantized_linear
from imagegen.nn.quantized_linear import QuantizedLinear, dequantize_for_many_tokens

MODES = ("4", "8", "3@32", "mxfp8", "mxfp4", "nvfp4")


def layers(mode: str, bias: bool = True) -> tuple[nn.QuantizedLinear, QuantizedLinear]:
    """MLX's quantized layer and ours, sharing one quantized weight."""
    s = q.scheme(mode)
    linear = nn.Linear(128, 48, bias=bias)
    if bias:
        linear.bias = mx.random.normal((48,))
    ref = nn.QuantizedLinear.from_linear(linear, s["group_size"], s["bits"], mode=s["mode"])
    ours = nn.QuantizedLinear.from_linear(linear, s["group_size"], s["bits"], mode=s["mode"])
    dequantize_for_many_tokens(ours)
    return ref, ours


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16])
def test_dense_path_equals_quantized_matmul(mode, dtype):
    mx.random.seed(1)
    ref, ours = layers(mode)
    assert type(ours) is QuantizedLinear
    x = mx.random.normal((2, quantized_linear.DEQUANTIZE_TOKENS, 128)).astype(dtype)
    want, got = ref(x), ours(x)
    assert got.dtype == want.dtype and got.shape == want.shape
    tol = 1e-5 if dtype == mx.float32 else 2e-2
    scale = float(mx.abs(want.astype(mx.float32)).max())
    np.testing.assert_allclose(
        np.array(got.astype(mx.float32)), np.array(want.astype(mx.float32)), atol=tol * scale, rtol=0
    )


def test_few_tokens_keep_the_quantized_kernel(monkeypatch):
    mx.random.seed(2)
    ref, ours = layers("4", bias=False)
    calls = []
    real = quantized_linear.dense_weight
    monkeypatch.setattr(quantized_linear, "dense_weight", lambda *a, **k: calls.append(1) or real(*a, **k))
    few = mx.random.normal((1, quantized_linear.DEQUANTIZE_TOKENS - 1, 128))
    np.testing.assert_array_equal(np.array(ours(few)), np.array(ref(few)))  # the very same kernel
    assert calls == []
    many = mx.random.normal((quantized_linear.DEQUANTIZE_TOKENS, 128))
    np.testing.assert_allclose(np.array(ours(many)), np.array(ref(many)), atol=1e-4)
    assert calls == [1]
    monkeypatch.setattr(quantized_linear, "DEQUANTIZE_TOKENS", 0)  # IMAGEGEN_DEQUANTIZE_TOKENS=0: never dense
    ours(many)
    assert calls == [1]


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(64, 64)
        self.out = [nn.Linear(64, 32, bias=False)]

    def __call__(self, x):
        return self.out[0](nn.gelu(self.proj(x)))


def test_quantize_model_and_saved_record_use_the_dense_path():
    mx.random.seed(3)
    model = Tiny()
    record = q.quantize_model(model, "nvfp4")
    assert {type(m) for m in (model.proj, model.out[0])} == {QuantizedLinear}
    weights = dict(tree_flatten(model.parameters()))
    reloaded = Tiny()
    q.apply_record(reloaded, record, weights)
    reloaded.load_weights(list(weights.items()))
    assert type(reloaded.proj) is QuantizedLinear and sorted(dict(tree_flatten(reloaded.parameters()))) == sorted(
        weights
    )
    x = mx.random.normal((quantized_linear.DEQUANTIZE_TOKENS, 64))
    np.testing.assert_array_equal(np.array(reloaded(x)), np.array(model(x)))


@pytest.mark.cuda
@pytest.mark.skipif(not (hasattr(mx, "cuda") and mx.cuda.is_available()), reason="needs an MLX CUDA GPU")
@pytest.mark.parametrize("mode", ("4", "8", "mxfp8", "mxfp4", "nvfp4"))
def test_dense_path_on_the_gpu_at_a_real_shape(mode):
    """Klein 4B's attention projection with 1024 tokens in bf16, on the GPU: the GPU kernels of both paths agree."""
    mx.random.seed(4)
    s = q.scheme(mode)
    linear = nn.Linear(3072, 3072)
    linear.set_dtype(mx.bfloat16)
    ref = nn.QuantizedLinear.from_linear(linear, s["group_size"], s["bits"], mode=s["mode"])
    x = mx.random.normal((1, 1024, 3072)).astype(mx.bfloat16)
    with mx.stream(mx.gpu):
        want = ref(x).astype(mx.float32)
        dequantize_for_many_tokens(ref)
        got = ref(x).astype(mx.float32)
    err = float(mx.abs(got - want).max() / mx.abs(want).max())
    assert err < 1e-2, err


def test_dense_weights_are_not_all_held_at_once():
    """A stack of quantized layers evaluated as one graph holds about one dense weight at a time, not every layer's
    (issue 22: a 4-bit Klein 4B peaked near 8.7 GB when MLX ran every dequantization first)."""
    mx.random.seed(5)
    model = nn.Sequential(*(nn.Linear(1024, 1024, bias=False) for _ in range(16)))
    model.set_dtype(mx.bfloat16)
    q.quantize_model(model, "4")
    mx.eval(model.parameters())
    x = mx.random.normal((quantized_linear.DEQUANTIZE_TOKENS, 1024)).astype(mx.bfloat16)
    mx.eval(x)
    before = mx.get_active_memory()
    mx.reset_peak_memory()
    mx.eval(model(x))
    transient = mx.get_peak_memory() - before
    dense = 1024 * 1024 * 2  # one layer's bf16 weight (each layer's output is a quarter of that)
    # every layer's dense weight at once is 16 of them (34 measured before the fix, 11 with it)
    assert transient < 16 * dense, transient / dense
