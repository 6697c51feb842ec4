"""`imagegen batch` in one process, on the example plugin: outputs, resume, failures, bad input, the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

import imagegen
import imagegen.cli.batch  # noqa: F401  (registers the command until imagegen.cli imports it)
from imagegen import registry
from imagegen.batch import FAILURES, RESULTS, BatchInputError, Defaults, RowRunner, derived_seed, read_rows, run_batch
from imagegen.cli import get_app
from imagegen.image import read_metadata


def write_rows(path: Path, rows: list[dict | str]) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def results(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / RESULTS).read_text().splitlines()]


def pixels(image: Image.Image | Path) -> np.ndarray:
    with Image.open(image) if isinstance(image, Path) else image as img:
        return np.asarray(img.convert("RGB"))


ROWS = [
    {"id": "fox", "prompt": "a fox", "seed": 3, "size": "64x48"},
    {"id": "owl", "prompt": "an owl", "seed": 4, "steps": 2},
    {"prompt": "no id, no seed", "size": "32x32"},
    {"id": 7, "prompt": "remixed", "model": "hello-remix", "seed": 5, "size": "48x32"},
]


@pytest.fixture
def prompts(tmp_path, hello_plugin) -> Path:
    return write_rows(tmp_path / "prompts.jsonl", ROWS)


def test_batch_writes_pngs_results_and_metadata(prompts, tmp_path):
    out = tmp_path / "out"
    summary = run_batch(prompts, out, Defaults(model="hello-waves"))
    assert (summary.total, summary.done, summary.failed, summary.skipped) == (4, 4, 0, 0)
    records = {r["id"]: r for r in results(out)}
    hashed = next(i for i in records if i not in ("fox", "owl", "7"))
    assert len(hashed) == 16 and records[hashed]["seed"] == derived_seed(hashed)
    assert set(records["fox"]) == {"id", "file", "model", "seed", "seconds", "worker"}
    assert records["7"]["model"] == "hello-remix" and records["fox"]["model"] == "hello-waves"

    # each PNG is the image the model draws for that row's settings, with the metadata `imagegen run` writes
    pipe = registry.get("hello-waves").pipeline()
    expected = pipe.generate("a fox", width=64, height=48, seed=3).images[0]
    assert np.array_equal(pixels(out / "fox.png"), pixels(expected))
    meta = read_metadata(out / "owl.png")
    assert (meta["prompt"], meta["seed"], meta["steps"], meta["width"], meta["model"]) == (
        "an owl",
        4,
        2,
        256,
        "hello-waves",
    )
    assert meta["source"] == "imagegen batch" and meta["batch"]["id"] == "owl"
    assert meta["plugin"] == "imagegen-hello 0.1.0" and meta["imagegen"] == imagegen.__version__
    assert not (out / FAILURES).exists()


def test_defaults_fill_rows_and_ids_are_stable(prompts, tmp_path):
    rows = read_rows(prompts, Defaults(model="hello", width=96, height=64, steps=3, seed=11))
    assert [r.id for r in rows] == [r.id for r in read_rows(prompts)]  # the id hashes the row, not the defaults
    fox, owl, hashed, remix = rows
    assert (fox.width, fox.height, fox.seed, fox.steps) == (64, 48, 3, 3)
    assert (owl.width, owl.height, owl.seed, owl.steps, owl.model) == (96, 64, 4, 2, "hello")
    assert hashed.seed == 11 and remix.model == "hello-remix"
    assert read_rows(prompts)[2].seed == derived_seed(hashed.id)


def test_resume_skips_done_rows_and_repairs_results(prompts, tmp_path):
    out = tmp_path / "out"
    run_batch(prompts, out, Defaults(model="hello"))
    (out / "owl.png").unlink()  # never finished
    lines = (out / RESULTS).read_text().splitlines()
    kept = [line for line in lines if '"fox"' not in line and '"owl"' not in line]  # fox's line lost to a crash
    (out / RESULTS).write_text("\n".join(kept) + '\n{"id": "owl", "fi')  # and a line cut short
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("*.png")}

    summary = run_batch(prompts, out, Defaults(model="hello"))
    assert (summary.skipped, summary.done, summary.failed) == (3, 1, 0)
    records = results(out)
    assert sorted(r["id"] for r in records) == sorted(r.id for r in read_rows(prompts))  # one line per row
    fox = next(r for r in records if r["id"] == "fox")
    assert fox["seed"] == 3 and fox["worker"]  # recovered from the PNG's metadata
    assert all((out / name).stat().st_mtime_ns == t for name, t in before.items())  # done rows not redone

    again = run_batch(prompts, out, Defaults(model="hello"))
    assert (again.skipped, again.done) == (4, 0) and len(results(out)) == 4


def test_failed_rows_are_recorded_and_the_rest_go_on(tmp_path, hello_plugin):
    prompts = write_rows(
        tmp_path / "p.jsonl",
        [
            {"id": "ok", "prompt": "fine", "size": "32x32"},
            {"id": "nomodel", "prompt": "x", "model": "hello-wavez"},
            {"id": "odd", "prompt": "x", "size": "33x32"},
            {"id": "huge", "prompt": "x", "size": "4096x4096"},
            {
                "id": "cfg",
                "prompt": "x",
                "guidance": 2.5,
                "size": "32x32",
            },  # hello takes no guidance: fails in generate
            {"id": "ok2", "prompt": "also fine", "size": "32x32"},
        ],
    )
    out = tmp_path / "out"
    summary = run_batch(prompts, out, Defaults(model="hello"))
    assert (summary.done, summary.failed) == (2, 4)
    failures = {f["id"]: f for f in (json.loads(line) for line in (out / FAILURES).read_text().splitlines())}
    assert set(failures) == {"nomodel", "odd", "huge", "cfg"}
    assert "Unknown model 'hello-wavez'" in failures["nomodel"]["error"] and failures["nomodel"]["line"] == 2
    assert "multiple of 16" in failures["odd"]["error"] and "larger than" in failures["huge"]["error"]
    assert "guidance" in failures["cfg"]["error"] and failures["cfg"]["worker"]
    assert sorted(r["id"] for r in results(out)) == ["ok", "ok2"]

    again = run_batch(prompts, out, Defaults(model="hello"))  # failures are retried; the file holds this run's
    assert (again.skipped, again.failed) == (2, 4) and len((out / FAILURES).read_text().splitlines()) == 4


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("{not json", "line 2: not valid JSON"),
        ('["a list"]', "line 2: expected a JSON object"),
        ('{"id": "x"}', "line 2: missing 'prompt'"),
        ('{"prompt": "   "}', "line 2: missing 'prompt'"),
        ('{"prompt": "x", "promt": "y"}', "line 2: unknown field 'promt'"),
        ('{"prompt": "x", "seed": "7"}', "line 2: 'seed' must be an integer, got \"7\""),
        ('{"prompt": "x", "seed": true}', "line 2: 'seed' must be an integer"),
        ('{"prompt": "x", "guidance": "high"}', "line 2: 'guidance' must be a number"),
        ('{"prompt": "x", "size": "big"}', "line 2: 'size' must look like"),
        ('{"prompt": "x", "id": "../escape"}', "line 2: id '../escape' must be"),
        ('{"prompt": "first"}', "line 2: id '"),  # the same row twice: the same id
        ('{"prompt": "x", "init_image": ["a.png"]}', "line 2: 'init_image' must be an image path"),
        ('{"prompt": "x", "init_image": "a.png", "strength": 0}', "line 2: 'strength' must be within (0, 1]"),
        (
            '{"prompt": "x", "init_image": "a.png", "outpaint": "1,2"}',
            "line 2: 'outpaint' must be LEFT,TOP,RIGHT,BOTTOM",
        ),
        ('{"prompt": "x", "noise": "cuda"}', "line 2: 'noise' must be one of mlx, torch"),
    ],
)
def test_bad_input_fails_fast_with_the_line_number(tmp_path, hello_plugin, line, message):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "first"}\n' + line + "\n" + '{"prompt": "third"}\n')
    with pytest.raises(BatchInputError) as e:
        run_batch(prompts, tmp_path / "out")
    assert message in str(e.value) and str(prompts) in str(e.value)
    assert not (tmp_path / "out").exists()  # nothing ran


def test_image_to_image_rows(tmp_path):
    """init_image / mask / outpaint rows on the bundled demo model: paths relative to the prompts file, the
    PNG the Python API draws, inputs recorded by name and hash; a row whose file is missing fails alone."""
    (tmp_path / "in").mkdir()
    registry.get("flux2-demo").pipeline().generate("a red circle on a blue background", seed=0, steps=2).images[0].crop(
        (16, 0, 112, 128)
    ).save(tmp_path / "in" / "start.png")  # 96x128: outpainted back to 128x128
    mask = np.zeros((128, 96), np.uint8)
    mask[:, 48:] = 255
    Image.fromarray(mask).save(tmp_path / "in" / "half.png")
    prompts = write_rows(
        tmp_path / "in" / "rows.jsonl",
        [
            {
                "id": "paint",
                "prompt": "a green square on a blue background",
                "init_image": "start.png",
                "mask": "half.png",
                "strength": 0.9,
                "steps": 2,
                "seed": 1,
                "noise": "torch",
            },
            {
                "id": "grow",
                "prompt": "a red circle on a blue background",
                "init_image": "start.png",
                "outpaint": [16, 0, 16, 0],
                "steps": 2,
                "seed": 2,
            },
            {"id": "lost", "prompt": "x", "init_image": "nowhere.png", "steps": 2},
        ],
    )
    summary = run_batch(prompts, tmp_path / "out", Defaults(model="flux2-demo"))
    assert (summary.done, summary.failed) == (2, 1) and "nowhere.png" in summary.failures[0]["error"]
    pipe = registry.get("flux2-demo").pipeline()
    want = pipe.generate(
        "a green square on a blue background",
        init_image=tmp_path / "in" / "start.png",
        mask=tmp_path / "in" / "half.png",
        strength=0.9,
        steps=2,
        seed=1,
        noise="torch",
    ).images[0]
    assert np.array_equal(pixels(tmp_path / "out" / "paint.png"), pixels(want))
    meta = read_metadata(tmp_path / "out" / "paint.png")
    assert (meta["init_image"], meta["mask"]) == ("start.png", "half.png")
    assert set(meta["inputs"]) == {"start.png", "half.png"} and len(meta["inputs"]["start.png"]) == 64
    assert (meta["noise"], meta["strength"]) == ("torch", 0.9)
    grown = read_metadata(tmp_path / "out" / "grow.png")
    assert grown["outpaint"] == [16, 0, 16, 0] and (grown["width"], grown["height"]) == (128, 128)


def test_each_model_loads_once(tmp_path, hello_plugin, monkeypatch):
    loads = []
    init = hello_plugin.HelloPipeline.__init__
    monkeypatch.setattr(
        hello_plugin.HelloPipeline,
        "__init__",
        lambda self, spec, *a, **k: (loads.append(spec.id), init(self, spec, *a, **k))[1],
    )
    models = ["hello-waves", "hello-remix"] * 4
    prompts = write_rows(
        tmp_path / "p.jsonl", [{"prompt": f"p{i}", "model": m, "size": "32x32"} for i, m in enumerate(models)]
    )
    run_batch(prompts, tmp_path / "out")
    assert sorted(loads) == ["hello-remix", "hello-waves"]
    assert [r["model"] for r in results(tmp_path / "out")] == sorted(models)  # grouped by model

    runner = RowRunner()  # a model that cannot load fails its rows without reloading for each
    rows = read_rows(write_rows(tmp_path / "q.jsonl", [{"prompt": f"q{i}", "model": "hello"} for i in range(2)]))
    monkeypatch.setattr(hello_plugin.HelloPipeline, "__init__", lambda *a, **k: 1 / 0)
    errors = [runner.run(row).error for row in rows]
    assert errors[0] == errors[1] == "Cannot load 'hello': ZeroDivisionError: division by zero"


# ---- the command ---------------------------------------------------------------------------------
def invoke(*args: str):
    return CliRunner().invoke(get_app(), list(args))


def test_cli_batch(prompts, tmp_path):
    result = invoke(
        "batch",
        str(prompts),
        "-o",
        str(tmp_path / "out"),
        "--model",
        "hello",
        "--size",
        "32x32",
        "--steps",
        "2",
        "--json",
    )
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert (summary["done"], summary["failed"], summary["workers"]) == (4, 0, 1)
    assert read_metadata(tmp_path / "out" / "owl.png")["width"] == 32  # --size filled the row in

    again = invoke("batch", str(prompts), "-o", str(tmp_path / "out"), "--model", "hello")
    assert again.exit_code == 0 and "0 done, 4 already done" in again.stdout


def test_cli_batch_errors(prompts, tmp_path):
    bad = write_rows(tmp_path / "bad.jsonl", [{"prompt": "x"}, '{"prompt": 3}'])
    for args, fragment in [
        ((str(bad), "-o", "out"), "line 2: 'prompt' must be a string"),
        ((str(tmp_path / "none.jsonl"), "-o", "out"), "Prompts file not found"),
        ((str(prompts), "-o", "out", "--workers", "2"), "--workers needs --ray"),
        ((str(prompts), "-o", "out", "--size", "big"), "--size must look like"),
    ]:
        result = invoke("batch", *args)
        lines = [line for line in result.output.splitlines() if line.strip()]
        assert result.exit_code == 1 and len(lines) == 1 and fragment in lines[0], result.output

    failing = write_rows(tmp_path / "f.jsonl", [{"prompt": "x", "model": "nope"}, {"prompt": "y"}])
    result = invoke("batch", str(failing), "-o", str(tmp_path / "out2"), "--model", "hello")
    assert result.exit_code == 1 and "1 done, 1 failed" in result.stdout
    assert "1 of 2 rows failed" in result.output


def test_missing_ray_is_one_clear_error(monkeypatch):
    import importlib.util

    from imagegen.scaleout import require_ray

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(imagegen.ImagegenError, match=r'pip install "imagegen-mlx\[ray\]"'):
        require_ray()
