"""imagegen.lora core: the side path on quantized layers equals merging into the dequantized weight, for every
adapter type and placement; restoring puts back the very same modules; option parsing; layout descriptions."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from imagegen.errors import InvalidOptionError, LoraError
from imagegen.lora import LoraLinear, Part, Patcher, parse_cli_lora
from imagegen.lora.apply import merged
from imagegen.lora.deltas import FullDelta, LohaDelta, LokrDelta, LoraDelta
from imagegen.lora.file import AdapterFile
from imagegen.lora.keys import parse_keys
from imagegen.options import BY_NAME


class Tree(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = [{"proj": nn.Linear(64, 96, bias=True)}]
        self.out = nn.Linear(128, 64, bias=False)


def rand(*shape, seed=0):
    return mx.random.normal(shape, key=mx.random.key(seed)) * 0.2


DELTAS = [  # (delta, part) pairs covering each type and placement on a [96, 64] layer
    (LoraDelta(rand(4, 64, seed=1), rand(32, 4, seed=2), 0.5), Part("blocks.0.proj", rows=(32, 64))),
    (LoraDelta(rand(3, 64, seed=3), rand(96, 3, seed=4), 2.0), Part("blocks.0.proj", swap_halves=True)),
    (LokrDelta(rand(8, 4, seed=5), rand(12, 16, seed=6), 1.0), Part("blocks.0.proj")),  # kron side path
    (LokrDelta(rand(4, 4, seed=7), rand(8, 16, seed=8), 0.5), Part("blocks.0.proj", rows=(0, 32))),  # dense
    (
        LohaDelta(rand(96, 2, seed=9), rand(2, 64, seed=10), rand(96, 3, seed=11), rand(3, 64, seed=12), 0.7),
        Part("blocks.0.proj"),
    ),
    (FullDelta(rand(96, 80, seed=13)), Part("blocks.0.proj", cols=(16, 80))),
]


@pytest.mark.parametrize("index", range(len(DELTAS)))
@pytest.mark.parametrize("mode", ["8", "mxfp8"])
def test_side_path_on_quantized_equals_merging_dequantized(index, mode):
    delta, part = DELTAS[index]
    tree = Tree()
    tree.blocks[0]["proj"] = quantized = nn.QuantizedLinear.from_linear(
        tree.blocks[0]["proj"], group_size=32, bits=8, mode="affine" if mode == "8" else "mxfp8"
    )
    x = rand(3, 5, 64, seed=20)
    patcher = Patcher(tree)
    patcher.apply([({"blocks.0.proj": [(delta, part)]}, 1.5)])
    adapted = tree.blocks[0]["proj"]
    assert isinstance(adapted, LoraLinear)
    zero = nn.Linear(64, 96, bias=False)
    zero.weight = mx.zeros((96, 64))
    placed = merged(zero, [(delta, part, 1.5)]).weight  # the delta as merging would add it
    want = quantized(x) + x @ placed.T
    np.testing.assert_allclose(np.asarray(adapted(x)), np.asarray(want), rtol=1e-4, atol=1e-4)
    assert not np.allclose(np.asarray(adapted(x)), np.asarray(quantized(x)), atol=1e-2)
    patcher.restore()
    assert tree.blocks[0]["proj"] is quantized


def test_merge_and_restore_leave_the_original_arrays_alone():
    tree = Tree()
    original, weight = tree.out, np.asarray(tree.out.weight)
    patcher = Patcher(tree)
    split = LoraDelta(rand(2, 192, seed=1), rand(64, 2, seed=2), 1.0)
    patcher.apply([({"out": [(split, Part("out", cols=(64, 192)))]}, 1.0)])
    assert tree.out is not original and not np.array_equal(np.asarray(tree.out.weight), weight)
    patcher.apply([])  # switching to no adapters
    assert tree.out is original and np.array_equal(np.asarray(original.weight), weight)


def test_option_parsing(tmp_path, monkeypatch):
    assert parse_cli_lora("styles/ink.safetensors:0.6").scale == 0.6
    assert parse_cli_lora("C:\\loras\\ink.safetensors").path == "C:\\loras\\ink.safetensors"
    assert parse_cli_lora("ink.safetensors:-1").scale == -1.0
    monkeypatch.chdir(tmp_path)
    for name in "abc":
        mx.save_safetensors(f"{name}.safetensors", {"x.lora_A.weight": mx.zeros((1, 1))})
    option = BY_NAME["loras"]
    specs = option.check(["a.safetensors:0.3", ("b.safetensors", 0.5), {"name": "c.safetensors", "scale": 2}])
    assert [(s.path, s.scale) for s in specs] == [
        ("a.safetensors", 0.3),
        ("b.safetensors", 0.5),
        ("c.safetensors", 2.0),
    ]
    saved = option.to_json(specs)
    assert saved[0] == {"name": "a.safetensors", "sha256": saved[0]["sha256"], "scale": 0.3}
    assert option.from_json(saved, {}, [tmp_path])[1].scale == 0.5
    with pytest.raises(InvalidOptionError, match="path, "):
        option.check([("a.safetensors", "strong")])
    with pytest.raises(LoraError, match="not found"):
        option.check(["missing.safetensors"])


def test_layout_description_and_report(tmp_path):
    table = {"transformer": {"BFL": {"double_blocks.0.img_attn.qkv": (Part("blocks.0.proj"),)}}}
    tensors = {
        "lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight": mx.zeros((2, 64)),
        "lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight": mx.zeros((96, 2)),
        "lora_unet_double_blocks_0_img_attn_qkv.alpha": mx.array(1.0),
        "lora_unet_double_blocks_0_img_attn_qkv.dora_scale": mx.zeros((96,)),
    }
    parsed = parse_keys(AdapterFile(tmp_path / "k.safetensors", tensors), table, "test-model")
    assert parsed.layout == "BFL names, LoRA, alpha, kohya / musubi (lora_unet_)"
    status = {
        r.key.rsplit(".", 2)[-2] if r.key.endswith("weight") else r.key.rsplit(".", 1)[-1]: r.status
        for r in parsed.report
    }
    assert status == {"lora_down": "mapped", "lora_up": "mapped", "alpha": "mapped", "dora_scale": "unknown"}
