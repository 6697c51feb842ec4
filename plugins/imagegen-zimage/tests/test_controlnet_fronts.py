"""Z-Image ControlNet from every front end: the CLI (--controlnet, --control-image, --control-scale, --canny), PNG
metadata and `run --from`, a batch row, a server upload; the canny helper; and the one-line refusals. Each front end
draws the image Python draws (whose parity with diffusers test_controlnet_pipeline proves)."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
from imagegen_zimage.canny import canny_thresholds
from imagegen_zimage.plugin import variant
from PIL import Image

import imagegen
from imagegen import plugins
from imagegen.image import read_metadata
from imagegen.testing import assert_images_match, invoke, sibling_module

pipeline_tests = sibling_module(__file__, "test_controlnet_pipeline")
base = pipeline_tests.base
SIZE = base.SIZE
GENERATE = dict(width=SIZE[0], height=SIZE[1], steps=2, seed=3)


@pytest.fixture(scope="module")
def folders(tmp_path_factory, tiny_zimage):
    """The session's tiny Z-Image Turbo and a ControlNet (1.0 layout) for it."""
    root = tmp_path_factory.mktemp("zimage-control-fronts")
    pipeline_tests.make_controlnet(root / "net", pipeline_tests.UNION_1, 5)
    return tiny_zimage[0], root / "net"


@pytest.fixture(scope="module")
def python_image(folders):
    """What Python draws with a control image and scale 0.6: the other front ends must draw the same."""
    model, net = folders
    pipe = variant(turbo=True).pipeline(weights=model, dtype="float32", controlnet=net)
    return pipe.generate(
        "a house", control_image=pipeline_tests.control_picture(), control_scale=0.6, **GENERATE
    ).images[0]


def run_args(model, *more: str) -> list[str]:
    return [
        "run",
        "-m",
        "zimage-turbo",
        "--weights",
        str(model),
        "a house",
        "--size",
        f"{SIZE[0]}x{SIZE[1]}",
        "--steps",
        "2",
        "--seed",
        "3",
        "--dtype",
        "float32",
        *more,
    ]


def same(path, image) -> None:
    assert_images_match([Image.open(path).convert("RGB")], [image], max_diff=0)


def test_cli_run_records_and_replays_the_control(folders, python_image, tmp_path, monkeypatch):
    model, net = folders
    monkeypatch.chdir(tmp_path)
    pipeline_tests.control_picture().save("pose.png")
    result = invoke(
        *run_args(
            model, "--controlnet", str(net), "--control-image", "pose.png", "--control-scale", "0.6", "-o", "out.png"
        )
    )
    assert result.exit_code == 0, result.output
    same("out.png", python_image)
    meta = read_metadata("out.png")
    assert meta["options"] == {"control_image": "pose.png", "control_scale": 0.6}
    assert len(meta["inputs"]["pose.png"]) == 64 and meta["components"] == {"controlnet": str(net)}
    again = invoke("run", "--from", "out.png", "--weights", str(model), "--controlnet", str(net), "-o", "again.png")
    assert again.exit_code == 0, again.output
    same("again.png", python_image)
    # the PNG's ControlNet folder is never loaded from the PNG itself: without --controlnet, one line says why
    alone = invoke("run", "--from", "out.png", "--weights", str(model), "-o", "third.png")
    assert alone.exit_code == 1 and "made with --controlnet" in alone.output
    assert "control_image needs a ControlNet: load the model with --controlnet DIR" in alone.output
    assert "Traceback" not in alone.output and not (tmp_path / "third.png").exists()


def test_cli_refusals_are_one_line(folders, tmp_path, monkeypatch):
    model, net = folders
    monkeypatch.chdir(tmp_path)
    pipeline_tests.control_picture().save("pose.png")
    cases = [
        (
            ["run", "-m", "flux2-klein-4b", "x", "--controlnet", str(net)],
            "Model 'flux2-klein-4b' does not support --controlnet",
        ),
        (
            ["run", "-m", "flux2-klein-4b", "x", "--control-image", "pose.png"],
            "Model 'flux2-klein-4b' does not support --control-image.",
        ),
        (run_args(model, "--control-scale", "-1", "--control-image", "pose.png"), "--control-scale must be >= 0"),
        (run_args(model, "--controlnet", str(tmp_path / "nowhere")), "--controlnet"),
        (run_args(model, "--control-scale", "0.5"), "control_scale needs a control image"),
    ]
    for args, words in cases:
        result = invoke(*args)
        assert result.exit_code != 0 and words in result.output, (args, result.output)
        assert "Traceback" not in result.output


def test_batch_row_with_a_control_image(folders, python_image, tmp_path):
    from imagegen.batch import Defaults, LoadOptions, run_batch

    model, net = folders
    pipeline_tests.control_picture().save(tmp_path / "pose.png")
    row = {
        "id": "house",
        "prompt": "a house",
        "size": f"{SIZE[0]}x{SIZE[1]}",
        "steps": 2,
        "seed": 3,
        "options": {"control_image": "pose.png", "control_scale": 0.6},
    }  # relative to the prompts file
    (tmp_path / "rows.jsonl").write_text(json.dumps(row) + "\n")
    summary = run_batch(
        tmp_path / "rows.jsonl",
        tmp_path / "out",
        Defaults(model="zimage-turbo"),
        LoadOptions(weights=str(model), dtype="float32", controlnet=str(net)),
    )
    assert summary.done == 1 and summary.failed == 0
    same(tmp_path / "out" / "house.png", python_image)
    assert read_metadata(tmp_path / "out" / "house.png")["options"]["control_image"] == "pose.png"


class TinyZImage:
    """The tiny checkpoint as a served model (the server loads models by id, from their bundled weights)."""

    def __init__(self, model):
        self.model = model

    @imagegen.hookimpl
    def register_models(self, register):
        register(
            dataclasses.replace(
                variant(turbo=True),
                id="zimage-tiny",
                hf_repo=None,
                bundled_weights=self.model,
                default_dtype="float32",
                family_default=False,
            )
        )


def test_server_takes_the_control_image_as_an_upload(folders, python_image):
    import base64
    import io

    import httpx

    from imagegen.server.embedded import serve_in_thread

    model, net = folders
    plugins.register_plugin(TinyZImage(model), "tiny-zimage", "tiny-zimage", "0")
    try:
        pose = io.BytesIO()
        pipeline_tests.control_picture().save(pose, format="PNG")
        form = {
            "model": "zimage-tiny",
            "prompt": "a house",
            "size": f"{SIZE[0]}x{SIZE[1]}",
            "steps": "2",
            "seed": "3",
            "options": json.dumps({"control_scale": 0.6}),
        }
        with (
            serve_in_thread(models=["zimage-tiny"], controlnet=str(net)) as (url, _),
            httpx.Client(base_url=url, timeout=60) as http,
        ):
            upload = {"control_image": ("pose.png", pose.getvalue())}
            response = http.post("/v1/images/edits", data=form, files=upload)
            assert response.status_code == 200, response.text
            data = base64.b64decode(response.json()["data"][0]["b64_json"])
            image = Image.open(io.BytesIO(data))
            assert_images_match([image.convert("RGB")], [python_image], max_diff=0)
            assert json.loads(image.text["imagegen"])["options"]["control_image"] == "pose.png"
            named = http.post(
                "/v1/images/generations",
                json={"model": "zimage-tiny", "prompt": "x", "options": {"control_image": "/etc/passwd"}},
            )
            assert named.status_code == 400 and "cannot be given over HTTP" in named.text  # no server paths
        with pytest.raises(imagegen.InvalidOptionError, match="none of the served models"):
            with serve_in_thread(models=["flux2-demo"], controlnet=str(net)):
                pass
    finally:
        plugins.unregister_plugin("tiny-zimage")


# ---- canny ----------------------------------------------------------------------------------------------------
def test_canny_values():
    pytest.importorskip("cv2")
    assert canny_thresholds("50,150") == (50, 150) == canny_thresholds([50, 150])
    assert canny_thresholds(True) == (100, 200) == canny_thresholds("default")
    for bad in ("150,50", "1,2,3", "a,b", [True, 3], -1):
        with pytest.raises(imagegen.InvalidOptionError, match="canny must be LOW,HIGH thresholds"):
            canny_thresholds(bad)


def test_canny_without_opencv_says_how_to_install(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "cv2", None)  # import cv2 raises ImportError
    with pytest.raises(imagegen.InvalidOptionError, match=r'canny needs OpenCV: pip install "imagegen-zimage\[canny'):
        canny_thresholds("50,150")


def test_canny_steers_with_the_edges_and_replays(folders, tmp_path, monkeypatch):
    cv2 = pytest.importorskip("cv2")
    model, net = folders
    monkeypatch.chdir(tmp_path)
    photo = base.picture(4)
    photo.save("photo.png")
    result = invoke(
        *run_args(
            model, "--controlnet", str(net), "--control-image", "photo.png", "--canny", "20,60", "-o", "edges.png"
        )
    )
    assert result.exit_code == 0, result.output
    edges = cv2.Canny(np.asarray(photo), 20, 60)
    assert 0 < (edges > 0).mean() < 0.5  # a real edge map
    pipe = variant(turbo=True).pipeline(weights=model, dtype="float32", controlnet=net)
    by_hand = pipe.generate("a house", control_image=Image.fromarray(np.dstack([edges] * 3)), **GENERATE).images[0]
    same("edges.png", by_hand)  # --canny is the edges of the control image, as diffusers' docs prepare them
    meta = read_metadata("edges.png")
    assert meta["options"] == {"control_image": "photo.png", "canny": [20, 60]}
    again = invoke("run", "--from", "edges.png", "--weights", str(model), "--controlnet", str(net), "-o", "again.png")
    assert again.exit_code == 0, again.output
    same("again.png", by_hand)


def test_cli_memory_estimate_counts_the_controlnet(folders, tmp_path, monkeypatch):
    from imagegen.cli import generate
    from imagegen.memory import weight_bytes

    model, net = folders
    monkeypatch.chdir(tmp_path)
    estimates = []
    monkeypatch.setattr(generate, "preflight", lambda needed, *rest: estimates.append(needed))
    for extra in ([], ["--controlnet", str(net)]):
        assert invoke(*run_args(model, "--steps", "1", *extra)).exit_code == 0
    assert estimates[1] - estimates[0] == weight_bytes(net, "float32", None, quantized=True) > 0
