"""LoRA from the command line on the bundled demo model: `run --lora` (PNG metadata, `--from` replay), errors as one
line, `lora inspect`, and `convert` writing a merged folder that loads like any other."""

from __future__ import annotations

import base64
import json

import numpy as np
import pytest
from imagegen_flux2.plugin import DEMO
from PIL import Image
from typer.testing import CliRunner

from imagegen.cli import get_app
from imagegen.image import read_metadata
from imagegen.testing import random_lora, save_adapter

SHAPES = {
    "transformer_blocks.0.attn.to_q": (192, 192),
    "transformer_blocks.1.ff.linear_in": (1152, 192),
    "single_transformer_blocks.0.attn.to_out": (192, 768),
}
RUN = (
    "run",
    "-m",
    "flux2-demo",
    "a red circle on a blue background",
    "--seed",
    "3",
    "--steps",
    "2",
    "--size",
    "64x64",
    "--quiet",
)


def invoke(*args: str):
    return CliRunner().invoke(get_app(), list(args))


def pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path), np.int16)


@pytest.fixture
def adapter(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return save_adapter(tmp_path / "style.safetensors", random_lora(SHAPES, 4, 1, 0.5, prefix="transformer."))


def test_run_records_and_replays_loras(adapter, tmp_path):
    assert invoke(*RUN, "-o", "bare.png").exit_code == 0
    result = invoke(*RUN, "-o", "styled.png", "--lora", f"{adapter}:0.8")
    assert result.exit_code == 0, result.output
    meta = read_metadata(tmp_path / "styled.png")
    assert meta["loras"] == [{"name": "style.safetensors", "scale": 0.8, "sha256": meta["loras"][0]["sha256"]}]
    assert len(meta["loras"][0]["sha256"]) == 64
    assert np.abs(pixels("styled.png") - pixels("bare.png")).max() > 10
    assert invoke("run", "--from", "styled.png", "-o", "again.png", "--quiet").exit_code == 0
    assert np.array_equal(pixels("again.png"), pixels("styled.png"))

    adapter.rename(tmp_path / "elsewhere.safetensors")  # found by name beside the image (or here) only
    result = invoke("run", "--from", "styled.png", "-o", "lost.png", "--quiet")
    assert result.exit_code == 1 and "'style.safetensors'" in result.output and not (tmp_path / "lost.png").exists()
    save_adapter(adapter, random_lora(SHAPES, 4, 2, 0.5, prefix="transformer."))  # same name, other contents
    result = invoke("run", "--from", "styled.png", "-o", "changed.png", "--quiet")
    assert result.exit_code == 1 and "with that content" in result.output
    result = invoke("run", "--from", "styled.png", "-o", "changed.png", "--quiet", "--lora", f"{adapter}:0.8")
    assert result.exit_code == 0, result.output  # given again, it is used


def test_quantized_weights_take_the_side_path(adapter):
    """8-bit weights (the demo's under the Klein 4B spec, which quantizes): the adapter changes the image through its
    side path, and switching it off gives the bare 8-bit image back exactly."""
    q8 = ("-m", "flux2-klein-4b", "--weights", str(DEMO), "--dtype", "float32", "-q", "8")
    assert invoke(*RUN, *q8, "-o", "bare8.png").exit_code == 0
    result = invoke(*RUN, *q8, "-o", "styled8.png", "--lora", f"{adapter}:0.8")
    assert result.exit_code == 0, result.output
    assert np.abs(pixels("styled8.png") - pixels("bare8.png")).max() > 10
    assert invoke(*RUN, "-o", "styled.png", "--lora", f"{adapter}:0.8").exit_code == 0
    assert np.abs(pixels("styled8.png").astype(float) - pixels("styled.png")).mean() < 3  # close to full precision


def test_unknown_keys_are_one_line_and_no_file(adapter, tmp_path):
    extra = random_lora({**SHAPES, "transformer_blocks.0.attn.to_mystery": (4, 4)}, 2, 3, prefix="transformer.")
    path = save_adapter(tmp_path / "odd.safetensors", extra)
    result = invoke(*RUN, "-o", "odd.png", "--lora", str(path))
    lines = result.output.strip().splitlines()
    assert result.exit_code == 1 and len(lines) == 1 and lines[0].startswith("Error: odd.safetensors: 2 of 8 keys")
    assert "to_mystery" in lines[0] and not (tmp_path / "odd.png").exists()
    assert invoke(*RUN, "-o", "odd.png", "--lora", str(path), "--lora-partial").exit_code == 0
    result = invoke(*RUN, "--lora", "missing.safetensors")
    assert result.exit_code == 1 and "LoRA file not found" in result.output


def test_inspect_reports_every_key(adapter, tmp_path):
    kohya = {"lora_unet_double_blocks_0_img_attn_qkv": (576, 192), "lora_unet_single_blocks_1_linear2": (192, 768)}
    tensors = random_lora(kohya, 2, 4, down="lora_down.weight", up="lora_up.weight", alpha=1.0)
    tensors["lora_unet_double_blocks_0_img_attn_qkv.dora_scale"] = tensors["lora_unet_single_blocks_1_linear2.alpha"]
    path = save_adapter(tmp_path / "kohya.safetensors", tensors)
    result = invoke("lora", "inspect", str(path), "--model", "flux2-demo")
    assert result.exit_code == 0, result.output
    assert "kohya / musubi (lora_unet_)" in result.output and "BFL names" in result.output
    assert "6 mapped, 0 ignored, 1 unknown of 7 keys" in result.output
    assert "transformer_blocks.0.attn.to_qkv" in result.output and "to_out_attn (input columns 0:192)" in result.output
    data = json.loads(invoke("lora", "inspect", str(path), "-m", "flux2-demo", "--json").output)
    assert data["counts"] == {"mapped": 6, "ignored": 0, "unknown": 1}


def test_convert_writes_a_merged_folder(adapter, tmp_path):
    assert invoke(*RUN, "-o", "styled.png", "--lora", f"{adapter}:0.8").exit_code == 0
    result = invoke("convert", "-m", "flux2-demo", "--lora", f"{adapter}:0.8", "-o", str(tmp_path / "merged"))
    assert result.exit_code == 0, result.output
    assert invoke(*RUN, "-o", "merged.png", "--weights", str(tmp_path / "merged")).exit_code == 0
    assert np.abs(pixels("merged.png") - pixels("styled.png")).max() <= 1
    # the demo's weights under the Klein 4B spec, which allows quantization
    result = invoke(
        "convert",
        "-m",
        "flux2-klein-4b",
        "--weights",
        str(DEMO),
        "--lora",
        str(adapter),
        "-q",
        "8",
        "-o",
        str(tmp_path / "q8"),
    )
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "q8" / "transformer" / "quantization.json").read_text())["bits"] == 8
    q8 = ("-m", "flux2-klein-4b", "--weights", str(tmp_path / "q8"), "--dtype", "float32")
    assert invoke(*RUN, *q8, "-o", "q8.png").exit_code == 0
    assert np.abs(pixels("q8.png") - pixels("styled.png")).max() > 0  # quantized: close, not equal
    result = invoke("convert", "-m", "flux2-demo", "--lora", str(adapter), "-o", str(tmp_path / "q8"))
    assert result.exit_code == 1 and "already exists" in result.output
    # fp8, which the demo model takes: the saved folder loads back as fp8 and draws what the fp8 run draws
    result = invoke("convert", "-m", "flux2-demo", "--lora", str(adapter), "-q", "fp8", "-o", str(tmp_path / "f8"))
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "f8" / "transformer" / "quantization.json").read_text())["mode"] == "fp8"
    assert invoke(*RUN, "-o", "f8.png", "--weights", str(tmp_path / "f8")).exit_code == 0
    assert invoke(*RUN, "-o", "f8-lora.png", "--lora", str(adapter), "-q", "fp8").exit_code == 0
    error = {name: np.abs(pixels(f"{name}.png") - pixels("styled.png")).mean() for name in ("q8", "f8", "f8-lora")}
    assert error["f8"] < 1.5 * error["q8"] and error["f8-lora"] < 1.5 * error["q8"]  # as close as 8-bit


def test_server_names_adapters_from_its_folder_and_batch_rows_take_them(adapter, tmp_path):
    from fastapi.testclient import TestClient

    from imagegen.batch import BatchInputError, run_batch
    from imagegen.server import create_app

    assert invoke(*RUN, "-o", "styled.png", "--lora", f"{adapter}:0.8").exit_code == 0
    body = {
        "model": "flux2-demo",
        "prompt": RUN[3],
        "seed": 3,
        "steps": 2,
        "size": "64x64",
        "loras": [{"name": "style.safetensors", "scale": 0.8}],
    }
    with TestClient(create_app(lora_dir=tmp_path)) as client:
        listed = client.get("/v1/loras").json()["data"]
        assert [(x["name"], len(x["sha256"])) for x in listed] == [("style.safetensors", 64)]
        answer = client.post("/v1/images/generations", json=body)
        assert answer.status_code == 200, answer.text
        (tmp_path / "served.png").write_bytes(base64.b64decode(answer.json()["data"][0]["b64_json"]))
        for name in ("../style.safetensors", str(adapter), "other.safetensors"):
            bad = client.post("/v1/images/generations", json={**body, "loras": [{"name": name}]})
            assert bad.status_code == 400 and bad.json()["error"]["param"] == "loras"
    assert np.array_equal(pixels("served.png"), pixels("styled.png"))
    served = read_metadata(tmp_path / "served.png")["loras"][0]
    assert served["name"] == "style.safetensors" and "path" not in served  # the server's folder stays private
    with TestClient(create_app()) as client:
        assert client.post("/v1/images/generations", json=body).status_code == 400

    row = {
        "id": "one",
        "prompt": RUN[3],
        "model": "flux2-demo",
        "seed": 3,
        "steps": 2,
        "size": "64x64",
        "loras": [f"{adapter}:0.8"],
    }
    (tmp_path / "rows.jsonl").write_text(json.dumps(row) + "\n")
    run_batch(tmp_path / "rows.jsonl", tmp_path / "batch")
    assert np.array_equal(pixels(tmp_path / "batch" / "one.png"), pixels("styled.png"))
    (tmp_path / "bad.jsonl").write_text(json.dumps({**row, "loras": [{"path": "missing.safetensors"}]}) + "\n")
    with pytest.raises(BatchInputError, match="line 1: LoRA file not found: missing.safetensors"):
        run_batch(tmp_path / "bad.jsonl", tmp_path / "bad")
