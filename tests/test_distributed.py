"""Sequence parallelism (imagegen.distributed) on the CPU: two local processes over MLX's ring backend give the
same transformer output and the same image as one process."""

from __future__ import annotations

import base64
import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import mlx.core as mx
import numpy as np
import pytest
from PIL import Image

from imagegen import distributed
from imagegen.batch import FAILURES, RESULTS, Defaults, run_batch
from imagegen.nn import row_split

# Runs in each rank: a tiny random FLUX.2 transformer on image-token counts that do and do not split evenly,
# sharded over the group, against the same call unsharded; rank 0 writes the largest difference.
RANK_SCRIPT = """
import sys
import mlx.core as mx
from imagegen import distributed
from imagegen.batch import FAILURES, RESULTS, Defaults, run_batch
from imagegen_flux2.config import Flux2TransformerConfig
from imagegen_flux2.transformer import Flux2Transformer

spread = distributed.from_environment()
mx.random.seed(0)
config = Flux2TransformerConfig(patch_size=1, in_channels=8, out_channels=8, num_layers=1, num_single_layers=2,
                                attention_head_dim=16, num_attention_heads=2, joint_attention_dim=24,
                                timestep_guidance_channels=32, mlp_ratio=2.0, axes_dims_rope=(4, 4, 4, 4))
model = Flux2Transformer(config)
worst = 0.0
for grid, n_txt in (((4, 4), 5), ((3, 5), 3)):  # 16 tokens split evenly, 15 do not
    x = mx.random.normal((2, grid[0] * grid[1], 8))
    text = mx.random.normal((2, n_txt, 24))
    t = mx.array([0.3, 0.7])
    rope = model.rope(n_txt, grid)
    model.sequence_parallel = None
    whole = model(x, text, t, rope)
    model.sequence_parallel = spread
    parts = model(x, text, t, rope)
    worst = max(worst, mx.abs(parts - whole).max().item())
if spread.rank == 0:
    open(sys.argv[1], "w").write(str(worst))
"""


# Runs in each rank: a tiny random VAE (attention in the mid block, random group-norm affines) decodes latents
# whose rows do not split evenly, in bands over the group, against the unsplit decode; rank 0 writes the difference.
VAE_RANK_SCRIPT = """
import sys
import mlx.core as mx
from mlx.utils import tree_flatten
from imagegen import distributed
from imagegen.batch import FAILURES, RESULTS, Defaults, run_batch
from imagegen.nn import AutoencoderKL, AutoencoderKLConfig, row_split

row_split.MIN_POSITIONS = 0  # a tiny latent splits too
spread = distributed.from_environment()
mx.random.seed(0)
config = AutoencoderKLConfig(block_out_channels=(16, 32, 32), down_block_types=("DownEncoderBlock2D",) * 3,
                             up_block_types=("UpDecoderBlock2D",) * 3, layers_per_block=1, norm_num_groups=8,
                             latent_channels=4)
vae = AutoencoderKL(config)
vae.load_weights([(k, mx.random.uniform(0.5, 1.5, v.shape) if k.endswith("norm.weight") or "norm1" in k
                   or "norm2" in k else v) for k, v in tree_flatten(vae.parameters())])
latents = mx.random.normal((1, 5, 6, 4)) * 2 + 0.5  # 5 rows: bands of 3 and 2
whole = vae.decode(latents)
split = vae.decode(latents, group=spread.group)
mx.eval(split)  # every rank takes part in the collectives
if spread.rank == 0:
    open(sys.argv[1], "w").write(str(mx.abs(split - whole).max().item() / mx.abs(whole).max().item()))
"""


def env_with_tree() -> dict[str, str]:
    import imagegen_flux2

    import imagegen

    paths = [str(Path(m.__file__).parents[1]) for m in (imagegen, imagegen_flux2)]
    return {**os.environ, "PYTHONPATH": os.pathsep.join([*paths, os.environ.get("PYTHONPATH", "")])}


def test_transformer_sharded_over_two_processes_matches_one(tmp_path, monkeypatch):
    script, result = tmp_path / "rank.py", tmp_path / "worst.txt"
    script.write_text(RANK_SCRIPT)
    monkeypatch.setattr(os, "environ", env_with_tree())
    assert distributed.launch([sys.executable, str(script), str(result)], 2) == 0
    assert float(result.read_text()) < 1e-5


def test_vae_decode_split_in_row_bands_matches_one_process(tmp_path, monkeypatch):
    script, result = tmp_path / "rank.py", tmp_path / "worst.txt"
    script.write_text(VAE_RANK_SCRIPT)
    monkeypatch.setattr(os, "environ", env_with_tree())
    assert distributed.launch([sys.executable, str(script), str(result)], 2) == 0
    # relative to the image's largest value, float32; CUDA convolves float32 in TF32 (10-bit mantissa) with
    # algorithms chosen per shape, so bands differ from the whole more there (9.6e-4 measured on two H200s)
    assert float(result.read_text()) < (2e-3 if mx.cuda.is_available() else 1e-5)


def test_small_latents_decode_whole_on_each_rank():
    """Splitting a small decode costs more than it saves (row_split.MIN_POSITIONS)."""
    group = SimpleNamespace(size=lambda: 2)
    assert not row_split.can_split((1, 128, 128, 32), group)  # 1024 px
    assert row_split.can_split((1, 256, 256, 32), group)  # 2048 px
    assert not row_split.can_split((1, 256, 256, 32), None)


def test_cli_gpus_two_draws_the_same_image(tmp_path):
    def run(out: Path, *extra: str) -> None:
        subprocess.run(
            [
                sys.executable,
                "-m",
                "imagegen",
                "run",
                "a red circle on a blue background",
                "--model",
                "flux2-demo",
                "--seed",
                "3",
                "--steps",
                "4",
                "-o",
                str(out),
                "--quiet",
                *extra,
            ],
            check=True,
            env=env_with_tree(),
            timeout=300,
        )

    run(tmp_path / "one.png")
    run(tmp_path / "two.png", "--gpus", "2")
    one, two = (np.asarray(Image.open(tmp_path / f), dtype=np.int16) for f in ("one.png", "two.png"))
    assert one.shape == two.shape == (128, 128, 3)
    assert np.abs(one - two).max() <= 1


def test_failing_rank_stops_the_others_and_reports(tmp_path):
    script = tmp_path / "fail.py"
    # rank 1 fails at once; rank 0 would wait forever for it in the group's first collective
    script.write_text(
        "import os, sys, time\nif os.environ['MLX_RANK'] == '1': sys.exit('rank 1 broke')\ntime.sleep(600)\n"
    )
    assert distributed.launch([sys.executable, str(script)], 2) == 1


def children(pid: int) -> list[int]:
    """The processes whose parent is pid (from /proc)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def test_serve_gpus_two_answers_as_one_process_and_stops_every_rank(tmp_path):
    """serve --gpus 2 (two local ring processes): the image of a one-process server, previews, a request whose
    client left, a model that cannot split refused, and SIGTERM ends every rank."""
    import httpx

    from imagegen.server.embedded import serve_in_thread

    body = {"model": "flux2-demo", "prompt": "a red circle", "size": "64x64", "seed": 3, "steps": 2}

    def pixels(answer: dict) -> np.ndarray:
        return np.asarray(Image.open(io.BytesIO(base64.b64decode(answer["data"][0]["b64_json"]))), dtype=np.int16)

    with serve_in_thread(models=["flux2-demo"]) as (url, _):
        one = pixels(httpx.post(f"{url}/v1/images/generations", json=body, timeout=120).json())
    (port,) = distributed._free_ports(1)
    server = subprocess.Popen(
        [sys.executable, "-m", "imagegen", "serve", "--gpus", "2", "--model", "flux2-demo", "--port", str(port)],
        env=env_with_tree(),
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(f"{url}/health", timeout=5).json()["loaded"]:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline and server.poll() is None, "serve --gpus 2 did not start"
            time.sleep(0.5)
        two = pixels(httpx.post(f"{url}/v1/images/generations", json=body, timeout=120).json())
        # a streamed preview is decoded on every rank at the same step (a split decode pairs up)
        events = httpx.post(
            f"{url}/v1/images/generations", json={**body, "stream": True, "partial_images": 1}, timeout=120
        ).text
        assert "image_generation.partial_image" in events and "image_generation.completed" in events
        # a client that leaves mid-generation: every rank stops at the same step, and the next request is answered
        with httpx.stream(
            "POST", f"{url}/v1/images/generations", json={**body, "steps": 200, "stream": True}, timeout=120
        ) as stream:
            next(line for line in stream.iter_lines() if '"stage": "denoise"' in line)
        assert pixels(httpx.post(f"{url}/v1/images/generations", json=body, timeout=120).json()).shape == (64, 64, 3)
        assert httpx.get(f"{url}/health", timeout=5).json()["queue"]["cancelled"] == 1
        refused = httpx.post(f"{url}/v1/images/generations", json={**body, "model": "zimage-turbo"}, timeout=30)
        assert refused.status_code == 400 and "serve --gpus" in refused.json()["error"]["message"]
        ranks = children(server.pid)
        assert len(ranks) == 2
    finally:
        server.terminate()  # SIGTERM to the launcher: rank 0 drains and ends the other rank
        server.wait(60)
    assert server.returncode == 0, server.stderr.read()
    assert not [pid for pid in ranks if Path(f"/proc/{pid}").exists()]
    assert one.shape == two.shape == (64, 64, 3)
    assert np.abs(one - two).max() <= 1


def demo_prompts(path: Path, count: int) -> Path:
    shapes = ["a red circle on a blue background", "a yellow square on a green background"]
    rows = [{"id": f"d{i}", "prompt": shapes[i % 2], "seed": i} for i in range(count)]
    rows.append({"id": "other", "prompt": "x", "model": "zimage-turbo"})  # cannot split: fails alone
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def assert_same_batch(a: Path, b: Path, ids: list[str]) -> None:
    for i in ids:
        one, two = (np.asarray(Image.open(folder / f"{i}.png"), dtype=np.int16) for folder in (a, b))
        assert np.abs(one - two).max() <= 1, i
    assert sorted(json.loads(line)["id"] for line in (b / RESULTS).read_text().splitlines()) == sorted(ids)


def test_batch_gpus_per_worker_two_draws_every_row_once_and_resumes(tmp_path, monkeypatch):
    monkeypatch.setattr(os, "environ", env_with_tree())
    prompts = demo_prompts(tmp_path / "demo.jsonl", 3)
    defaults = Defaults(model="flux2-demo", width=64, height=48, steps=2)
    run_batch(prompts, tmp_path / "one", defaults)
    summary = run_batch(prompts, tmp_path / "two", defaults, gpus_per_worker=2)
    assert (summary.done, summary.failed) == (3, 1)
    failure = json.loads((tmp_path / "two" / FAILURES).read_text())
    assert failure["id"] == "other" and "--gpus-per-worker" in failure["error"]
    assert_same_batch(tmp_path / "one", tmp_path / "two", ["d0", "d1", "d2"])
    (tmp_path / "two" / "d1.png").unlink()  # as if the batch had stopped before this row
    again = run_batch(prompts, tmp_path / "two", defaults, gpus_per_worker=2)
    assert (again.skipped, again.done) == (2, 1)
    assert_same_batch(tmp_path / "one", tmp_path / "two", ["d0", "d1", "d2"])


@pytest.mark.parametrize(
    "args, message",
    [
        (("run", "a circle", "--model", "flux2-demo", "--gpus", "0"), "--gpus must be >= 1, got 0."),
        (("run", "a circle", "--model", "flux2-demo", "--gpus", "-1"), "--gpus must be >= 1, got -1."),
        (("run", "a circle", "--model", "zimage-turbo", "--gpus", "2"), "cannot spread one image over several GPUs"),
        (("serve", "--gpus", "0"), "--gpus must be >= 1, got 0."),
        (("serve", "--gpus", "2", "--ray", "local"), "--gpus does not combine with --ray"),
        (("serve", "--gpus", "2", "--model", "zimage-turbo"), "Model 'zimage-turbo' cannot spread one image"),
        (("batch", "p.jsonl", "-o", "out", "--gpus-per-worker", "0"), "--gpus-per-worker must be >= 1, got 0."),
        (
            ("batch", "p.jsonl", "-o", "out", "--gpus-per-worker", "2", "--model", "zimage-turbo"),
            "Model 'zimage-turbo' cannot spread one image over several GPUs (--gpus-per-worker).",
        ),
    ],
)
def test_cli_refuses_bad_gpu_options(args, message, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from imagegen.cli import get_app

    monkeypatch.chdir(tmp_path)
    (tmp_path / "p.jsonl").write_text('{"prompt": "x"}\n')
    result = CliRunner().invoke(get_app(), list(args))
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 1 and len(lines) == 1 and message in lines[0], result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.jsonl"]  # nothing written, nothing launched


def test_benchmark_smoke_runs_generate_and_serve_sections(tmp_path):
    """benchmarks/bench_multi_gpu.py --tiny: both sections run and report 1 vs 2 ranks (the code paths, not speed)."""
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_multi_gpu.py"
    done = subprocess.run(
        [
            sys.executable,
            str(script),
            "--tiny",
            "--models",
            "flux2-klein-4b",
            "--repeats",
            "1",
            "--work",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    records = {r["section"]: r for r in map(json.loads, done.stdout.splitlines()) if r["section"] != "header"}
    assert records["multi-gpu"]["speedup_decode"] > 0 and records["multi-gpu"]["image_goal_met"]
    assert records["serve"]["many"]["latency_s"] > 0 and records["serve"]["image_goal_met"]
