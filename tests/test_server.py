"""`imagegen serve`: the real server (uvicorn on a loopback port) driven by httpx and the openai client.

The models come from an in-process test plugin whose pipelines paint prompt-hash colours with a few
cheap "denoising" steps: real imagegen.Pipeline subclasses, timed, so the tests can check what ran.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import statistics
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import httpx
import mlx.core as mx
import mlx.nn as nn
import numpy as np
import openai
import pytest
from PIL import Image

import imagegen
from imagegen import plugins
from imagegen.image import METADATA_KEY, from_pil, to_pil
from imagegen.server import require_serve_extra
from imagegen.server.embedded import serve_in_thread as serve
from imagegen.server.worker import FairQueue, Job

RUNS: list[dict] = []  # every finished pipeline call: model, prompts, batch, start, end
RUNS_LOCK = threading.Lock()
LOADS: list[str] = []


# ---- the test plugin: a tiny real pipeline --------------------------------------------------
def prompt_colour(prompt: str) -> mx.array:
    digest = hashlib.sha256(prompt.encode()).digest()
    return mx.array([b / 127.5 - 1 for b in digest[:3]])


class PaintPipeline(imagegen.Pipeline):
    """Latents are an RGB image at 1/8 size; each step moves them towards the prompt's colour (or,
    for edits, towards the reference image tinted by the prompt); decode upsamples 8x."""

    def __init__(self, spec: imagegen.ModelSpec, weights=None, dtype: str = "float32", quantize: str | None = None):
        super().__init__(spec, weights, dtype, quantize)
        self.mixer = nn.Linear(3, 3)  # a real module: the residency counts its parameters
        self.mixer.weight = mx.eye(3)
        self.mixer.bias = mx.zeros((3,))
        self.started = 0.0

    def encode(self, request: imagegen.Request) -> mx.array:
        self.started = time.perf_counter()
        target = mx.stack([prompt_colour(p) for p in request.prompts])[:, None, None, :]  # [B, 1, 1, 3]
        if request.images:
            size = (request.width // 8, request.height // 8)
            refs = mx.concatenate([from_pil(i.resize(size)) for i in request.images])
            target = 0.25 * target + 0.75 * mx.mean(refs, axis=0, keepdims=True)
        return target

    def prepare_latents(self, request: imagegen.Request) -> mx.array:
        shape = (request.batch_size, request.height // 8, request.width // 8, 3)
        return request.draws().latents(shape) * 0.5

    def denoise_steps(self, request: imagegen.Request, target: mx.array, latents: mx.array) -> Iterator[mx.array]:
        if self.spec.extra.get("broken"):
            raise RuntimeError("the paint ran dry")
        init, keep = self.init_latents(request)
        for i in range(request.first_step, request.steps):
            time.sleep(self.spec.extra.get("delay", 0.0))
            latents = self.mixer(latents + (target - latents) / (request.steps - i + 1))  # keeps some noise
            if init is not None:  # repaint: the mask's black part stays the init image
                latents = keep * init + (1 - keep) * latents
            yield latents

    def init_latents(self, request: imagegen.Request) -> tuple[mx.array | None, mx.array | None]:
        if request.init is None:
            return None, None
        size = (request.width // 8, request.height // 8)
        init = from_pil(request.init.image.resize(size))
        if request.init.mask is None:
            return init, mx.zeros((1, size[1], size[0], 1))
        mask = np.asarray(request.init.mask.convert("L").resize(size), np.float32) / 255
        return init, mx.array(1 - mask)[None, :, :, None]

    def decode(self, request: imagegen.Request, latents: mx.array) -> list[Image.Image]:
        images = to_pil(mx.repeat(mx.repeat(latents, 8, axis=1), 8, axis=2))
        if len(images) == request.batch_size:  # a final decode, not a streamed preview
            with RUNS_LOCK:
                RUNS.append(
                    {
                        "model": self.spec.id,
                        "prompts": request.prompts,
                        "batch": request.batch_size,
                        "start": self.started,
                        "end": time.perf_counter(),
                    }
                )
        return images


def load(spec: imagegen.ModelSpec, weights, dtype: str, quantize: str | None = None, **_) -> PaintPipeline:
    LOADS.append(spec.id)
    return PaintPipeline(spec, weights, dtype, quantize)


def estimate_memory(spec, weights, dtype, quantize, width: int, height: int, batch: int) -> int:
    """Peak bytes: the mixer's 48 bytes of weights + 4 bytes per output pixel."""
    return 48 + width * height * batch * 4


def paint_spec(id: str, **fields) -> imagegen.ModelSpec:
    defaults = dict(
        family="paint",
        load=load,
        needs_weights=False,
        default_steps=3,
        default_size=(64, 64),
        size_multiple=8,
        max_pixels=256 * 256,
        default_dtype="float32",
        estimate_memory=estimate_memory,
    )
    return imagegen.ModelSpec(id=id, **{**defaults, **fields})


class PaintPlugin:
    @imagegen.hookimpl
    def register_models(self, register) -> None:
        register(
            paint_spec(
                "paint-small",
                aliases=("paint",),
                family_default=True,
                options=frozenset({"guidance"}),
                default_guidance=1.0,
                quantize_modes=("8",),
            )
        )
        register(
            paint_spec(
                "paint-edit",
                tasks=(imagegen.TEXT_TO_IMAGE, imagegen.IMAGE_EDIT),
                options=frozenset({"images", "negative_prompt", "init_image", "mask", "strength"}),
            )
        )
        register(paint_spec("paint-slow", extra={"delay": 0.03}))
        register(paint_spec("paint-broken", extra={"broken": True}))


# ---- the server ----------------------------------------------------------------------------
@pytest.fixture(scope="module", autouse=True)
def paint_plugin():
    plugins.register_plugin(PaintPlugin(), "paint", "imagegen-paint-test", "0.0.1")
    yield
    plugins.unregister_plugin("paint")


@pytest.fixture(scope="module")
def server():
    with serve(models=["paint"], keep_alive="5m") as (url, app):
        yield url, app


@pytest.fixture(scope="module")
def url(server) -> str:
    return server[0]


@pytest.fixture(scope="module")
def http(url) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=url, timeout=30) as client:
        yield client


@pytest.fixture(scope="module")
def client(url) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)


def png(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


def b64_image(b64: str) -> Image.Image:
    return png(base64.b64decode(b64))


def upload(colour: tuple[int, int, int], size=(64, 64)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, format="PNG")
    return buffer.getvalue()


def assert_error(response: httpx.Response, status: int, param: str | None = None, code: str | None = None) -> str:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    if param is not None:
        assert error["param"] == param, error
    if code is not None:
        assert error["code"] == code, error
    return error["message"]


# ---- generations ---------------------------------------------------------------------------
def test_generation_b64_is_reproducible_png_with_metadata(http):
    body = {"model": "paint", "prompt": "a red fox", "size": "64x48", "seed": 7, "steps": 4, "guidance": 2.0}
    first = http.post("/v1/images/generations", json=body)
    assert first.status_code == 200, first.text
    out = first.json()
    assert out["model"] == "paint-small" and out["size"] == "64x48" and len(out["data"]) == 1
    image = b64_image(out["data"][0]["b64_json"])
    assert image.size == (64, 48) and out["data"][0]["seed"] == 7
    meta = json.loads(image.text[METADATA_KEY])
    assert (meta["prompt"], meta["seed"], meta["steps"], meta["guidance"], meta["model"]) == (
        "a red fox",
        7,
        4,
        2.0,
        "paint-small",
    )
    again = b64_image(http.post("/v1/images/generations", json=body).json()["data"][0]["b64_json"])
    other = b64_image(http.post("/v1/images/generations", json={**body, "seed": 8}).json()["data"][0]["b64_json"])
    assert np.array_equal(np.asarray(image), np.asarray(again))
    assert not np.array_equal(np.asarray(image), np.asarray(other))


def test_openai_client_generates_batch_and_urls(client, http, server):
    result = client.images.generate(model="paint-small", prompt="two moons", n=2, size="48x32", extra_body={"seed": 11})
    assert [d.seed for d in result.data] == [11, 12]
    images = [b64_image(d.b64_json) for d in result.data]
    assert all(i.size == (48, 32) for i in images)
    assert not np.array_equal(np.asarray(images[0]), np.asarray(images[1]))
    assert RUNS[-1]["batch"] == 2  # n=2 ran as one batched pipeline call

    linked = client.images.generate(
        model="paint", prompt="two moons", size="48x32", response_format="url", extra_body={"seed": 12}
    )
    assert linked.data[0].url.startswith(server[0] + "/v1/files/images/")
    fetched = httpx.get(linked.data[0].url)
    assert fetched.status_code == 200 and fetched.headers["content-type"] == "image/png"
    assert np.array_equal(np.asarray(png(fetched.content)), np.asarray(images[1]))  # seed 12 = image 1 above
    assert_error(http.get("/v1/files/images/nope.png"), 404, code="not_found")


def test_batches_split_when_limited_keep_the_seeds(client):
    with serve(max_batch=2, keep_alive=-1) as (url, _):
        limited = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0)
        before = len(RUNS)
        split = limited.images.generate(model="paint", prompt="three stars", n=3, extra_body={"seed": 5})
        assert [r["batch"] for r in RUNS[before:]] == [2, 1]
    whole = client.images.generate(model="paint", prompt="three stars", n=3, extra_body={"seed": 5})
    assert RUNS[-1]["batch"] == 3
    for a, b in zip(split.data, whole.data):
        assert np.array_equal(np.asarray(b64_image(a.b64_json)), np.asarray(b64_image(b.b64_json)))


# ---- edits ---------------------------------------------------------------------------------
def test_edits_follow_the_uploaded_images(client, http):
    files = [("a.png", upload((0, 0, 255))), ("b.png", upload((0, 0, 200)))]
    blue = client.images.edit(model="paint-edit", image=files, prompt="make it pop", size="64x64")
    pixel = np.asarray(b64_image(blue.data[0].b64_json)).reshape(-1, 3).mean(axis=0)
    assert pixel[2] > pixel[0] + 60 and pixel[2] > pixel[1] + 60  # mostly the images' blue

    red = http.post(
        "/v1/images/edits",
        files={"image": ("../up/r.png", upload((255, 0, 0)), "image/png")},
        data={"model": "paint-edit", "prompt": "make it pop", "n": "2", "seed": "3", "negative_prompt": "green"},
    )
    assert red.status_code == 200, red.text
    images = [b64_image(d["b64_json"]) for d in red.json()["data"]]
    assert len(images) == 2 and images[0].size == (64, 64)
    pixel = np.asarray(images[0]).reshape(-1, 3).mean(axis=0)
    assert pixel[0] > pixel[2] + 60
    meta = json.loads(images[0].text[METADATA_KEY])  # the upload's bare name and content hash, never a path
    assert meta["images"] == ["r.png"] and len(meta["inputs"]["r.png"]) == 64

    message = assert_error(
        http.post(
            "/v1/images/edits",
            files={"image": ("r.png", upload((9, 9, 9)))},
            data={"model": "paint-small", "prompt": "x"},
        ),
        400,
        "model",
        "model_not_supported",
    )
    assert "paint-small" in message and "paint-edit" in message


def rgba_mask(size=(64, 64)) -> bytes:
    """OpenAI's mask: the left half fully transparent (edit there), the right half opaque (keep)."""
    alpha = np.full((size[1], size[0]), 255, np.uint8)
    alpha[:, : size[0] // 2] = 0
    buffer = io.BytesIO()
    Image.fromarray(np.dstack([np.zeros((size[1], size[0], 3), np.uint8), alpha])).save(buffer, format="PNG")
    return buffer.getvalue()


def test_edits_with_mask_repaint_only_the_transparent_part(http):
    green = upload((0, 200, 0))
    response = http.post(
        "/v1/images/edits",
        files=[("image", ("photo.png", green)), ("mask", ("m.png", rgba_mask()))],
        data={
            "model": "paint-edit",
            "prompt": "make it pop",
            "seed": "5",
            "n": "2",
            "noise": "torch",
            "strength": "0.5",
            "steps": "4",
        },
    )
    assert response.status_code == 200, response.text
    images = [b64_image(d["b64_json"]) for d in response.json()["data"]]
    pixels = np.asarray(images[0]).astype(int)
    assert np.abs(pixels[:, 40:] - (0, 200, 0)).max() <= 1  # kept: the opaque half
    assert np.abs(pixels[:, :24] - (0, 200, 0)).max() > 60  # repainted: the transparent half
    metas = [json.loads(image.text[METADATA_KEY]) for image in images]
    assert (metas[0]["init_image"], metas[0]["mask"], metas[0]["images"]) == ("photo.png", "m.png", [])
    assert metas[0]["inputs"]["photo.png"] == hashlib.sha256(green).hexdigest() and "m.png" in metas[0]["inputs"]
    assert [(m["noise"], m["seed"], m["strength"], m["noise_slot"]) for m in metas] == [
        ("torch", 5, 0.5, [0, 2]),
        ("torch", 5, 0.5, [1, 2]),
    ]
    alone = http.post(
        "/v1/images/edits",
        files=[("image", ("photo.png", green))],
        data={"model": "paint-edit", "prompt": "make it pop", "strength": "0.5", "steps": "4"},
    )
    assert np.abs(np.asarray(b64_image(alone.json()["data"][0]["b64_json"])).astype(int) - (0, 200, 0)).max() > 60
    opaque = upload((0, 0, 0))
    assert_error(
        http.post(
            "/v1/images/edits",
            files=[("image", ("p.png", green)), ("mask", ("m.png", opaque))],
            data={"model": "paint-edit", "prompt": "x"},
        ),
        400,
        "mask",
        "invalid_image",
    )
    assert_error(
        http.post(
            "/v1/images/edits",
            files=[("image", ("p.png", green))],
            data={"model": "paint-edit", "prompt": "x", "strength": "1.5"},
        ),
        400,
        "strength",
    )
    assert_error(
        http.post("/v1/images/generations", json={"model": "paint", "prompt": "x", "noise": "cuda"}), 400, "noise"
    )


# ---- streaming -----------------------------------------------------------------------------
def read_events(response: httpx.Response) -> list[tuple[str, dict]]:
    events = []
    for block in response.text.strip().split("\n\n"):
        lines = dict(line.split(": ", 1) for line in block.splitlines())
        events.append((lines["event"], json.loads(lines["data"])))
    return events


def test_stream_sends_progress_partials_then_images(http, client):
    body = {
        "model": "paint",
        "prompt": "a comet",
        "stream": True,
        "steps": 4,
        "n": 2,
        "partial_images": 1,
        "size": "32x32",
        "seed": 1,
    }
    response = http.post("/v1/images/generations", json=body)
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
    events = read_events(response)
    names = [name for name, _ in events]
    assert names[0] == "image_generation.queued" and names[-2:] == ["image_generation.completed"] * 2
    steps = [d["step"] for n, d in events if n == "image_generation.progress" and d["stage"] == "denoise"]
    assert steps == [1, 2, 3, 4]
    partials = [d for n, d in events if n == "image_generation.partial_image"]
    assert [p["image_index"] for p in partials] == [0, 1]
    done = [d for n, d in events if n == "image_generation.completed"]
    assert [d["seed"] for d in done] == [1, 2]
    # against the same run in Python: one partial of 4 steps is the latents after step 2 decoded; the completed
    # images are the final ones
    pipe = PaintPipeline(imagegen.registry.get("paint"))
    run = pipe.run("a comet", width=32, height=32, steps=4, seed=1, num_images=2)
    halfway = [s.latents for s in run if s.stage == "denoise" and s.index == 2][0]
    for i in range(2):
        preview = pipe.decode(run.result.request, halfway[i : i + 1])[0]
        assert np.array_equal(np.asarray(b64_image(partials[i]["b64_json"])), np.asarray(preview))
        assert np.array_equal(np.asarray(b64_image(done[i]["b64_json"])), np.asarray(run.result.images[i]))
        assert not np.array_equal(np.asarray(preview), np.asarray(run.result.images[i]))

    stream = client.images.generate(
        model="paint", prompt="a comet", size="32x32", stream=True, extra_body={"seed": 1, "steps": 4}
    )
    types = [event.type for event in stream]
    assert types[-1] == "image_generation.completed" and "image_generation.progress" in types

    edit = client.images.edit(model="paint-edit", image=("e.png", upload((0, 255, 0))), prompt="x", stream=True)
    assert [e.type for e in edit][-1] == "image_edit.completed"


def test_stream_reports_a_failed_generation_as_an_error_event(http, client):
    events = read_events(
        http.post("/v1/images/generations", json={"model": "paint-broken", "prompt": "x", "stream": True})
    )
    assert events[-1][0] == "error" and "the paint ran dry" in events[-1][1]["error"]["message"]
    with pytest.raises(openai.APIError, match="the paint ran dry"):
        list(client.images.generate(model="paint-broken", prompt="x", stream=True))


# ---- the device queue ----------------------------------------------------------------------
def test_concurrent_requests_run_one_at_a_time(url):
    bodies = [
        {"model": m, "prompt": f"queued {i}", "steps": 3}
        for i, m in enumerate(["paint-slow", "paint", "paint-edit"] * 3)
    ]
    before = len(RUNS)
    with httpx.Client(base_url=url, timeout=30) as c, ThreadPoolExecutor(len(bodies)) as pool:
        answers = list(pool.map(lambda b: c.post("/v1/images/generations", json=b), bodies))
    assert all(a.status_code == 200 for a in answers), [a.text for a in answers]
    runs = sorted(RUNS[before:], key=lambda r: r["start"])
    assert len(runs) == len(bodies)
    for a, b in zip(runs, runs[1:]):
        assert a["end"] <= b["start"], f"{a['model']} and {b['model']} overlapped on the device"


def test_fair_queue_round_robins_clients_fifo_within_each():
    queue = FairQueue()
    names = {}
    for client, n in (("alice", 3), ("bob", 2), ("carol", 1)):
        for i in range(n):
            job = Job(client, lambda job: None)
            names[job] = f"{client}{i}"
            queue.put(job)
    order = [names[queue.get(timeout=0)] for _ in range(6)]
    assert order == ["alice0", "bob0", "carol0", "alice1", "bob1", "alice2"]
    assert queue.get(timeout=0) is None


def test_a_client_that_leaves_is_dropped_from_the_device(url, http):
    cancelled = http.get("/health").json()["queue"]["cancelled"]
    with httpx.Client(base_url=url, timeout=30) as c, ThreadPoolExecutor(1) as pool:
        busy = pool.submit(
            c.post, "/v1/images/generations", json={"model": "paint-slow", "prompt": "busy", "steps": 10}
        )
        time.sleep(0.1)
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(
                f"{url}/v1/images/generations",
                timeout=0.2,
                json={"model": "paint-slow", "prompt": "abandoned", "steps": 40},
            )
        assert busy.result().status_code == 200
    time.sleep(1.5)  # longer than the server's disconnect poll
    assert not [r for r in RUNS if r["prompts"][0] == "abandoned"]
    assert http.get("/health").json()["queue"]["cancelled"] == cancelled + 1


def test_a_full_queue_answers_429():
    with serve(max_queue=1) as (url, _), ThreadPoolExecutor(2) as pool:
        slow = {"model": "paint-slow", "prompt": "slow", "steps": 20}
        running = pool.submit(httpx.post, f"{url}/v1/images/generations", json=slow, timeout=30)
        time.sleep(0.25)
        waiting = pool.submit(httpx.post, f"{url}/v1/images/generations", json=slow, timeout=30)
        time.sleep(0.15)
        assert_error(httpx.post(f"{url}/v1/images/generations", json=slow), 429, code="queue_full")
        assert running.result().status_code == waiting.result().status_code == 200


def test_generation_error_is_a_500_and_the_server_stays_up(http):
    message = assert_error(
        http.post("/v1/images/generations", json={"model": "paint-broken", "prompt": "x"}),
        500,
        code="generation_failed",
    )
    assert "RuntimeError" in message and "the paint ran dry" in message
    assert http.get("/health").json()["status"] == "ok"
    assert http.post("/v1/images/generations", json={"model": "paint", "prompt": "still here"}).status_code == 200


# ---- safety --------------------------------------------------------------------------------
def test_api_key_is_checked_on_every_request():
    with serve(api_key="s3cret") as (url, _):
        for path in ("/health", "/v1/models", "/openapi.json"):
            assert_error(httpx.get(url + path), 401, code="invalid_api_key")
        assert_error(httpx.get(url + "/health", headers={"Authorization": "Bearer wrong"}), 401)
        assert httpx.get(url + "/health", headers={"Authorization": "Bearer s3cret"}).status_code == 200
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"{url}/v1", api_key="wrong", max_retries=0).models.list()
        good = openai.OpenAI(base_url=f"{url}/v1", api_key="s3cret", max_retries=0)
        assert good.images.generate(model="paint", prompt="ok").data[0].b64_json


def test_no_api_key_means_open(http):
    assert http.get("/health").status_code == 200


BAD_JSON = [
    ("invalid json", b"{not json", 400, None, "invalid_json"),
    ("not an object", b"[1, 2]", 400, None, "invalid_json"),
    ("empty body", b"", 400, None, None),
]
BAD_FIELDS = [
    ("unknown field", {"prompt": "x", "quality": "hd"}, 400, "quality", "unknown_parameter"),
    ("no prompt", {"model": "paint"}, 400, "prompt", "missing_required_parameter"),
    ("unknown model", {"prompt": "x", "model": "paint-smal"}, 404, "model", "model_not_found"),
    ("bad size text", {"prompt": "x", "model": "paint", "size": "64by64"}, 400, "size", "invalid_value"),
    ("size not a multiple", {"prompt": "x", "model": "paint", "size": "60x64"}, 400, "size", "invalid_value"),
    ("size too large", {"prompt": "x", "model": "paint", "size": "4096x4096"}, 400, "size", "invalid_value"),
    ("n too large", {"prompt": "x", "model": "paint", "n": 11}, 400, "n", "invalid_value"),
    ("n zero", {"prompt": "x", "model": "paint", "n": 0}, 400, "n", "invalid_value"),
    ("too many steps", {"prompt": "x", "model": "paint", "steps": 1000}, 400, "steps", "invalid_value"),
    (
        "unsupported option",
        {"prompt": "x", "model": "paint", "negative_prompt": "y"},
        400,
        "negative_prompt",
        "unsupported_option",
    ),
    ("bad quantize", {"prompt": "x", "model": "paint", "quantize": "3"}, 400, "quantize", "invalid_value"),
    ("bad response_format", {"prompt": "x", "response_format": "jpeg"}, 400, "response_format", "invalid_value"),
]


@pytest.mark.parametrize("content,status,param,code", [c[1:] for c in BAD_JSON], ids=[c[0] for c in BAD_JSON])
def test_bad_json_bodies(http, content, status, param, code):
    response = http.post("/v1/images/generations", content=content, headers={"Content-Type": "application/json"})
    assert_error(response, status, param, code)


@pytest.mark.parametrize("body,status,param,code", [c[1:] for c in BAD_FIELDS], ids=[c[0] for c in BAD_FIELDS])
def test_bad_fields(http, body, status, param, code):
    assert_error(http.post("/v1/images/generations", json=body), status, param, code)


def test_unknown_model_suggests_names(http, client):
    message = assert_error(http.post("/v1/images/generations", json={"prompt": "x", "model": "paint-smal"}), 404)
    assert "paint-small" in message
    with pytest.raises(openai.NotFoundError, match="paint-small"):
        client.images.generate(model="paint-smal", prompt="x")


def test_bad_edit_uploads(http):
    form = {"model": "paint-edit", "prompt": "x"}
    assert_error(
        http.post("/v1/images/edits", files={"image": ("a.txt", b"not an image", "text/plain")}, data=form),
        400,
        "image",
        "invalid_image",
    )
    assert_error(
        http.post("/v1/images/edits", files={"other": ("a.png", upload((1, 2, 3)))}, data=form),
        400,
        "other",
        "unknown_parameter",
    )
    assert_error(
        http.post("/v1/images/edits", data=form, files={"mask": ("m.png", rgba_mask())}), 400, "image", "missing_image"
    )
    assert_error(http.post("/v1/images/edits", json=form), 400, code="invalid_content_type")
    assert_error(
        http.post(
            "/v1/images/edits",
            files={"image": ("a.png", upload((1, 2, 3)))},
            data={"prompt": "x", "model": "paint-edit", "style": "vivid"},
        ),
        400,
        "style",
    )
    assert_error(http.post("/v1/images/edits", files={"x": ("", b"")}, data=form), 400)
    image = {"image": ("a.png", upload((1, 2, 3)))}  # the model's own options travel as JSON text in a form
    assert "JSON object" in assert_error(
        http.post("/v1/images/edits", files=image, data={**form, "options": "{"}), 400, "options"
    )
    assert "foo" in assert_error(
        http.post("/v1/images/edits", files=image, data={**form, "options": '{"foo": 1}'}), 400
    )
    too_many = [("image[]", (f"{i}.png", upload((i, i, i)))) for i in range(9)]
    assert_error(http.post("/v1/images/edits", files=too_many, data=form), 400, code="invalid_multipart")


def test_body_size_is_limited():
    with serve(max_body_bytes=10_000) as (url, _):
        big = {"prompt": "x" * 20_000}
        assert_error(httpx.post(f"{url}/v1/images/generations", json=big), 413, code="request_too_large")

        def chunks():  # no Content-Length: the limit is counted as the body streams in
            for _ in range(20):
                yield b"x" * 1000

        assert_error(
            httpx.post(f"{url}/v1/images/generations", content=chunks(), headers={"Content-Type": "application/json"}),
            413,
        )
        assert_error(
            httpx.post(
                f"{url}/v1/images/edits",
                data={"prompt": "x", "model": "paint-edit"},
                files={"image": ("a.png", upload((1, 2, 3), size=(512, 512)) + b"\0" * 20_000)},
            ),
            413,
        )


def test_unknown_route_and_method_are_openai_errors(http):
    assert_error(http.get("/v1/nothing"), 404, code="not_found")
    assert_error(http.get("/v1/images/generations"), 405, code="method_not_allowed")


def test_missing_extra_is_one_clear_line(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None if name == "uvicorn" else real(name))
    with pytest.raises(imagegen.ImagegenError, match=r'pip install "imagegen-mlx\[serve\]"'):
        require_serve_extra()


# ---- models, health, schema ----------------------------------------------------------------
def test_models_health_and_openapi(http, client):
    cards = {m.id: m for m in client.models.list().data}
    assert {"paint-small", "paint-edit"} <= set(cards)
    assert "image-edit" in cards["paint-edit"].tasks and cards["paint-small"].loaded  # preloaded at start
    assert client.models.retrieve("paint").id == "paint-small"
    health = http.get("/health").json()
    assert health["status"] == "ok" and health["queue"]["waiting"] == 0
    assert any(m["model"] == "paint-small" and m["memory_bytes"] == 48 for m in health["loaded"])
    schema = http.get("/openapi.json").json()
    assert {"/v1/images/generations", "/v1/images/edits", "/v1/models", "/health"} <= set(schema["paths"])
    assert "multipart/form-data" in schema["paths"]["/v1/images/edits"]["post"]["requestBody"]["content"]


# ---- residency -----------------------------------------------------------------------------
def test_keep_alive_unloads_idle_models_and_reloads_on_demand():
    with serve(keep_alive="1s") as (url, app):
        residency = app.state.service.residency
        assert httpx.post(f"{url}/v1/images/generations", json={"model": "paint", "prompt": "x"}).status_code == 200
        assert [m["model"] for m in httpx.get(f"{url}/health").json()["loaded"]] == ["paint-small"]
        deadline = time.monotonic() + 5
        while httpx.get(f"{url}/health").json()["loaded"]:
            assert time.monotonic() < deadline, "keep-alive did not unload the model"
            time.sleep(0.05)
        assert httpx.post(f"{url}/v1/images/generations", json={"model": "paint", "prompt": "x"}).status_code == 200
        assert (residency.loads, residency.unloads) == (2, 1)


def test_least_recently_used_model_is_unloaded_when_memory_is_short():
    budget = estimate_memory(None, None, "", None, 64, 64, 1) + 40  # one 64x64 run fits, two models do not
    with serve(keep_alive=-1, max_memory=budget, models=["paint-small"]) as (url, app):
        residency = app.state.service.residency
        for model in ("paint-small", "paint-edit", "paint-small", "paint-small"):
            answer = httpx.post(f"{url}/v1/images/generations", json={"model": model, "prompt": "x"})
            assert answer.status_code == 200
        loaded = [m["model"] for m in httpx.get(f"{url}/health").json()["loaded"]]
        assert loaded == ["paint-small"]
        assert (residency.loads, residency.unloads) == (3, 2)
        before = len(RUNS)
        answer = httpx.post(f"{url}/v1/images/generations", json={"model": "paint", "prompt": "x", "n": 3})
        assert len(answer.json()["data"]) == 3
        assert [r["batch"] for r in RUNS[before:]] == [1, 1, 1]  # no memory to batch them
    with serve(keep_alive=-1) as (url, app):  # plenty of memory: both stay
        for model in ("paint-small", "paint-edit"):
            httpx.post(f"{url}/v1/images/generations", json={"model": model, "prompt": "x"})
        assert len(httpx.get(f"{url}/health").json()["loaded"]) == 2


def test_quantize_is_a_separate_resident(http):
    answer = http.post("/v1/images/generations", json={"model": "paint", "prompt": "x", "quantize": "8"})
    assert answer.status_code == 200
    assert {(m["model"], m["quantize"]) for m in http.get("/health").json()["loaded"]} >= {
        ("paint-small", None),
        ("paint-small", "8"),
    }


# ---- load ----------------------------------------------------------------------------------
def test_load_50_requests_from_8_clients(url):
    def one(i: int) -> float:
        start = time.perf_counter()
        response = clients[i % 8].post(
            "/v1/images/generations",
            json={
                "model": ["paint", "paint-edit"][i % 2],
                "prompt": f"load {i}",
                "size": "64x64",
                "n": 1 + i % 2,
                "seed": i,
                "user": f"c{i % 8}",
            },
        )
        assert response.status_code == 200, response.text
        assert len(response.json()["data"]) == 1 + i % 2
        return time.perf_counter() - start

    clients = [httpx.Client(base_url=url, timeout=60) for _ in range(8)]
    try:
        start = time.perf_counter()
        with ThreadPoolExecutor(8) as pool:
            latencies = sorted(pool.map(one, range(50)))
        total = time.perf_counter() - start
    finally:
        for c in clients:
            c.close()
    p50, p95 = statistics.median(latencies), latencies[int(0.95 * len(latencies)) - 1]
    print(
        f"\nload: 50 requests, 8 clients, 0 errors: total {total:.2f}s, {50 / total:.1f} req/s, "
        f"p50 {p50 * 1000:.0f} ms, p95 {p95 * 1000:.0f} ms, max {latencies[-1] * 1000:.0f} ms"
    )
    assert len(latencies) == 50


def test_serve_command_starts_and_refuses_bad_options(tmp_path):
    """`imagegen serve` as a user runs it: a real process on a free port, then a clean Ctrl-C."""
    import signal
    import socket
    import subprocess
    import sys
    import time

    bad = subprocess.run(
        [sys.executable, "-m", "imagegen", "serve", "--model", "nope"], capture_output=True, text=True, timeout=60
    )
    assert bad.returncode == 1 and bad.stderr.startswith("Error: Unknown model 'nope'")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [sys.executable, "-m", "imagegen", "serve", "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.time() + 30
        while True:
            try:
                assert httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200
                break
            except httpx.TransportError:
                assert time.time() < deadline and proc.poll() is None, proc.stdout.read()
                time.sleep(0.2)
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=20)
