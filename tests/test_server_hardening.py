"""`imagegen serve` under hostile or careless use (issue 18, server items): each test reproduces one way the
server was found to break, with the bundled demo model (flux2-demo, 128x128 on the CPU)."""

from __future__ import annotations

import dataclasses
import gc
import hashlib
import io
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
from imagegen_flux2.plugin import demo
from PIL import Image, ImageFile

import imagegen
from imagegen import plugins
from imagegen.image import METADATA_KEY
from imagegen.options import image_ref
from imagegen.server.embedded import serve_in_thread as running

ENCODES: list[str] = []  # prompts the slow-loading demo encoded
SLOW_LOAD_SECONDS = 1.5


# ---- variants of the demo model -------------------------------------------------------------
def slow_load(spec: imagegen.ModelSpec, weights, **kwargs):
    """The demo, loading slowly, and noting every prompt it starts to encode."""
    time.sleep(SLOW_LOAD_SECONDS)
    pipe = spec.extra["real_load"](spec, weights, **kwargs)
    encode = pipe.encode

    def noted(request):
        ENCODES.extend(request.prompts)
        return encode(request)

    pipe.encode = noted
    return pipe


class DemoVariants:
    def __init__(self, broken_weights: Path):
        self.broken_weights = broken_weights

    @imagegen.hookimpl
    def register_models(self, register) -> None:
        base = demo()
        register(
            dataclasses.replace(
                base, id="flux2-demo-slowload", load=slow_load, extra={**base.extra, "real_load": base.load}
            )
        )
        register(dataclasses.replace(base, id="flux2-demo-elsewhere", bundled_weights=self.broken_weights))
        # the demo cannot edit and draws 128x128 only; the upload tests need a model that takes images
        register(
            dataclasses.replace(
                base,
                id="flux2-demo-edit",
                tasks=(imagegen.TEXT_TO_IMAGE, imagegen.IMAGE_EDIT),
                options=base.options | {"images"},
                max_pixels=512 * 512,
            )
        )


@pytest.fixture(scope="module", autouse=True)
def demo_variants(tmp_path_factory):
    folder = tmp_path_factory.mktemp("private-server-folder") / "weights"
    folder.mkdir()  # exists, but holds no model_index.json
    plugins.register_plugin(DemoVariants(folder), "demo-variants", "imagegen-demo-variants-test", "0.0.1")
    yield folder
    plugins.unregister_plugin("demo-variants")


# ---- servers ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def server():
    with running(models=["flux2-demo"], keep_alive=-1) as served:
        yield served


@pytest.fixture(scope="module")
def http(server) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server[0], timeout=60) as client:
        yield client


@contextmanager
def device_held(app) -> Iterator[threading.Event]:
    """A job that holds the device until the event is set: requests queue up behind it."""
    gate, started = threading.Event(), threading.Event()
    app.state.service.worker.submit("holder", lambda job: (started.set(), gate.wait(30)))
    assert started.wait(10)
    try:
        yield gate
    finally:
        gate.set()


def png_bytes(size: tuple[int, int], mode: str = "RGB") -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, size).save(buffer, format="PNG")
    return buffer.getvalue()


def error_of(response: httpx.Response, status: int, code: str, param: str | None = None) -> str:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == code, error
    if param is not None:
        assert error["param"] == param, error
    return error["message"]


def wait_for(condition, seconds: float = 10) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


# ---- 1. uploads: a pixel budget read from the header -----------------------------------------
def test_an_upload_too_large_to_decode_is_refused_from_its_header(http, monkeypatch):
    bomb = png_bytes((12000, 12000), mode="1")  # a ~20 KB file that decodes to 432 MB of RGB
    assert len(bomb) < 100_000
    decoded: list[tuple[int, int]] = []
    real_load = ImageFile.ImageFile.load
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda img: decoded.append(img.size) or real_load(img))
    start = time.monotonic()
    response = http.post(
        "/v1/images/edits",
        data={"model": "flux2-demo", "prompt": "a red circle"},
        files={"image": ("bomb.png", bomb, "image/png")},
    )
    message = error_of(response, 400, "invalid_image", "image")
    assert "12000x12000" in message and "bomb.png" in message
    assert decoded == [] and time.monotonic() - start < 5


def test_an_accepted_upload_is_scaled_to_the_models_working_size():
    from imagegen.server.uploads import decode

    spec = imagegen.registry.get("flux2-demo-edit")  # max_pixels 512x512; uploads up to 4x that are accepted
    wide = png_bytes((2048, 256))
    upload = decode(wide, "wide.png", 0, spec)  # twice the budget's pixels: scaled by 1/sqrt(2)
    assert upload.size == (1448, 181) and upload.mode == "RGB" and 1448 * 181 <= spec.max_pixels
    assert image_ref(upload) == {"name": "wide.png", "sha256": hashlib.sha256(wide).hexdigest()}
    assert decode(png_bytes((200, 100)), "small.png", 0, spec).size == (200, 100)  # within the budget: untouched


# ---- 2. the prompt length --------------------------------------------------------------------
def test_a_huge_prompt_is_refused_before_it_queues(http, server):
    done = http.get("/health").json()["queue"]["done"]
    response = http.post("/v1/images/generations", json={"model": "flux2-demo", "prompt": "a red circle " * 700_000})
    assert "4096" in error_of(response, 400, "prompt_too_long", "prompt")
    assert http.get("/health").json()["queue"]["done"] == done


# ---- 3. cancellation outside the denoise loop ------------------------------------------------
def test_a_client_that_leaves_during_the_model_load_stops_its_job(caplog):
    caplog.set_level(logging.ERROR, logger="asyncio")
    with running(keep_alive=0) as (url, app):
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(
                f"{url}/v1/images/generations",
                timeout=0.3,
                json={"model": "flux2-demo-slowload", "prompt": "abandoned while loading", "steps": 1},
            )
        counts = app.state.service.worker.counts
        wait_for(lambda: counts["cancelled"] == 1)
        assert counts["done"] == 0 and "abandoned while loading" not in ENCODES
    gc.collect()
    assert not [r for r in caplog.records if "never retrieved" in r.getMessage()]


# ---- 4. graceful shutdown --------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "imagegen", "serve", *args]


def sse_events(text: str) -> list[tuple[str, dict]]:
    events = []
    for block in text.strip().split("\n\n"):
        lines = dict(line.split(": ", 1) for line in block.splitlines())
        events.append((lines["event"], json.loads(lines["data"])))
    return events


def test_sigterm_drains_in_flight_requests_then_answers_the_rest_with_errors():
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        serve_command("--model", "flux2-demo", "--port", str(port), "--grace", "10s"),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )
    try:
        wait_for(lambda: proc.poll() is None and _loaded(url), 60)
        quick = {"model": "flux2-demo", "prompt": "a red circle", "steps": 4, "size": "64x64", "seed": 1}
        slow = {"model": "flux2-demo", "prompt": "a blue square", "steps": 200, "size": "64x64"}
        before = _accepted(url)  # the preload counts as a job done
        with ThreadPoolExecutor(3) as pool:
            answers = []
            for body in (quick, {**slow, "stream": True}, slow):  # one at a time, each seen by the server
                answers.append(pool.submit(httpx.post, f"{url}/v1/images/generations", json=body, timeout=60))
                wait_for(lambda: _accepted(url) == before + len(answers))
            proc.send_signal(signal.SIGTERM)
            time.sleep(0.5)
            with pytest.raises(httpx.ConnectError):  # no new connections once draining
                httpx.get(f"{url}/health", timeout=2)
            finishing, streaming, waiting = answers
            finished, streamed, refused = finishing.result(), streaming.result(), waiting.result()
        output, _ = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert finished.status_code == 200, output  # done within the grace period
    error_of(refused, 503, "server_shutting_down")  # still queued when the grace ran out
    events = sse_events(streamed.text)
    assert events[0][0] == "image_generation.queued"
    assert events[-1][0] == "error" and events[-1][1]["error"]["code"] == "server_shutting_down", output
    assert proc.returncode in (0, -signal.SIGTERM), output
    assert "Traceback" not in output and "never retrieved" not in output, output


def _accepted(url: str) -> int:
    queue = httpx.get(f"{url}/health", timeout=5).json()["queue"]
    return queue["waiting"] + queue["running"] + queue["done"]


def _loaded(url: str) -> bool:
    try:
        return bool(httpx.get(f"{url}/health", timeout=1).json()["loaded"])
    except httpx.TransportError:
        return False


# ---- 5. strict types -------------------------------------------------------------------------
STRICT = [
    ("n as text", b'{"prompt": "a red circle", "n": "2"}', "n", "invalid_value"),
    ("n as a boolean", b'{"prompt": "a red circle", "n": true}', "n", "invalid_value"),
    ("stream as text", b'{"prompt": "a red circle", "stream": "yes"}', "stream", "invalid_value"),
    ("fullwidth digits", '{"prompt": "a red circle", "size": "１２８x１２８"}'.encode(), "size", "invalid_value"),
    ("Infinity", b'{"prompt": "a red circle", "steps": 2, "guidance": Infinity}', None, "invalid_json"),
    ("a float overflow", b'{"prompt": "a red circle", "guidance": 1e999}', "guidance", "invalid_value"),
    ("whitespace prompt", b'{"prompt": " \\t\\n "}', "prompt", "invalid_value"),
    ("duplicate keys", b'{"prompt": "a red circle", "n": 1, "n": 4}', "n", "duplicate_key"),
    (
        "partial_images without stream",
        b'{"prompt": "a red circle", "partial_images": 2}',
        "partial_images",
        "invalid_value",
    ),
    ("empty body", b"", None, "missing_body"),
    ("deep nesting", b"[" * 100_000, None, "invalid_json"),
]


@pytest.mark.parametrize("body,param,code", [c[1:] for c in STRICT], ids=[c[0] for c in STRICT])
def test_loose_json_is_refused_with_a_code(http, body, param, code):
    response = http.post("/v1/images/generations", content=body, headers={"Content-Type": "application/json"})
    error_of(response, 400, code, param)


def test_form_fields_are_read_as_strictly(http):
    image = {"image": ("ref.png", png_bytes((128, 128)), "image/png")}
    for field, value in (("n", "２"), ("stream", "yes"), ("steps", "2.0"), ("seed", " 7")):
        response = http.post("/v1/images/edits", files=image, data={"prompt": "a red circle", field: value})
        error_of(response, 400, "invalid_value", field)
    error_of(
        http.post("/v1/images/generations", content=b'{"prompt": "x"}', headers={"Content-Type": "text/plain"}),
        400,
        "invalid_content_type",
    )


# ---- 6. the Authorization header -------------------------------------------------------------
def test_bearer_scheme_in_any_case_and_one_authorization_header_only():
    with running(api_key="s3cret") as (url, _):
        for scheme in ("Bearer", "bearer", "BEARER"):
            assert httpx.get(f"{url}/health", headers={"Authorization": f"{scheme} s3cret"}).status_code == 200
        error_of(httpx.get(f"{url}/health", headers={"Authorization": "Basic s3cret"}), 401, "invalid_api_key")
        twice = [("Authorization", "Bearer s3cret"), ("Authorization", "Bearer other")]
        error_of(httpx.get(f"{url}/health", headers=twice), 400, "invalid_authorization")


# ---- 7. fairness per client address ----------------------------------------------------------
def client_at(url: str, address: str) -> httpx.Client:
    return httpx.Client(base_url=url, timeout=60, transport=httpx.HTTPTransport(local_address=address))


def test_clients_take_turns_by_address_whatever_user_they_claim(server, monkeypatch):
    url, app = server
    service = app.state.service
    order: list[str] = []
    real_run = service._run

    def noting_run(plan, job, emit):
        order.append(plan.request.prompts[0])
        return real_run(plan, job, emit)

    monkeypatch.setattr(service, "_run", noting_run)
    body = {"model": "flux2-demo", "steps": 1, "size": "64x64", "seed": 3}
    with (
        device_held(app) as gate,
        client_at(url, "127.0.0.1") as busy,
        client_at(url, "127.0.0.2") as other,
        ThreadPoolExecutor(4) as pool,
    ):
        answers = []
        for client, user in ((busy, "a"), (busy, "b"), (busy, "c"), (other, "d")):  # in this order
            who = "busy" if client is busy else "other"
            answers.append(
                pool.submit(
                    client.post, "/v1/images/generations", json={**body, "prompt": f"{who} {user}", "user": user}
                )
            )
            wait_for(lambda: len(service.worker.queue) == len(answers))
        gate.set()
        assert all(a.result().status_code == 200 for a in answers)
    assert order == ["busy a", "other d", "busy b", "busy c"]


def test_one_client_may_hold_only_its_share_of_the_queue():
    with (
        running(max_queue=4, max_queue_per_client=2, keep_alive=-1) as (url, app),
        device_held(app),
        client_at(url, "127.0.0.1") as busy,
        client_at(url, "127.0.0.2") as other,
        ThreadPoolExecutor(2) as pool,
    ):
        body = {"model": "flux2-demo", "prompt": "a red circle", "steps": 1}
        for user in ("a", "b"):
            pool.submit(busy.post, "/v1/images/generations", json={**body, "user": user}, timeout=1)
        wait_for(lambda: len(app.state.service.worker.queue) == 2)
        error_of(busy.post("/v1/images/generations", json={**body, "user": "c"}), 429, "client_queue_full")
        error_of(other.post("/v1/images/generations", json={**body, "n": 99}), 400, "invalid_value", "n")


def test_an_abandoned_request_frees_its_queue_slot_at_once(caplog):
    caplog.set_level(logging.ERROR, logger="asyncio")
    with running(max_queue=1, keep_alive=-1) as (url, app), device_held(app):
        queue = app.state.service.worker.queue
        body = {"model": "flux2-demo", "prompt": "a red circle", "steps": 1, "size": "64x64"}
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{url}/v1/images/generations", json=body, timeout=0.3)
        wait_for(lambda: len(queue) == 0, 2)  # gone while the device is still busy
        with ThreadPoolExecutor(1) as pool:
            accepted = pool.submit(httpx.post, f"{url}/v1/images/generations", json=body, timeout=0.5)
            with pytest.raises(httpx.ReadTimeout):  # queued (not refused with 429), then abandoned too
                accepted.result()
    gc.collect()
    assert not [r for r in caplog.records if "never retrieved" in r.getMessage()]


# ---- 8. no server paths in error messages ----------------------------------------------------
def test_error_messages_do_not_reveal_server_paths(http, demo_variants, caplog):
    caplog.set_level(logging.INFO, logger="imagegen.server")
    response = http.post("/v1/images/generations", json={"model": "flux2-demo-elsewhere", "prompt": "a red circle"})
    message = error_of(response, 400, "model_not_available", "model")
    assert "is not a FLUX.2 diffusers folder" in message
    assert str(demo_variants.parent) not in message and "private-server-folder" not in message
    assert any(str(demo_variants) in r.getMessage() for r in caplog.records)  # the log keeps the path


# ---- 9. `imagegen serve` refuses bad settings before loading a model -------------------------
def test_serve_command_reports_bad_ports_and_memory_in_one_line():
    bad_port = subprocess.run(serve_command("--port", "99999"), capture_output=True, text=True, timeout=60)
    assert bad_port.returncode == 1 and bad_port.stderr.strip().splitlines() == [
        "Error: --port must be between 1 and 65535, got 99999."
    ]
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        in_use = subprocess.run(
            serve_command("--model", "flux2-demo", "--port", str(port)), capture_output=True, text=True, timeout=60
        )
    lines = in_use.stderr.strip().splitlines()
    assert in_use.returncode == 1 and len(lines) == 1 and "already in use" in lines[0], in_use.stderr
    small = subprocess.run(
        serve_command("--model", "flux2-demo", "--max-memory", "1MB", "--port", str(free_port())),
        capture_output=True,
        text=True,
        timeout=60,
    )
    lines = small.stderr.strip().splitlines()
    assert small.returncode == 1 and len(lines) == 1, small.stderr
    assert "--max-memory" in lines[0] and "flux2-demo" in lines[0] and "1.0 MB" in lines[0]
    with running(max_memory="1MB") as (url, _):  # models loaded on demand: the request is refused instead
        response = httpx.post(f"{url}/v1/images/generations", json={"model": "flux2-demo", "prompt": "a red circle"})
        assert "--max-memory" in error_of(response, 400, "insufficient_memory", "model")


# ---- 16. uploads are recorded by content hash and file name ----------------------------------
def test_an_uploads_name_is_recorded_without_its_path(http):
    reference = png_bytes((128, 128))
    response = http.post(
        "/v1/images/edits",
        data={"model": "flux2-demo-edit", "prompt": "a red circle", "steps": "1", "size": "64x64"},
        files={"image": ("../../home/someone/\x1b[31mref.png", reference, "image/png")},
    )
    assert response.status_code == 200, response.text
    image = Image.open(io.BytesIO(__import__("base64").b64decode(response.json()["data"][0]["b64_json"])))
    metadata = json.loads(image.text[METADATA_KEY])
    assert metadata["images"] == ["[31mref.png"]
    assert metadata["inputs"] == {"[31mref.png": hashlib.sha256(reference).hexdigest()}
