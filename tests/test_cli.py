"""The command line, driven through typer's CliRunner and a real subprocess, on the example plugin."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import imagegen
from imagegen import plugins
from imagegen.image import read_metadata
from imagegen.testing import invoke, one_line_error


@pytest.fixture(autouse=True)
def in_tmp(tmp_path, monkeypatch, hello_plugin):
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_run_writes_png_with_metadata_and_prints_seed(in_tmp):
    result = invoke("run", "--model", "hello", "a red wave", "--size", "64x48", "--seed", "7", "--steps", "3")
    assert result.exit_code == 0, result.output
    path = in_tmp / "hello-waves-7.png"
    assert f"{path.name}  (seed 7)" in result.output
    assert Image.open(path).size == (64, 48)
    meta = read_metadata(path)
    assert meta["prompt"] == "a red wave" and meta["seed"] == 7 and meta["steps"] == 3
    assert meta["model"] == "hello-waves" and (meta["width"], meta["height"]) == (64, 48)
    assert meta["plugin"] == "imagegen-hello 0.1.0" and meta["imagegen"] == imagegen.__version__
    assert set(meta["timings"]) >= {"encode", "denoise", "decode", "total"}


def test_default_names_never_overwrite(in_tmp):
    for _ in range(2):
        assert invoke("run", "-m", "hello", "x", "--size", "32x32", "--seed", "1").exit_code == 0
    assert sorted(p.name for p in in_tmp.glob("*.png")) == ["hello-waves-1-1.png", "hello-waves-1.png"]


def test_json_output_count_and_seeds(in_tmp):
    result = invoke(
        "run",
        "-m",
        "hello",
        "x",
        "--size",
        "32x32",
        "--seed",
        "10",
        "-n",
        "2",
        "--json",
        "-o",
        str(in_tmp / "batch.png"),
    )
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["seeds"] == [10, 11] and len(data["images"]) == 2
    assert [read_metadata(p)["seed"] for p in data["images"]] == [10, 11]


def test_prompt_from_stdin(in_tmp):
    result = invoke("run", "-m", "hello", "-", "--size", "32x32", "--seed", "2", "--json", input="from stdin\n")
    assert result.exit_code == 0, result.output
    assert read_metadata(json.loads(result.stdout)["images"][0])["prompt"] == "from stdin"


def test_from_reproduces_bit_for_bit(in_tmp):
    assert invoke("run", "-m", "hello", "x", "--size", "48x32", "-n", "2", "--seed", "4", "-o", "a.png").exit_code == 0
    # the second image of the batch, regenerated alone from its own metadata
    result = invoke("run", "--from", "a-2.png", "-o", "again.png")
    assert result.exit_code == 0, result.output
    assert np.array_equal(np.asarray(Image.open("a-2.png")), np.asarray(Image.open("again.png")))
    assert read_metadata("again.png")["seed"] == 5


def test_info_prints_metadata(in_tmp):
    invoke("run", "-m", "hello", "info me", "--size", "32x32", "--seed", "3", "-o", "i.png")
    result = invoke("info", "i.png", "--json")
    assert json.loads(result.stdout)["prompt"] == "info me"
    Image.new("RGB", (8, 8)).save("plain.png")
    one_line_error(invoke("info", "plain.png"), "no imagegen metadata")


@pytest.mark.parametrize(
    "args,fragments",
    [
        (["--size", "100x100"], ["width must be a positive multiple of 16"]),
        (["--size", "big"], ["--size must look like"]),
        (["--width", "64", "--height", "0"], ["height"]),
        (["--size", "8192x8192"], ["larger than"]),
        (["--steps", "0"], ["--steps must be >= 1"]),
        (["--count", "0"], ["--count must be >= 1"]),
        (["--seed", "-3"], ["--seed must be >= 0"]),
        (["--negative", "blur"], ["'hello-waves' does not support --negative"]),
        (["--guidance", "3"], ["does not support --guidance"]),
        (["--tile"], ["does not support --tile"]),
        (["--image", "x.png"], ["does not support --image"]),
        (["--quantize", "4"], ["does not support --quantize 4"]),
        (["--quantize", "3.5bit"], ["Unknown quantization"]),
        (["--option", "cfg_truncation=0.5"], ["does not support --option cfg_truncation"]),
        (["--option", "novalue"], ["--option must look like NAME=VALUE"]),
        (["--mask", "m.png"], ["does not support --mask"]),
        (["--strength", "0.5"], ["does not support --strength"]),
        (["--outpaint", "8,0,8,0"], ["does not support --outpaint"]),
        (["--noise", "cuda"], ["--noise must be one of mlx, torch"]),
        (["--init-image", "red.png"], ["does not support --init-image"]),
    ],
)
def test_bad_options_are_one_line_errors(args, fragments, in_tmp):
    one_line_error(invoke("run", "-m", "hello", "x", *args), *fragments)
    assert not list(in_tmp.glob("*.png"))


def test_bad_reference_images(in_tmp):
    one_line_error(invoke("run", "-m", "hello-remix", "x", "--image", "missing.png"), "Image not found")
    Path("notes.png").write_text("not an image")
    one_line_error(invoke("run", "-m", "hello-remix", "x", "--image", "notes.png"), "Cannot read")
    Image.new("RGB", (16, 16), (250, 0, 0)).save("red.png")
    assert invoke("run", "-m", "hello-remix", "x", "--image", "red.png", "--size", "32x32").exit_code == 0


def test_bad_init_image_options(in_tmp):
    """On the demo model, which takes an init image: every mistake is one line before any weight loads."""
    Image.new("RGB", (128, 128), (250, 0, 0)).save("red.png")
    Path("notes.png").write_text("not an image")
    for flags, fragment in (
        (["--mask", "red.png"], "mask needs an init image"),
        (["--init-image", "notes.png"], "Cannot read notes.png"),
        (["--init-image", "gone.png"], "Image not found: gone.png"),
        (["--init-image", "red.png", "--strength", "1.5"], "--strength must be within (0, 1]"),
        (["--init-image", "red.png", "--strength", "0"], "--strength must be within (0, 1]"),
        (["--init-image", "red.png", "--strength", "1e-19"], "leaves no step out of 8"),
        (["--init-image", "red.png", "--outpaint", "8,8"], "--outpaint must be LEFT,TOP"),
        (["--init-image", "red.png", "--mask", "red.png", "--outpaint", "0,8,0,8"], "either a mask or outpaint"),
    ):
        one_line_error(invoke("run", "-m", "flux2-demo", "x", *flags), fragment)
    assert not list(in_tmp.glob("flux2-demo*.png"))


def test_missing_prompt_and_unwritable_output(in_tmp):
    one_line_error(invoke("run", "-m", "hello"), "Give a prompt")
    Path("file").write_text("")
    one_line_error(invoke("run", "-m", "hello", "x", "-o", "file/sub/x.png"), "Cannot create output folder")


@pytest.fixture
def heavy_model(hello_plugin, tmp_path, monkeypatch):
    """A model that needs downloaded weights and far more memory than any machine has."""
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))

    def register(register):
        register(
            imagegen.ModelSpec(
                id="heavy-1",
                family="heavy",
                load=hello_plugin.load,
                hf_repo="acme/heavy",
                estimate_memory=lambda *a: 10**15,
            )
        )

    plugins.register_plugin(types.SimpleNamespace(register_models=imagegen.hookimpl(register)), "heavy")
    yield tmp_path / "hf"
    plugins.unregister_plugin("heavy")


def test_missing_weights_say_where_and_how(heavy_model):
    one_line_error(invoke("run", "-m", "heavy-1", "x"), "models--acme--heavy", "imagegen pull heavy-1")
    one_line_error(invoke("run", "-m", "heavy-1", "x", "--weights", "nowhere"), "not found: nowhere")


def test_memory_preflight_refuses_then_force(heavy_model, tmp_path):
    weights = tmp_path / "w"
    weights.mkdir()
    one_line_error(
        invoke("run", "-m", "heavy-1", "x", "--weights", str(weights), "--size", "32x32"), "needs about", "--quantize 4"
    )
    result = invoke("run", "-m", "heavy-1", "x", "--weights", str(weights), "--size", "32x32", "--force")
    assert result.exit_code == 0, result.output


def test_ctrl_c_exits_130_without_partial_file(in_tmp, monkeypatch):
    def interrupted(self, request, conditioning, latents):
        raise KeyboardInterrupt
        yield

    monkeypatch.setattr(type(imagegen.registry.get("hello").pipeline()), "denoise_steps", interrupted)
    result = invoke("run", "-m", "hello", "x", "--size", "32x32", "-o", "never.png")
    assert result.exit_code == 130
    assert not list(in_tmp.glob("*.png")) and not list(in_tmp.glob(".imagegen-*"))


def test_models_and_plugins_listing(in_tmp):
    rows = {r["id"]: r for r in json.loads(invoke("models", "--json").stdout)}
    assert rows["hello-waves"]["weights"] == "not needed" and rows["hello-waves"]["aliases"] == ["hello"]
    assert "image-edit" in rows["hello-remix"]["tasks"]
    names = {r["distribution"] for r in json.loads(invoke("plugins", "--json").stdout)}
    assert {"imagegen-flux2", "imagegen-zimage", "imagegen-hello"} <= names
    assert invoke("--version").stdout.startswith("imagegen ")


def test_real_subprocess_error_has_no_traceback(in_tmp):
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(
        [sys.executable, "-m", "imagegen", "run", "--model", "nope", "x"], capture_output=True, text=True, env=env
    )
    assert proc.returncode == 1
    assert proc.stderr.strip().startswith("Error: Unknown model 'nope'") and "Traceback" not in proc.stderr


def test_pull_and_rm_use_the_cache(heavy_model, monkeypatch):
    """pull goes through huggingface_hub (replaced here: tests never touch the network); rm asks first."""
    import huggingface_hub

    cache = heavy_model

    def fake_download(repo_id, cache_dir, allow_patterns):
        snapshot = Path(cache_dir) / f"models--{repo_id.replace('/', '--')}" / "snapshots" / "c0ffee"
        snapshot.mkdir(parents=True)
        (snapshot / "model_index.json").write_text("{}")
        (snapshot.parent.parent / "refs").mkdir()
        (snapshot.parent.parent / "refs" / "main").write_text("c0ffee")
        return str(snapshot)

    def fake_file(repo_id, filename, cache_dir):  # pull reads model_index.json first to choose what to fetch
        (tmp := Path(cache_dir) / "index").mkdir(parents=True, exist_ok=True)
        (tmp / filename).write_text("{}")
        return str(tmp / filename)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_file)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_download)
    result = invoke("pull", "heavy-1")
    assert result.exit_code == 0, result.output
    assert "models--acme--heavy" in result.output
    rows = {r["id"]: r for r in json.loads(invoke("models", "--json").stdout)}
    assert rows["heavy-1"]["weights"] == "present" and rows["heavy-1"]["weights_bytes"] == 2
    kept = invoke("rm", "heavy-1", input="n\n")
    assert kept.exit_code != 0 and (cache / "models--acme--heavy").is_dir()
    assert invoke("rm", "heavy-1", "--yes").exit_code == 0
    assert not (cache / "models--acme--heavy").exists()
    one_line_error(invoke("rm", "heavy-1", "--yes"), "No cached weights")
    one_line_error(invoke("pull", "hello"), "has no Hugging Face repo")
