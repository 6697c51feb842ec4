"""The `cache` option from every side: its values, the CLI (recorded in the PNG, replayed by --from), the server and
batch, a MagCache calibration run feeding a cached one, and one clear line for bad values. Runs on the bundled
flux2-demo model."""

from __future__ import annotations

import base64
import io
import json

import numpy as np
import pytest
from imagegen_cache.plugin import parse
from PIL import Image
from typer.testing import CliRunner

import imagegen
from imagegen.cli import get_app
from imagegen.image import load_image, read_metadata
from imagegen.options import family_options

RUN = ["run", "--model", "flux2-demo", "a red square", "--size", "64x64", "--steps", "4", "--seed", "3"]


def invoke(*args: str):
    return CliRunner().invoke(get_app(), list(args))


def one_line_error(result, fragment: str) -> None:
    assert result.exit_code != 0, result.output
    lines = [line for line in result.output.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and fragment in lines[0] and "Traceback" not in result.output, result.output


def test_values_and_their_normal_form(tmp_path):
    ratios = tmp_path / "r.json"
    ratios.write_text("[1.0, 1.1, 0.9]")
    assert parse("first-block") == "first-block:0.05"  # diffusers' default threshold
    assert parse(" First-Block:0.12 ") == "first-block:0.12"
    assert parse("off") is None
    assert parse(f"mag,ratios={ratios}") == f"mag:0.06,k=3,retention=0.2,ratios={ratios}"
    assert parse(f"mag:0.1,k=2,retention=0.3,ratios={ratios}") == f"mag:0.1,k=2,retention=0.3,ratios={ratios}"
    assert parse(f"mag:calibrate,ratios={tmp_path / 'new.json'}") == f"mag:calibrate,ratios={tmp_path / 'new.json'}"
    for bad, message in [
        ("first-block:x", "must be a number"),
        ("first-block:-1", ">= 0"),
        ("teacache", "cannot read"),
        ("mag:0.1", "needs the checkpoint's ratios"),
        (f"mag:0.1,q=1,ratios={ratios}", "unknown"),
        ("mag:0.1,ratios=/no/such.json", "not found"),
        (3, "must be a string"),
    ]:
        with pytest.raises(imagegen.InvalidOptionError, match=message):
            parse(bad)


def test_every_block_loop_model_takes_it():
    specs = imagegen.registry.all_specs()
    assert all("cache" in {o.name for o in family_options(s.extra_options)} for s in specs if s.block_loop)
    assert {"flux2-klein-4b", "flux2-klein-base-9b", "zimage", "zimage-turbo"} <= {s.id for s in specs if s.block_loop}


def test_cli_records_and_replays_the_cache(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert invoke(*RUN, "-o", "plain.png").exit_code == 0
    cached = invoke(*RUN, "--cache", "first-block:0.9", "-o", "cached.png")
    assert cached.exit_code == 0, cached.output
    assert read_metadata(tmp_path / "cached.png")["options"] == {"cache": "first-block:0.9"}
    again = invoke("run", "--from", "cached.png", "-o", "again.png")
    assert again.exit_code == 0, again.output
    assert read_metadata(tmp_path / "again.png")["options"] == {"cache": "first-block:0.9"}
    pixels = {name: np.asarray(load_image(tmp_path / f"{name}.png"), np.int16) for name in ("plain", "cached", "again")}
    assert np.array_equal(pixels["cached"], pixels["again"])
    assert np.abs(pixels["cached"] - pixels["plain"]).max() > 0  # steps were skipped
    off = invoke("run", "--from", "cached.png", "--cache", "off", "-o", "off.png")
    assert off.exit_code == 0, off.output
    assert np.array_equal(np.asarray(load_image(tmp_path / "off.png"), np.int16), pixels["plain"])
    one_line_error(invoke(*RUN, "--cache", "first-block:lots"), "must be a number")


def test_mag_calibration_then_cached_run(tmp_path):
    pipe = imagegen.registry.get("flux2-demo").pipeline(dtype="float32")
    ratios = tmp_path / "ratios.json"
    options = dict(width=64, height=64, steps=6, seed=3)
    plain = pipe.generate("a red square", **options).images[0]
    calibrated = pipe.generate("a red square", cache=f"mag:calibrate,ratios={ratios}", **options).images[0]
    assert np.array_equal(np.asarray(plain), np.asarray(calibrated))  # calibration computes every step
    measured = json.loads(ratios.read_text())
    assert len(measured) == 6 and measured[0] == 1.0 and all(r > 0 for r in measured)
    cached = pipe.generate("a red square", cache=f"mag:10,k=2,retention=0.2,ratios={ratios}", **options).images[0]
    assert np.abs(np.asarray(cached, np.int16) - np.asarray(plain, np.int16)).max() > 0


def test_server_and_batch_take_it_as_a_model_option(tmp_path):
    from fastapi.testclient import TestClient

    from imagegen.batch import run_batch
    from imagegen.image import METADATA_KEY
    from imagegen.server import create_app

    row = {
        "prompt": "a red square",
        "model": "flux2-demo",
        "size": "64x64",
        "steps": 4,
        "seed": 3,
        "options": {"cache": "first-block:0.9"},
    }
    with TestClient(create_app()) as client:
        served = client.post("/v1/images/generations", json=row)
        assert served.status_code == 200, served.text
        bad = client.post("/v1/images/generations", json={**row, "options": {"cache": "first-block:lots"}})
    png = Image.open(io.BytesIO(base64.b64decode(served.json()["data"][0]["b64_json"])))
    assert json.loads(png.text[METADATA_KEY])["options"] == {"cache": "first-block:0.9"}
    assert bad.status_code == 400 and "must be a number" in bad.json()["error"]["message"]

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"id": "a", **row}) + "\n")
    run_batch(prompts, tmp_path / "out")
    assert read_metadata(tmp_path / "out" / "a.png")["options"] == {"cache": "first-block:0.9"}
    assert np.array_equal(np.asarray(load_image(tmp_path / "out" / "a.png")), np.asarray(png.convert("RGB")))
