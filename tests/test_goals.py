"""benchmarks/goals.py: the issue-22 goal lines from a GPU run's records and the GPU tests' junit XML."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("goals", ROOT / "benchmarks" / "goals.py")
goals = importlib.util.module_from_spec(spec)
spec.loader.exec_module(goals)

RECORDS = [
    {"section": "e2e", "model": "flux2-klein-4b", "impl": "imagegen", "ms": 250.0, "peak_gb": 17.0},
    {"section": "e2e", "model": "flux2-klein-4b", "impl": "imagegen-cached-prompt", "ms": 230.0},
    {
        "section": "quant",
        "model": "flux2-klein-4b",
        "impl": "imagegen-8bit",
        "quantize": "8",
        "what": "e2e",
        "ms": 280.0,
        "peak_gb": 11.0,
    },
    {
        "section": "quant",
        "model": "flux2-klein-4b",
        "impl": "imagegen-4bit",
        "quantize": "4",
        "what": "e2e",
        "ms": 270.0,
        "peak_gb": 8.2,
    },
    {
        "section": "quant",
        "model": "flux2-klein-4b",
        "impl": "imagegen-4bit",
        "quantize": "4",
        "what": "step",
        "ms": 60.0,
    },
    {"section": "goal", "goal": "VAE decode 1024x1024", "ms": 29.0, "met": True, "t_s": 3.0},
]


def test_quantized_and_end_to_end_goals():
    lines = {line["goal"]: line for line in goals.quant_goals(RECORDS)}
    assert lines["flux2-klein-4b end to end (bf16)"]["met"]
    eight = lines["flux2-klein-4b imagegen-8bit end to end vs bf16"]
    assert eight["ratio"] == 1.12 and eight["met"]
    four = lines["flux2-klein-4b imagegen-4bit end to end vs bf16"]
    assert four["ratio"] == 1.08 and not four["met"]  # fast enough, but over 8 GB
    assert len(lines) == 3
    fp8 = {"section": "quant", "model": "flux2-klein-4b", "impl": "imagegen-fp8", "quantize": "fp8", "what": "e2e"}
    lines = {line["goal"]: line for line in goals.quant_goals([*RECORDS, {**fp8, "ms": 240.0, "psnr_db": 46.9}])}
    assert lines["flux2-klein-4b fp8 end to end faster than bf16"]["met"]
    assert lines["flux2-klein-4b end to end (fp8)"] == {
        "goal": "flux2-klein-4b end to end (fp8)",
        "ms": 240.0,
        "goal_ms": 260.0,
        "psnr_db": 46.9,
        "met": True,
    }


def junit(tmp_path: Path, cases: str) -> Path:
    path = tmp_path / "cuda-tests.xml"
    path.write_text(f'<?xml version="1.0"?><testsuites><testsuite name="pytest">{cases}</testsuite></testsuites>')
    return path


def test_gpu_tests_goal_counts_collection_errors_apart(tmp_path):
    ok = junit(
        tmp_path,
        '<testcase name="a"/><testcase name="b"><skipped/></testcase>'
        '<testcase name="tests.test_server"><error message="collection failure"/></testcase>',
    )
    assert goals.test_goal(ok) == {
        "goal": "pytest -m cuda",
        "passed": 1,
        "failed": 0,
        "skipped": 1,
        "collection_errors": 1,
        "met": True,
    }
    bad = junit(tmp_path, '<testcase name="a"><failure message="assert"/></testcase>')
    assert not goals.test_goal(bad)["met"]
    assert not goals.test_goal(tmp_path / "missing.xml")["met"]


def test_main_prints_and_writes_every_goal(tmp_path, capsys):
    run = tmp_path / "run.jsonl"
    run.write_text("".join(json.dumps(r) + "\n" for r in RECORDS) + "not json\n")
    out = tmp_path / "goals.jsonl"
    goals.main([str(run), "--out", str(out)])
    printed = capsys.readouterr().out.splitlines()
    assert len(printed) == 4 and printed[-1].startswith("GOAL VAE decode 1024x1024: met (ms=29.0")
    assert sum("NOT met" in line for line in printed) == 1
    assert [json.loads(line)["section"] for line in out.read_text().splitlines()] == ["goal"] * 4
