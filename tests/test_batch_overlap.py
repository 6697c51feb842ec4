"""`imagegen batch` encodes and writes each PNG on a thread while the next row generates: the same files, in row
order, failures per row, and resume unchanged."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from imagegen import batch
from imagegen.batch import RESULTS, Defaults, Generated, Outputs, RowOutcome, Summary, Writer, read_rows, run_local


def write_rows(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def run(prompts: Path, out: Path, defaults: Defaults, overlap: bool) -> Summary:
    rows = read_rows(prompts, defaults)
    summary = Summary(total=len(rows))
    outputs = Outputs(out, summary)
    try:
        run_local([batch.check_row(r) for r in outputs.resume(rows)], outputs, overlap=overlap)
    finally:
        outputs.close()
    return summary


def result_ids(folder: Path) -> list[str]:
    return [json.loads(line)["id"] for line in (folder / RESULTS).read_text().splitlines()]


def test_overlap_writes_the_same_png_bytes_in_row_order(tmp_path, monkeypatch):
    monkeypatch.setattr(time, "perf_counter", lambda: 0.0)  # the metadata's timings: equal in both runs
    prompts = write_rows(
        tmp_path / "p.jsonl",
        [
            {"id": "a", "prompt": "a red circle on a blue background", "seed": 1},
            {"id": "b", "prompt": "a yellow square on a green background", "seed": 2, "size": "32x64"},
            {"id": "c", "prompt": "a red circle on a blue background", "seed": 3},
        ],
    )
    defaults = Defaults(model="flux2-demo", width=64, height=64)
    for overlap in (False, True):
        summary = run(prompts, tmp_path / str(overlap), defaults, overlap)
        assert (summary.done, summary.failed) == (3, 0)
    for row in "abc":
        assert (tmp_path / "True" / f"{row}.png").read_bytes() == (tmp_path / "False" / f"{row}.png").read_bytes()
    assert result_ids(tmp_path / "True") == result_ids(tmp_path / "False") == ["a", "b", "c"]


def rows(n: int) -> list[batch.Row]:
    return [batch.Row(id=f"r{i}", line=i + 1, prompt="p", model="m", seed=i) for i in range(n)]


def test_writer_keeps_order_and_reports_an_encoding_failure_on_its_row(tmp_path):
    from PIL import Image

    summary = Summary(total=4)
    outputs = Outputs(tmp_path, summary)
    writer = Writer(outputs, depth=1)
    image = Image.new("RGB", (8, 8), "red")
    for row in rows(4):
        if row.id == "r1":
            writer.put(Generated(row, "w", None, {}, 0.1))  # not an image: PNG encoding fails
        elif row.id == "r2":
            writer.put(RowOutcome(row, "w", error="generation failed"))
        else:
            writer.put(Generated(row, "w", image, {"prompt": row.prompt}, 0.1))
    writer.close()
    outputs.close()
    assert (summary.done, summary.failed) == (2, 2)
    assert result_ids(tmp_path) == ["r0", "r3"]
    failures = [json.loads(line) for line in (tmp_path / batch.FAILURES).read_text().splitlines()]
    assert [f["id"] for f in failures] == ["r1", "r2"]
    assert failures[0]["error"].startswith("AttributeError") and failures[1]["error"] == "generation failed"
    assert sorted(p.name for p in tmp_path.glob("*.png")) == ["r0.png", "r3.png"]  # no partial file either


def test_a_write_error_stops_the_run_on_the_generating_thread(tmp_path, monkeypatch):
    from PIL import Image

    outputs = Outputs(tmp_path, Summary(total=200))
    real = outputs.finish

    def finish(outcome):
        if outcome.row.id == "r1":
            raise OSError(28, "No space left on device")
        return real(outcome)

    monkeypatch.setattr(outputs, "finish", finish)
    writer = Writer(outputs, depth=1)
    image = Image.new("RGB", (8, 8))
    with pytest.raises(OSError, match="No space left"):
        for row in rows(200):  # raised at a put once the writer has met the error
            writer.put(Generated(row, "w", image, {}, 0.0))
            time.sleep(0.02)
    with pytest.raises(OSError):
        writer.close()
    outputs.close()
    assert [p.name for p in tmp_path.glob("*.png")] == ["r0.png"]


def test_an_interrupted_run_keeps_generated_rows_and_resumes_the_rest(tmp_path, hello_plugin, monkeypatch):
    prompts = write_rows(tmp_path / "p.jsonl", [{"id": f"r{i}", "prompt": f"row {i}", "seed": i} for i in range(4)])
    defaults = Defaults(model="hello-waves", width=32, height=32)
    real = batch.RowRunner.generate

    def generate(self, row):
        if row.id == "r2":
            raise KeyboardInterrupt
        return real(self, row)

    monkeypatch.setattr(batch.RowRunner, "generate", generate)
    with pytest.raises(KeyboardInterrupt):
        run(prompts, tmp_path / "out", defaults, overlap=True)
    assert result_ids(tmp_path / "out") == ["r0", "r1"]  # queued rows were written before the interrupt ended it
    monkeypatch.setattr(batch.RowRunner, "generate", real)
    summary = run(prompts, tmp_path / "out", defaults, overlap=True)
    assert (summary.skipped, summary.done) == (2, 2)
    assert result_ids(tmp_path / "out") == ["r0", "r1", "r2", "r3"]
