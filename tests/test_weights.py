"""Weights: strict loading from the reference layouts, quantize on load, quantized save -> load round trip."""

from __future__ import annotations

import json
import threading

import mlx.core as mx
import mlx.nn as mlx_nn
import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from imagegen import WeightsError, WeightsNotFoundError
from imagegen.quantize import ALL_MODES, check_supported, keep_high_precision, normalize_mode, scheme
from imagegen.weights import load_module, save_module


class Tiny(mlx_nn.Module):
    """Checkpoint-named attributes, one conv needing the NCHW -> NHWC transpose in sanitize."""

    def __init__(self, dim: int = 64):
        super().__init__()
        self.proj_in = mlx_nn.Linear(dim, 2 * dim)
        self.proj_out = mlx_nn.Linear(2 * dim, dim, bias=False)
        self.conv = mlx_nn.Conv2d(3, 4, 3)

    @staticmethod
    def sanitize(weights):
        return {k: v.transpose(0, 2, 3, 1) if k == "conv.weight" else v for k, v in weights.items()}

    def __call__(self, x):
        return self.proj_out(mlx_nn.gelu(self.proj_in(x)))


def torch_state(dim: int = 64) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return {
        "proj_in.weight": torch.randn(2 * dim, dim),
        "proj_in.bias": torch.randn(2 * dim),
        "proj_out.weight": torch.randn(dim, 2 * dim),
        "conv.weight": torch.randn(4, 3, 3, 3),
        "conv.bias": torch.randn(4),
    }


def test_single_file_loads_and_casts(tmp_path):
    state = torch_state()
    save_file(state, tmp_path / "model.safetensors")
    model = Tiny()
    load_module(model, tmp_path, dtype="bfloat16")
    assert model.proj_in.weight.dtype == mx.bfloat16
    np.testing.assert_array_equal(
        np.array(model.conv.weight.astype(mx.float32)),
        state["conv.weight"].permute(0, 2, 3, 1).bfloat16().float().numpy(),
    )


def test_loads_on_any_thread(tmp_path):
    """Tensors are read on CPU streams (weights.READ_STREAMS), which MLX binds to the thread that made them: each
    thread gets its own, so a server's worker thread loads as the main thread does, and the evaluated weights are
    usable anywhere."""
    state = torch_state()
    save_file(state, tmp_path / "model.safetensors")
    loaded = {}

    def load(name):
        loaded[name] = Tiny()
        load_module(loaded[name], tmp_path, dtype="float32")

    load("main")
    worker = threading.Thread(target=load, args=("worker",))
    worker.start()
    worker.join()
    load("main again")
    for model in loaded.values():
        np.testing.assert_array_equal(np.array(model.proj_out.weight), state["proj_out.weight"].numpy())
        np.testing.assert_array_equal(np.array(model.proj_in.bias), state["proj_in.bias"].numpy())


def test_sharded_folder_with_index(tmp_path):
    state = torch_state()
    names = sorted(state)
    shards = {"model-00001-of-00002.safetensors": names[:2], "model-00002-of-00002.safetensors": names[2:]}
    for file, keys in shards.items():
        save_file({k: state[k] for k in keys}, tmp_path / file)
    index = {"metadata": {}, "weight_map": {k: f for f, keys in shards.items() for k in keys}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    model = Tiny()
    load_module(model, tmp_path, dtype="float32")
    np.testing.assert_array_equal(np.array(model.proj_out.weight), state["proj_out.weight"].numpy())


@pytest.mark.parametrize(
    "change,fragments",
    [
        (lambda s: s.pop("proj_out.weight"), ["1 missing: proj_out.weight"]),
        (lambda s: s.update({"extra.weight": torch.zeros(2)}), ["1 unexpected: extra.weight"]),
        (
            lambda s: s.update({"proj_in.bias": torch.zeros(5)}),
            ["wrong shape: proj_in.bias: file (5,) vs model (128,)"],
        ),
    ],
)
def test_strict_load_names_the_problem(tmp_path, change, fragments):
    state = torch_state()
    change(state)
    save_file(state, tmp_path / "model.safetensors")
    with pytest.raises(WeightsError) as e:
        load_module(Tiny(), tmp_path)
    message = str(e.value)
    assert "\n" not in message and "Tiny" in message and str(tmp_path) in message
    for fragment in fragments:
        assert fragment in message


def test_long_key_lists_are_shortened(tmp_path):
    save_file({f"junk.{i}": torch.zeros(1) for i in range(40)} | torch_state(), tmp_path / "model.safetensors")
    with pytest.raises(WeightsError, match=r"40 unexpected: .*\(\+34 more\)"):
        load_module(Tiny(), tmp_path)


def test_missing_and_corrupt_files(tmp_path):
    with pytest.raises(WeightsNotFoundError, match="Missing component folder"):
        load_module(Tiny(), tmp_path / "nope")
    with pytest.raises(WeightsNotFoundError, match="No \\*.safetensors"):
        load_module(Tiny(), tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(WeightsError, match="Cannot read"):
        load_module(Tiny(), tmp_path)


@pytest.mark.parametrize("mode", [m for m in ALL_MODES if m != "fp8"])  # fp8: tests/test_fp8_linear.py
def test_quantized_linear_matches_dequantized_reference(mode):
    check_supported(mode)
    s = scheme(normalize_mode(mode))
    linear = mlx_nn.Linear(128, 64)
    q = mlx_nn.QuantizedLinear.from_linear(linear, s["group_size"], s["bits"], mode=s["mode"])
    w = mx.dequantize(q.weight, q.scales, q.get("biases"), group_size=s["group_size"], bits=s["bits"], mode=s["mode"])
    x = mx.random.normal((3, 128), key=mx.random.key(1))
    np.testing.assert_allclose(np.array(q(x)), np.array(x @ w.T + linear.bias), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("mode", ["4", "8", "mxfp8", "mxfp4", "nvfp4"])
def test_quantize_save_load_round_trip_is_bit_identical(tmp_path, mode):
    dim = 256
    (tmp_path / "src").mkdir()
    save_file(torch_state(dim), tmp_path / "src" / "model.safetensors")
    model = Tiny(dim)
    record = load_module(
        model, tmp_path / "src", dtype="bfloat16", quantize=mode, predicate=keep_high_precision("proj_out")
    )
    assert isinstance(model.proj_in, mlx_nn.QuantizedLinear) and isinstance(model.proj_out, mlx_nn.Linear)
    x = mx.random.normal((2, dim), key=mx.random.key(0)).astype(mx.bfloat16)
    expected = model(x)
    save_module(model, tmp_path / "q", record=record)
    again = Tiny(dim)
    load_module(again, tmp_path / "q", dtype="bfloat16")
    assert isinstance(again.proj_in, mlx_nn.QuantizedLinear)
    np.testing.assert_array_equal(np.array(again(x).astype(mx.float32)), np.array(expected.astype(mx.float32)))

    dense = Tiny(dim)
    load_module(dense, tmp_path / "src", dtype="bfloat16")
    save_module(dense, tmp_path / "bf16")
    q_bytes = (tmp_path / "q" / "model.safetensors").stat().st_size
    bf16_bytes = (tmp_path / "bf16" / "model.safetensors").stat().st_size
    # proj_in holds half the matrix weights: it shrinks to ~bits/16 (+ scales); proj_out stays bf16
    s = scheme(normalize_mode(mode))
    bits = s["bits"] + 16 / s["group_size"] * (2 if s["mode"] == "affine" else 0.5)
    expected_ratio = 0.5 * bits / 16 + 0.5
    print(
        f"{mode}: quantized folder {q_bytes} B vs bf16 {bf16_bytes} B = {q_bytes / bf16_bytes:.3f} "
        f"(expected ~{expected_ratio:.3f})"
    )
    assert q_bytes / bf16_bytes == pytest.approx(expected_ratio, rel=0.05)
    with pytest.raises(WeightsError, match="cannot re-quantize"):
        load_module(Tiny(dim), tmp_path / "q", quantize="2")
