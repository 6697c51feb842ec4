"""`--quantize fp8` through every front end, with the bundled demo model on the CPU: the command line (PNG
metadata, `--from` replay), batch and the server all give the image the Python API gives."""

from __future__ import annotations

import base64
import io
import json

import httpx
import numpy as np
from PIL import Image

from imagegen import registry
from imagegen.batch import Defaults, LoadOptions, run_batch
from imagegen.image import METADATA_KEY, read_metadata
from imagegen.nn.fp8_linear import Fp8Linear
from imagegen.server.embedded import serve_in_thread
from imagegen.testing import invoke

PROMPT, SEED, STEPS = "a red square on a green background", 3, 2


def pixels(image) -> np.ndarray:
    with Image.open(image) if not isinstance(image, Image.Image) else image as img:
        return np.asarray(img.convert("RGB"))


def test_fp8_everywhere_gives_the_api_image(tmp_path, monkeypatch):
    pipe = registry.get("flux2-demo").pipeline(quantize="fp8")
    assert any(isinstance(m, Fp8Linear) for _, m in pipe.transformer.named_modules())
    want = pixels(pipe.generate(PROMPT, seed=SEED, steps=STEPS).images[0])
    dense = pixels(registry.get("flux2-demo").pipeline().generate(PROMPT, seed=SEED, steps=STEPS).images[0])
    assert 0 < np.abs(want.astype(float) - dense).mean() < 2  # quantized, and still the same picture

    monkeypatch.chdir(tmp_path)
    result = invoke("run", "-m", "flux2-demo", PROMPT, "--quantize", "fp8", "--seed", str(SEED), "--steps", "2")
    assert result.exit_code == 0, result.output
    (path,) = tmp_path.glob("flux2-demo*.png")
    assert read_metadata(path)["quantize"] == "fp8"
    assert np.array_equal(pixels(path), want)
    assert invoke("run", "--from", str(path), "-o", "again.png").exit_code == 0
    assert np.array_equal(pixels(tmp_path / "again.png"), want)

    rows = tmp_path / "prompts.jsonl"
    rows.write_text(json.dumps({"id": "b", "prompt": PROMPT, "seed": SEED, "steps": STEPS}) + "\n")
    summary = run_batch(rows, tmp_path / "batch", Defaults(model="flux2-demo"), LoadOptions(quantize="fp8"))
    assert summary.done == 1
    assert read_metadata(tmp_path / "batch" / "b.png")["quantize"] == "fp8"
    assert np.array_equal(pixels(tmp_path / "batch" / "b.png"), want)

    with serve_in_thread(models=["flux2-demo"]) as (url, _), httpx.Client(base_url=url, timeout=60) as http:
        body = {"model": "flux2-demo", "prompt": PROMPT, "seed": SEED, "steps": STEPS, "quantize": "fp8"}
        answer = http.post("/v1/images/generations", json={**body, "response_format": "b64_json"})
        assert answer.status_code == 200, answer.text
        image = Image.open(io.BytesIO(base64.b64decode(answer.json()["data"][0]["b64_json"])))
        assert json.loads(image.text[METADATA_KEY])["quantize"] == "fp8"
        assert np.array_equal(pixels(image), want)
