"""Qwen3 text encoder parity with transformers: every hidden state, padded batches, checkpoint layouts."""

from __future__ import annotations

import runpy
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
import torch
from mlx.utils import tree_flatten

from imagegen.errors import WeightsError
from imagegen.testing import TINY_QWEN3 as TINY
from imagegen.testing import make_qwen3
from imagegen.text.qwen3 import Qwen3Config, Qwen3Model, load_qwen3

LENGTHS = (13, 8, 3)  # a right-padded batch of three prompts
PAD_ID = 7


def padded_batch(vocab: int = TINY["vocab_size"], lengths=LENGTHS, seed: int = 1, length: int | None = None):
    rng = np.random.default_rng(seed)
    length = length or max(lengths)
    ids = rng.integers(0, vocab, size=(len(lengths), length))
    mask = np.arange(length)[None] < np.array(lengths)[:, None]
    ids[~mask] = PAD_ID
    return ids, mask


def reference_hidden_states(model: torch.nn.Module, ids: np.ndarray, mask: np.ndarray) -> list[np.ndarray]:
    with torch.no_grad():
        out = model(
            input_ids=torch.tensor(ids),
            attention_mask=torch.tensor(mask.astype(np.int64)),
            output_hidden_states=True,
            use_cache=False,
        )
    return [h.numpy() for h in out.hidden_states]


def errors(got: mx.array, want: np.ndarray) -> tuple[float, float]:
    got = np.array(got.astype(mx.float32))
    abs_err = float(np.abs(got - want).max())
    return abs_err, abs_err / float(np.abs(want).max())


CASES = {
    "causal-lm": {},
    # bare Qwen3Model layout, tied embeddings, attention biases, sharded files
    "base-tied-bias-sharded": dict(base=True, tie_word_embeddings=True, attention_bias=True, max_shard_size="40KB"),
}


# (lengths, padded length): rows of different lengths, one padded prompt (as the pipelines encode), two of one
# length, none padded
BATCHES = {"unequal": (LENGTHS, None), "one-padded": ((8,), 13), "two-padded": ((5, 5), 13), "unpadded": ((13,), 13)}


@pytest.mark.parametrize("batch", list(BATCHES))
@pytest.mark.parametrize("case", list(CASES))
def test_every_hidden_state_matches_transformers(tmp_path, case, batch):
    ref = make_qwen3(tmp_path / "text_encoder", **CASES[case])
    model = load_qwen3(tmp_path / "text_encoder", dtype="float32")
    lengths, padded = BATCHES[batch]
    ids, mask = padded_batch(lengths=lengths, length=padded)
    want = reference_hidden_states(ref, ids, mask)
    n = TINY["num_hidden_layers"]
    asked = [*range(n + 1), -2, -1]
    got = model.forward_with_layer_outputs(mx.array(ids), mx.array(mask), asked)
    worst = (0.0, 0.0)
    for index, hidden in zip(asked, got, strict=True):
        abs_err, rel_err = errors(hidden, want[index])  # padded positions included: FLUX.2 reads them all
        worst = max(worst[0], abs_err), max(worst[1], rel_err)
        assert rel_err < 1e-5, f"hidden state {index}: max abs {abs_err:.2e}, rel {rel_err:.2e}"
    print(f"{case}: over {len(asked)} hidden states max abs {worst[0]:.2e}, max rel {worst[1]:.2e}")


def test_stops_after_the_last_asked_layer(tmp_path):
    make_qwen3(tmp_path / "te")
    model = load_qwen3(tmp_path / "te", dtype="float32")
    calls = []

    class Spy(nn.Module):
        def __init__(self, layer, index):
            super().__init__()
            self.layer, self.index = layer, index

        def __call__(self, *args):
            calls.append(self.index)
            return self.layer(*args)

    model.layers = [Spy(layer, i) for i, layer in enumerate(model.layers)]
    ids, mask = padded_batch()
    outs = model.forward_with_layer_outputs(mx.array(ids), mx.array(mask), [2, 1])
    assert calls == [0, 1] and [o.shape for o in outs] == [(3, 13, 64)] * 2
    with pytest.raises(ValueError, match="out of range"):
        model.forward_with_layer_outputs(mx.array(ids), mx.array(mask), [TINY["num_hidden_layers"] + 1])


def test_bfloat16_and_quantized_stay_close(tmp_path):
    ref = make_qwen3(tmp_path / "te")
    ids, mask = padded_batch()
    want = reference_hidden_states(ref, ids, mask)[-2]
    for dtype, quantize, tolerance in (("bfloat16", None, 3e-2), ("float32", "8", 3e-2)):
        model = load_qwen3(tmp_path / "te", dtype=dtype, quantize=quantize)
        _, rel_err = errors(model.forward_with_layer_outputs(mx.array(ids), mx.array(mask), [-2])[0], want)
        assert rel_err < tolerance, (dtype, quantize, rel_err)
    assert type(model.embed_tokens) is nn.Embedding  # kept in full precision
    assert isinstance(model.layers[0].mlp.down_proj, nn.QuantizedLinear)


def test_real_configs_build_with_their_shapes():
    # Qwen/Qwen3-4B's and -8B's config.json, as the benchmarks write them
    families = runpy.run_path(str(Path(__file__).parents[1] / "benchmarks" / "families.py"))
    qwen3_4b, qwen3_8b = families["QWEN3_4B"], families["QWEN3_8B"]
    for config, params in ((qwen3_4b, 4_022_468_096), (qwen3_8b, 7_568_405_504)):
        cfg = Qwen3Config.from_dict(config)
        model = Qwen3Model(cfg)  # lazy: nothing is allocated; counts match Qwen's model cards (no lm_head)
        assert model.layers[0].self_attn.q_proj.weight.shape == (32 * 128, cfg.hidden_size)
        assert model.layers[0].self_attn.k_proj.weight.shape == (8 * 128, cfg.hidden_size)
        assert sum(p.size for _, p in nn.utils.tree_flatten(model.parameters())) == params
        assert cfg.theta == 1e6 and "architectures" in cfg.unknown_keys


def test_config_reads_rope_theta_either_way_and_refuses_what_it_cannot_run():
    assert Qwen3Config.from_dict({"rope_theta": 5e5}).theta == 5e5
    assert Qwen3Config.from_dict({"rope_parameters": {"rope_type": "default", "rope_theta": 2e6}}).theta == 2e6
    with pytest.raises(WeightsError, match="yarn"):
        Qwen3Config.from_dict({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}})
    with pytest.raises(WeightsError, match="sliding"):
        Qwen3Config.from_dict({"num_hidden_layers": 4, "use_sliding_window": True, "max_window_layers": 2})
    with pytest.raises(WeightsError, match="sliding"):
        Qwen3Config.from_dict({"num_hidden_layers": 2, "layer_types": ["full_attention", "sliding_attention"]})


def test_layers_past_the_last_needed_stay_on_disk(tmp_path):
    """FLUX.2 runs 27 of Qwen3-4B's 36 layers: the rest are never read (lazily mapped) unless asked for."""
    make_qwen3(tmp_path)
    start = mx.get_active_memory()
    lazy = load_qwen3(tmp_path, dtype="float32", layers=[1])
    lazy_bytes = mx.get_active_memory() - start
    eager = load_qwen3(tmp_path, dtype="float32")
    eager_bytes = mx.get_active_memory() - start - lazy_bytes
    layer = sum(v.nbytes for _, v in tree_flatten(eager.layers[1].parameters()))
    assert eager_bytes - lazy_bytes >= 2 * layer * 0.99  # layers 1 and 2 (and the final norm) not read
    ids, mask = padded_batch()
    full = eager.forward_with_layer_outputs(mx.array(ids), mx.array(mask), [1, -1])
    got = lazy.forward_with_layer_outputs(mx.array(ids), mx.array(mask), [1, -1])  # later layers load on demand
    for g, f in zip(got, full):
        np.testing.assert_array_equal(np.array(g), np.array(f))


def test_quantized_layers_do_not_pile_up_dense_weights():
    """A quantized encoder's dense temporaries (imagegen.nn.quantized_linear) stay about two layers', not the whole
    stack's: each dequantization waits for its layer's input, and the stack keeps one layer in flight (the GPU's
    command batches otherwise hold a batch's temporaries; issue 22: a 4-bit Klein 4B peaked above 8 GB)."""
    from imagegen import quantize as q
    from imagegen.nn import quantized_linear

    config = Qwen3Config(
        **{**TINY, "hidden_size": 256, "intermediate_size": 1024, "num_hidden_layers": 8, "head_dim": 64}
    )
    model = Qwen3Model(config)
    assert not model.quantized  # unquantized: the stack stays one graph
    q.quantize_model(model, "4")
    assert model.quantized
    mx.eval(model.parameters())
    ids = mx.zeros((1, quantized_linear.DEQUANTIZE_TOKENS), mx.int32)
    start = mx.get_active_memory()
    mx.reset_peak_memory()
    mx.eval(model(ids))
    transient = mx.get_peak_memory() - start
    dense_layer = 4 * (3 * 256 * 1024 + 2 * 256 * 256 + 2 * 256 * 128)  # float32 MLP + q, o + k, v weights
    assert transient < 3 * dense_layer, transient / dense_layer  # all eight layers: 8 and more


def test_boolean_masks_reach_the_kernel_as_a_small_additive_bias(monkeypatch):
    """imagegen.nn.attention turns a boolean mask into an additive one of the mask's own shape (MLX would build a
    full [B, H, Lq, Lk] bias from a boolean one on every call on CUDA); the result is the same."""
    from imagegen.nn import attention

    rng = np.random.default_rng(2)
    q, k, v = (mx.array(rng.standard_normal((2, 4, 6, 8)).astype(np.float32)) for _ in range(3))
    mask = mx.array(np.tril(np.ones((6, 6), bool)))[None, None]
    want = mx.fast.scaled_dot_product_attention(q, k, v, scale=8**-0.5, mask=mask)
    seen, sdpa = [], mx.fast.scaled_dot_product_attention
    monkeypatch.setattr(
        mx.fast,
        "scaled_dot_product_attention",
        lambda *a, mask=None, **kw: seen.append(mask) or sdpa(*a, mask=mask, **kw),
    )
    got = attention(q, k, v, mask)
    assert seen[0].dtype == mx.float32 and seen[0].shape == (1, 1, 6, 6)
    np.testing.assert_allclose(np.array(got), np.array(want), rtol=1e-6, atol=1e-6)
