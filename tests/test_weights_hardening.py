"""Damaged or foreign checkpoints are one clear error naming the file (issue 18, items 10-14)."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import mlx.core as mx
import mlx.nn as mlx_nn
import numpy as np
import pytest
from safetensors.numpy import save_file

from imagegen import HFConfig, WeightsError, hub
from imagegen.text.tokenizer import ChatTokenizer
from imagegen.weights import load_module, safetensors_files


class Tiny(mlx_nn.Module):
    def __init__(self, dim: int = 8):
        super().__init__()
        self.proj = mlx_nn.Linear(dim, dim)


def state(dim: int = 8, **override) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "proj.weight": rng.standard_normal((dim, dim)).astype(np.float32),
        "proj.bias": rng.standard_normal(dim).astype(np.float32),
        **override,
    }


@pytest.mark.parametrize("dtype", [np.int32, np.int8, np.bool_])
def test_an_integer_tensor_where_a_float_belongs_names_tensor_and_file(tmp_path, dtype):
    save_file(state(**{"proj.weight": np.ones((8, 8), dtype)}), str(tmp_path / "model.safetensors"))
    with pytest.raises(
        WeightsError,
        match=r"1 wrong dtype: proj.weight in model.safetensors: .* vs model "
        r"mlx.core.float32",
    ):
        load_module(Tiny(), tmp_path, dtype="float32")


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nan_or_inf_in_weights_is_an_error_naming_the_tensor(tmp_path, bad):
    bias = state()["proj.bias"]
    bias[3] = bad
    save_file(state(**{"proj.bias": bias}), str(tmp_path / "model.safetensors"))
    with pytest.raises(WeightsError, match="NaN or Inf values .*: proj.bias$"):
        load_module(Tiny(), tmp_path, dtype="float32")


def test_values_too_large_for_float16_are_reported(tmp_path):
    save_file(state(**{"proj.bias": np.full(8, 1e6, np.float32)}), str(tmp_path / "model.safetensors"))
    load_module(Tiny(), tmp_path, dtype="float32")  # fine in float32
    with pytest.raises(WeightsError, match="too large for mlx.core.float16.*proj.bias"):
        load_module(Tiny(), tmp_path, dtype="float16")


def test_a_sum_that_overflows_float16_is_not_a_false_alarm(tmp_path):
    class Wide(mlx_nn.Module):
        def __init__(self):
            super().__init__()
            self.norm = mlx_nn.RMSNorm(100_000)

    save_file({"norm.weight": np.ones(100_000, np.float32)}, str(tmp_path / "model.safetensors"))
    load_module(Wide(), tmp_path, dtype="float16")  # the sum, 100000, is beyond float16; the values are fine


def test_the_finite_check_adds_little_to_a_load(tmp_path):
    """The reduction runs in the same evaluation as the load: on ~100 MB it costs a fraction of the load."""
    dim = 1024
    rng = np.random.default_rng(0)
    big = {f"layers.{i}.weight": rng.standard_normal((dim, dim), np.float32) for i in range(24)}
    save_file(big, str(tmp_path / "model.safetensors"))

    class Big(mlx_nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = [mlx_nn.Linear(dim, dim, bias=False) for _ in range(24)]

    def timed(check: bool) -> float:
        from imagegen import weights

        original = weights.evaluate_finite
        if not check:
            weights.evaluate_finite = lambda module, folder, defer=None: mx.eval(module.parameters())
        try:
            best = float("inf")
            for _ in range(3):
                start = time.perf_counter()
                load_module(Big(), tmp_path, dtype="bfloat16")
                best = min(best, time.perf_counter() - start)
            return best
        finally:
            weights.evaluate_finite = original

    plain, checked = timed(False), timed(True)
    print(f"load of 100 MB: {plain * 1e3:.0f} ms without the check, {checked * 1e3:.0f} ms with it")
    assert checked < plain * 1.5 + 0.05


@pytest.mark.parametrize(
    "content, fragment",
    [
        ("[1, 2]", "must hold a JSON object, not a list"),
        ('{"in_channels": 4', "is not valid JSON"),
        ("\xff\xfe", "Cannot read"),
    ],
)
def test_malformed_config_files_are_one_line_naming_the_file(tmp_path, content, fragment):
    class Config(HFConfig):
        in_channels: int = 16

    path = tmp_path / "config.json"
    path.write_bytes(content.encode("latin-1"))
    with pytest.raises(WeightsError, match=fragment) as info:
        Config.from_file(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_a_symlink_loop_is_one_line(tmp_path):
    class Config(HFConfig):
        dim: int = 1

    os.symlink(tmp_path / "config.json", tmp_path / "config.json")
    with pytest.raises(WeightsError, match="Cannot read .*config.json"):
        Config.from_file(tmp_path / "config.json")


def test_a_field_missing_from_config_json_is_named_not_defaulted(tmp_path):
    from imagegen_flux2.config import Flux2TransformerConfig

    (tmp_path / "config.json").write_text(
        json.dumps(
            {
                "in_channels": 32,
                "num_layers": 2,
                "num_single_layers": 4,
                "attention_head_dim": 64,
                "joint_attention_dim": 384,
            }
        )
    )
    with pytest.raises(WeightsError, match=r"config.json lacks 'num_attention_heads'"):
        Flux2TransformerConfig.from_file(tmp_path / "config.json")


@pytest.mark.parametrize(
    "weight_map, fragment",
    [
        ('{"weight_map": ["a.safetensors"]}', "needs a 'weight_map' object"),
        ('{"weight_map": {"proj.weight": "../../etc/x.safetensors"}}', "outside"),
        ('{"weight_map": {"proj.weight": "/etc/x.safetensors"}}', "outside"),
        ("[]", "needs a 'weight_map' object"),
        ('{"weight_map"', "is not valid JSON"),
    ],
)
def test_bad_safetensors_index(tmp_path, weight_map, fragment):
    (tmp_path / "model.safetensors.index.json").write_text(weight_map)
    with pytest.raises(WeightsError, match=fragment):
        safetensors_files(tmp_path)


@pytest.mark.parametrize(
    "content, fragment",
    [
        ("[]", "is not an imagegen quantization record"),
        ('{"quantization": "4"}', "needs mode, bits and group_size"),
        ("{bad", "is not valid JSON"),
    ],
)
def test_bad_quantization_record(tmp_path, content, fragment):
    save_file(state(), str(tmp_path / "model.safetensors"))
    (tmp_path / "quantization.json").write_text(content)
    with pytest.raises(WeightsError, match=fragment):
        load_module(Tiny(), tmp_path, dtype="float32")


def test_bad_tokenizer_files(tmp_path):
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(WeightsError, match="Cannot read .*tokenizer.json"):
        ChatTokenizer(tmp_path)


def demo_copy(tmp_path: Path) -> Path:
    import shutil

    import imagegen_flux2.plugin

    return Path(shutil.copytree(imagegen_flux2.plugin.DEMO, tmp_path / "demo"))


def test_model_index_class_is_checked_against_the_family(tmp_path):
    from imagegen.config import read_pipeline_index

    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "ZImagePipeline"}))
    with pytest.raises(WeightsError, match="holds a ZImagePipeline checkpoint, not FLUX.2"):
        read_pipeline_index(tmp_path, ("Flux2KleinPipeline",), "FLUX.2 Klein")
    (tmp_path / "model_index.json").write_text('{"_class_name": "Flux2KleinPip')  # truncated
    with pytest.raises(WeightsError, match="model_index.json is not valid JSON"):
        read_pipeline_index(tmp_path, ("Flux2KleinPipeline",), "FLUX.2 Klein")


def test_a_zimage_folder_given_to_flux2_is_one_line(tmp_path):
    import imagegen

    folder = demo_copy(tmp_path)
    index = folder / "model_index.json"
    index.write_text(index.read_text().replace("Flux2KleinPipeline", "ZImagePipeline"))
    with pytest.raises(WeightsError, match="holds a ZImagePipeline checkpoint, not FLUX.2"):
        imagegen.registry.get("flux2-klein-4b").pipeline(weights=folder)
    (folder / "imagegen.json").write_text("[1]")
    index.write_text(index.read_text().replace("ZImagePipeline", "Flux2KleinPipeline"))
    with pytest.raises(WeightsError, match="imagegen.json must hold a JSON object"):
        imagegen.registry.get("flux2-klein-4b").pipeline(weights=folder)


def test_missing_files_lists_what_a_folder_lacks(tmp_path):
    folder = demo_copy(tmp_path)
    assert hub.missing_files(folder) == []
    (folder / "vae" / "diffusion_pytorch_model.safetensors").unlink()
    (folder / "tokenizer" / "tokenizer.json").unlink()
    assert hub.missing_files(folder) == ["tokenizer/tokenizer.json", "vae/*.safetensors"]
    (folder / "model_index.json").unlink()
    assert hub.missing_files(folder) == ["model_index.json"]


def test_models_says_incomplete_for_a_partial_download(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from imagegen.cli import get_app

    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    snapshot = tmp_path / "hub" / "models--black-forest-labs--FLUX.2-klein-4B" / "snapshots" / "abc"
    snapshot.parent.mkdir(parents=True)
    demo_copy(tmp_path).rename(snapshot)
    (snapshot / "transformer" / "diffusion_pytorch_model.safetensors").unlink()  # an interrupted download
    rows = {r["id"]: r for r in json.loads(CliRunner().invoke(get_app(), ["models", "--json"]).stdout)}
    assert rows["flux2-klein-4b"]["weights"] == "incomplete"
    assert rows["flux2-klein-4b"]["missing_files"] == ["transformer/*.safetensors"]
    assert rows["flux2-demo"]["weights"] == "present"


def test_pull_fetches_only_what_imagegen_reads(tmp_path, monkeypatch):
    """Klein repos keep a 7.75 GB single-file checkpoint at the root: the patterns must not match it."""
    import fnmatch

    import huggingface_hub

    import imagegen

    demo = demo_copy(tmp_path)
    repo_files = [p.relative_to(demo).as_posix() for p in demo.rglob("*") if p.is_file()]
    repo_files += ["flux-2-klein-4b.safetensors", "README.md", "teaser.png", "tokenizer/merges.txt"]
    fetched: list[str] = []

    def fake_file(repo_id, filename, cache_dir):
        return str(demo / filename)

    def fake_snapshot(repo_id, cache_dir, allow_patterns):
        fetched.extend(f for f in repo_files if any(fnmatch.fnmatch(f, p) for p in allow_patterns))
        return str(demo)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_file)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot)
    hub.pull(imagegen.registry.get("flux2-klein-4b"))
    assert "flux-2-klein-4b.safetensors" not in fetched and "README.md" not in fetched
    assert "tokenizer/merges.txt" not in fetched and "teaser.png" not in fetched
    assert "transformer/diffusion_pytorch_model.safetensors" in fetched and "model_index.json" in fetched
    assert "tokenizer/chat_template.jinja" in fetched and "imagegen.json" in fetched
