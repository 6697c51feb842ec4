"""Scale-out on a local Ray cluster of 2 CPUs: batch workers (same images as one process, a worker killed
mid-batch, an interrupted batch resumed) and `serve --ray` (2 replicas, one killed under load)."""

from __future__ import annotations

import base64
import importlib
import io
import json
import os
import signal
import socket
import sys
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest
import ray
from PIL import Image
from ray import serve
from typer.testing import CliRunner

import imagegen.cli.batch  # noqa: F401  (registers the command until imagegen.cli imports it)
from imagegen import ImagegenError, plugins, registry
from imagegen.batch import RESULTS, Defaults, read_rows, run_batch
from imagegen.cli import get_app
from imagegen.errors import InvalidOptionError
from imagegen.scaleout.serve import APP_NAME, build_app, scaling, shutdown

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module", autouse=True)
def cluster():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield
    ray.shutdown()


def write_prompts(path: Path, count: int = 20) -> Path:
    rows = [{"id": f"r{i:02d}", "prompt": f"row {i}", "size": ["64x64", "48x32", "32x64"][i % 3]} for i in range(count)]
    for i in range(0, count, 4):
        rows[i]["seed"] = 1000 + i  # the others draw seeds from their ids
    rows.insert(count // 2, {"id": "bad", "prompt": "x", "guidance": 2.0})  # hello takes no guidance: fails on a worker
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def pixels(path: Path) -> np.ndarray:
    with Image.open(path) as img:
        return np.asarray(img.convert("RGB"))


def results(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / RESULTS).read_text().splitlines()]


def ids(prompts: Path) -> list[str]:
    """The ids of the rows that draw an image (all but 'bad')."""
    return sorted(r.id for r in read_rows(prompts) if r.id != "bad")


def assert_same_images(a: Path, b: Path, ids: list[str]) -> None:
    for i in ids:
        assert np.array_equal(pixels(a / f"{i}.png"), pixels(b / f"{i}.png")), i


class Recorder:
    """A batch reporter that can act after the n-th image written."""

    def __init__(self, after: int = 0, action=None):
        self.after, self.action, self.done, self.notes = after, action, [], []

    def start(self, total: int, skipped: int, workers: int) -> None:
        self.workers = workers

    def row(self, record: dict) -> None:
        if "error" not in record:
            self.done.append(record)
            if len(self.done) == self.after and self.action is not None:
                self.action(record)

    def note(self, text: str) -> None:
        self.notes.append(text)


@pytest.fixture
def prompts(tmp_path, hello_plugin) -> Path:
    return write_prompts(tmp_path / "prompts.jsonl")


@pytest.fixture
def local_run(prompts, tmp_path) -> Path:
    """The one-process run every Ray run must match."""
    run_batch(prompts, tmp_path / "local", Defaults(model="hello"))
    return tmp_path / "local"


def test_two_workers_draw_the_same_images_as_one_process(prompts, local_run, tmp_path):
    summary = run_batch(prompts, tmp_path / "ray", Defaults(model="hello"), ray="local", workers=2)
    assert (summary.done, summary.failed, summary.workers) == (20, 1, 2)
    assert "guidance" in summary.failures[0]["error"] and summary.failures[0]["id"] == "bad"
    records = results(tmp_path / "ray")
    assert len(Counter(r["worker"] for r in records)) == 2  # both workers took rows
    assert_same_images(local_run, tmp_path / "ray", ids(prompts))


def test_a_killed_worker_is_replaced_and_every_row_done_once(prompts, local_run, tmp_path):
    def kill(record: dict) -> None:
        pid = int(record["worker"].rsplit(":", 1)[1])
        assert pid != os.getpid()
        os.kill(pid, signal.SIGKILL)

    reporter = Recorder(after=3, action=kill)
    out = tmp_path / "ray"
    summary = run_batch(prompts, out, Defaults(model="hello"), ray="local", workers=2, reporter=reporter)
    assert summary.replaced >= 1 and summary.retried >= 1 and any("died" in n for n in reporter.notes)
    assert (summary.done, summary.failed) == (20, 1)
    assert sorted(r["id"] for r in results(out)) == ids(prompts)  # every row exactly once
    assert len(Counter(r["worker"] for r in results(out))) == 3  # two workers, then a replacement
    assert_same_images(local_run, out, ids(prompts))


def test_an_interrupted_batch_resumes(prompts, local_run, tmp_path):
    def interrupt(record: dict) -> None:
        raise KeyboardInterrupt

    out = tmp_path / "ray"
    with pytest.raises(KeyboardInterrupt):
        run_batch(prompts, out, Defaults(model="hello"), ray="local", workers=2, reporter=Recorder(6, interrupt))
    assert len(list(out.glob("*.png"))) == len(results(out)) == 6
    result = CliRunner().invoke(
        get_app(),
        ["batch", str(prompts), "-o", str(out), "--model", "hello", "--ray", "local", "--workers", "2", "--json"],
    )
    assert result.exit_code == 1 and "1 of 21 rows failed" in result.output  # the bad row, tried again
    summary = json.loads(result.stdout.splitlines()[0])
    assert (summary["skipped"], summary["done"], summary["failed"], summary["workers"]) == (6, 14, 1, 2)
    assert sorted(r["id"] for r in results(out)) == ids(prompts)
    assert_same_images(local_run, out, ids(prompts))


CRASH_PLUGIN = """
import os
import imagegen


class CrashPipeline(imagegen.Pipeline):
    def encode(self, request):
        os._exit(3)  # the worker process dies, as in a segfault or an OOM kill

    prepare_latents = denoise_steps = decode = encode


@imagegen.hookimpl
def register_models(register):
    register(imagegen.ModelSpec(id="crash", family="crash", load=lambda spec, weights, **k: CrashPipeline(spec),
                                needs_weights=False, default_size=(32, 32)))
"""


@pytest.fixture
def crash_plugin(tmp_path, monkeypatch):
    """A plugin registered in this process (so forwarded to the workers) whose model kills its worker."""
    folder = tmp_path / "crashplugin"
    folder.mkdir()
    (folder / "imagegen_crash.py").write_text(CRASH_PLUGIN)
    monkeypatch.syspath_prepend(str(folder))
    module = importlib.import_module("imagegen_crash")
    plugins.register_plugin(module, "crash", "imagegen-crash", "0.0.1")
    yield folder / "imagegen_crash.py"
    plugins.unregister_plugin("crash")
    sys.modules.pop("imagegen_crash", None)


def test_a_row_that_kills_its_workers_fails_alone(hello_plugin, crash_plugin, tmp_path):
    prompts = tmp_path / "p.jsonl"
    rows = [{"id": "boom", "prompt": "x", "model": "crash"}, *({"id": f"h{i}", "prompt": f"h{i}"} for i in range(5))]
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows))
    summary = run_batch(prompts, tmp_path / "out", Defaults(model="hello", width=32, height=32), ray="local", workers=2)
    # the first death: boom and the row queued behind it were out, so neither counts and both go again alone;
    # then boom dies alone three times (a row generates only after those sent before it started: the same every run)
    assert (summary.done, summary.failed, summary.replaced) == (5, 1, 4)  # rows queued behind it are not blamed
    assert summary.failures[0]["id"] == "boom" and "its worker died 3 times" in summary.failures[0]["error"]


@pytest.mark.parametrize("older_came_back", [True, False])
def test_a_death_counts_only_when_one_row_did_not_come_back(monkeypatch, older_came_back):
    """Pool.lost: the worker held an older row and a newer one. If the older row's result came back before the
    death (the driver has not read it yet), the newer row killed it. If neither came back, the worker may have
    been generating either (the older one's result can still be on its way while the newer generates): no death
    is counted and both become suspects, which run alone."""
    from ray.exceptions import RayActorError

    from imagegen.batch import Row
    from imagegen.scaleout import batch as ray_batch

    older, newer = (ray_batch.Task(0, 0, Row(name, i + 1, "x", "hello", 0)) for i, name in enumerate("ab"))

    def get(ref):
        if ref == "newer" or not older_came_back:
            raise RayActorError()
        return "outcome"

    monkeypatch.setattr(ray_batch.ray, "get", get)
    monkeypatch.setattr(ray_batch.ray, "kill", lambda actor, no_restart: None)
    pool = object.__new__(ray_batch.Pool)
    pool.in_flight, pool.culprits, pool.actors, pool.generations = {"older": older}, {}, ["dead"], [0]
    pool.turns, pool.suspects = [2], set()
    pool._new = lambda: "replacement"
    assert pool.lost(newer) is older_came_back  # the newer row's error told first
    assert pool.culprits == {(0, 0): "b" if older_came_back else None}
    assert pool.suspects == (set() if older_came_back else {"a", "b"})
    assert (pool.actors, pool.generations, pool.turns) == (["replacement"], [1], [0])


def test_suspects_run_alone():
    from imagegen.batch import Row
    from imagegen.scaleout import batch as ray_batch

    rows = {name: Row(name, i + 1, "x", "hello", 0) for i, name in enumerate("sabc")}
    pool = object.__new__(ray_batch.Pool)
    pool.generations, pool.suspects = [0, 0, 0], {"s"}
    pool.in_flight = {"r1": ray_batch.Task(0, 0, rows["a"]), "r2": ray_batch.Task(1, 0, rows["s"])}
    assert [pool.takes(slot, rows["s"]) for slot in range(3)] == [False, False, True]  # only an idle worker
    assert [pool.takes(slot, rows["b"]) for slot in range(3)] == [True, False, True]  # never beside a suspect
    pool.ended(rows["s"])
    assert not pool.suspects


def test_a_worker_generates_its_rows_in_the_order_sent(monkeypatch):
    """Ray starts a threaded actor's calls in any order: a row's generation waits for the turns sent before it,
    so the oldest row a dead worker held that did not come back is the one it was generating."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    from imagegen.batch import Row
    from imagegen.scaleout import batch as ray_batch

    order = []

    class Runner:
        def generate(self, row):
            order.append(row.id)
            return row.id

    worker = object.__new__(ray_batch.BatchWorker)
    worker.runner, worker.device = Runner(), ThreadPoolExecutor(max_workers=1)
    worker.turns, worker.next_turn = threading.Condition(), 0
    rows = [Row(name, i + 1, "x", "hello", 0) for i, name in enumerate("abc")]
    monkeypatch.setattr(ray_batch, "encoded", lambda generated: generated)
    late = [threading.Thread(target=worker.run, args=(rows[i], i)) for i in (2, 1)]  # later turns call first
    for thread in late:
        thread.start()
    assert worker.run(rows[0], 0) == "a"
    for thread in late:
        thread.join(timeout=10)
    assert order == ["a", "b", "c"]


def test_workers_that_cannot_start_stop_the_batch(hello_plugin, crash_plugin, tmp_path):
    crash_plugin.unlink()  # registered here, but the workers cannot import it
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "x"}\n')
    with pytest.raises(ImagegenError, match="cannot start: ModuleNotFoundError: No module named 'imagegen_crash'"):
        run_batch(prompts, tmp_path / "out", Defaults(model="hello"), ray="local", workers=1)


def test_demo_model_on_two_workers(tmp_path):
    prompts = tmp_path / "demo.jsonl"
    shapes = ["a red circle on a blue background", "a yellow square on a green background"]
    prompts.write_text(
        "".join(json.dumps({"id": f"d{i:02d}", "prompt": shapes[i % 2], "seed": i}) + "\n" for i in range(20))
    )
    defaults = Defaults(model="flux2-demo", width=64, height=64)
    run_batch(prompts, tmp_path / "local", defaults)
    summary = run_batch(prompts, tmp_path / "ray", defaults, ray="local", workers=2)
    assert (summary.done, summary.failed, summary.workers) == (20, 0, 2)
    assert_same_images(tmp_path / "local", tmp_path / "ray", [f"d{i:02d}" for i in range(20)])


def test_demo_model_on_a_worker_of_two_ranks(tmp_path):
    """--gpus-per-worker 2 on Ray: the worker launches two ranks (local ring processes here) for each image."""
    prompts = tmp_path / "demo.jsonl"
    prompts.write_text(
        "".join(
            json.dumps({"id": f"d{i}", "prompt": "a red circle on a blue background", "seed": i}) + "\n"
            for i in range(3)
        )
    )
    defaults = Defaults(model="flux2-demo", width=64, height=48, steps=2)
    run_batch(prompts, tmp_path / "local", defaults)
    summary = run_batch(prompts, tmp_path / "ray", defaults, ray="local", workers=1, gpus_per_worker=2)
    assert (summary.done, summary.failed, summary.workers) == (3, 0, 1)
    for i in range(3):
        one, two = (pixels(tmp_path / run / f"d{i}.png").astype(np.int16) for run in ("local", "ray"))
        assert np.abs(one - two).max() <= 1
    assert sorted(r["id"] for r in results(tmp_path / "ray")) == ["d0", "d1", "d2"]


# ---- serve --ray ---------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def replicas() -> list[str]:
    return [a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if "#ImageServer#" in a["name"]]


def test_serve_on_two_replicas_survives_a_killed_replica(hello_plugin):
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        serve.run(build_app(["hello-waves"], replicas=2, max_steps=1000), name=APP_NAME, route_prefix="/")
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=60)

        def generate(seed: int):
            response = client.images.with_raw_response.generate(
                model="hello-waves", prompt=f"request {seed}", size="512x512", extra_body={"seed": seed, "steps": 400}
            )
            return response.headers, response.parse()

        with ThreadPoolExecutor(8) as pool:
            futures = [pool.submit(generate, seed) for seed in range(8)]
            time.sleep(0.6)  # each replica is running one request and holds three more
            victim = replicas()[0]
            ray.kill(ray.get_actor(victim, namespace="serve"), no_restart=True)
            answers = [f.result() for f in futures]  # every request is answered, some by the other replica
        assert any(int(headers.get("x-imagegen-retries", 0)) >= 1 for headers, _ in answers)

        pipe = registry.get("hello-waves").pipeline()
        for seed, (_, body) in enumerate(answers):
            png = Image.open(io.BytesIO(base64.b64decode(body.data[0].b64_json)))
            expected = pipe.generate(f"request {seed}", width=512, height=512, steps=400, seed=seed).images[0]
            assert np.array_equal(np.asarray(png.convert("RGB")), np.asarray(expected)), seed

        deadline = time.monotonic() + 60
        while (len(replicas()) < 2 or victim in replicas()) and time.monotonic() < deadline:
            time.sleep(0.5)  # Serve starts a replacement replica
        assert len(replicas()) == 2 and victim not in replicas()
        url = (
            client.images.generate(model="hello-waves", prompt="by url", size="64x64", response_format="url")
            .data[0]
            .url
        )
        for _ in range(3):  # any replica hands out the image: the store is shared
            assert httpx.get(url).content.startswith(b"\x89PNG")
    finally:
        shutdown(False)
        serve.shutdown()


def test_replica_options():
    assert scaling(None, None, None, gpus=4) == {"num_replicas": 4}
    assert scaling(None, None, None, gpus=0) == {"num_replicas": 1}
    assert scaling(3, None, None, gpus=8) == {"num_replicas": 3}
    auto = scaling(None, 1, 4, gpus=4)["autoscaling_config"]
    assert (auto["min_replicas"], auto["max_replicas"], auto["target_ongoing_requests"]) == (1, 4, 1)
    assert scaling(None, None, 3, gpus=0)["autoscaling_config"]["min_replicas"] == 0
    for bad in ((2, 1, None), (None, 3, 2), (0, None, None)):
        with pytest.raises(InvalidOptionError):
            scaling(*bad, gpus=1)


def test_serve_replica_flags_need_ray():
    result = CliRunner().invoke(get_app(), ["serve", "--replicas", "2"])
    assert result.exit_code == 1 and "need --ray" in result.output


def test_workers_get_the_drivers_kernel_setting(monkeypatch):
    """IMAGEGEN_FUSED_KERNELS=0 on the driver reaches workers on other hosts (the plain-MLX reference path)."""
    from imagegen.scaleout import runtime_env

    monkeypatch.setenv("IMAGEGEN_FUSED_KERNELS", "0")
    assert runtime_env()["env_vars"]["IMAGEGEN_FUSED_KERNELS"] == "0"
