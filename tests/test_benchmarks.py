"""The benchmark scripts end to end in their tiny CPU mode (structure and code paths, never speed): every section of
benchmarks/bench_generate.py for FLUX.2 Klein and the transformer-level ones for Z-Image, the report and README
update of benchmarks/report.py, and `imagegen bench` on the checkpoint the script wrote (real and random weights)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

import imagegen.cli.bench  # noqa: F401  (registers the command until imagegen.cli imports it)
from imagegen.cli import get_app

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "benchmarks" / "bench_generate.py"
ALL_SECTIONS = {
    "floor",
    "setup",
    "load",
    "encode",
    "step",
    "scaling",
    "batch",
    "refs",
    "decode",
    "e2e",
    "parity",
    "quant",
    "compile",
}


def bench(tmp: Path, *args: str) -> list[dict]:
    out = tmp / "out.jsonl"
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--tiny", "--workdir", str(tmp / "work"), "--out", str(out), *args],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    printed = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    written = [json.loads(line) for line in out.read_text().splitlines()]
    assert printed == written
    return written


def measured(records: list[dict], section: str, impl: str, **match) -> list[dict]:
    return [
        r
        for r in records
        if r.get("section") == section
        and r.get("impl") == impl
        and "ms" in r
        and all(r.get(k) == v for k, v in match.items())
    ]


@pytest.fixture(scope="module")
def klein(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bench")
    return tmp, bench(tmp, "--models", "flux2-klein-4b", "--quant-modes", "4,nvfp4", "--keep")


def test_every_section_records_every_implementation(klein):
    _, records = klein
    head, done = records[0], records[-1]
    assert head["section"] == "header" and head["device"] and head["versions"]["mlx"] and head["date"]
    assert done["section"] == "done" and done["error_count"] == 0, [r for r in records if "error" in r]
    assert {r["section"] for r in records} >= ALL_SECTIONS
    for r in records[1:-1]:
        assert {"section", "model", "impl", "t_s"} <= set(r), r
        if "ms" in r:
            assert r["ms"] > 0 and len(r["runs_ms"]) == r["repeats"] >= 1

    mflux_missing = any(r.get("impl") == "mflux" and "skipped" in r for r in records)  # CI may lack mflux
    step_impls = {"imagegen", "imagegen-pipeline", "imagegen-eager", "imagegen-paced1", "imagegen-paced4", "diffusers"}
    step_impls |= set() if mflux_missing else {"mflux", "mflux-compile"}
    assert {r["impl"] for r in records if r["section"] == "step" and "ms" in r} == step_impls
    main = measured(records, "step", "imagegen")[0]
    assert (main["size"], main["batch"], main["tokens"]) == ("32x32", 1, "4+32")
    assert main["gflop"] > 0 and main["floor_ms"] > 0 and main["floor_ratio"] > 0
    for impl in ("imagegen", "diffusers"):
        assert {r["size"] for r in measured(records, "scaling", impl)} == {"16x16", "64x64"}
        assert [r["batch"] for r in measured(records, "batch", impl)] == [2]
        assert [r["refs"] for r in measured(records, "refs", impl)] == [1, 2]
        assert measured(records, "decode", impl) and measured(records, "e2e", impl)
        assert measured(records, "encode", impl)
    # the pipeline runs paced every block by default; the other pace is timed as a variant
    assert [r["pace"] for r in measured(records, "e2e", "imagegen")] == [1]
    assert measured(records, "e2e", "imagegen-paced4") and not measured(records, "e2e", "imagegen-paced1")
    assert {r["layers"] for r in measured(records, "encode", "imagegen")} == {"pipeline", "all"}
    assert measured(records, "e2e", "imagegen-cached-prompt")
    compiled = [r for r in records if r["section"] == "compile" and "ms" in r]
    assert {r["what"] for r in compiled} == {"step", "e2e"} and compiled[0]["backend"] == "eager"
    loads = {r["impl"]: r for r in records if r["section"] == "load" and "s" in r}
    assert {"imagegen", "diffusers"} <= set(loads)


def test_parity_and_quantization_compare_against_shared_weights(klein):
    _, records = klein
    parity = {r["what"]: r for r in records if r["section"] == "parity" and r["impl"] == "imagegen-vs-diffusers"}
    assert set(parity) == {
        "transformer step",
        "text encoder hidden state 9",
        "text encoder hidden state 18",
        "text encoder hidden state 27",
        "vae decode",
        "image, same latents",
    }
    # bfloat16 on both sides: loose bounds, yet far below what different weights would give (rel_err ~1)
    for what, r in parity.items():
        if "rel_err" in r:
            assert r["finite"] and r["rel_err"] < 0.1 and r["mean_rel_err"] < 0.05, (what, r)
    assert parity["image, same latents"]["psnr_db"] > 30
    quant = [r for r in records if r["section"] == "quant"]
    assert {r["impl"] for r in quant} == {"imagegen-4bit", "imagegen-nvfp4"}
    for impl in ("imagegen-4bit", "imagegen-nvfp4"):
        whats = {r["what"]: r for r in quant if r["impl"] == impl}
        assert set(whats) == {"load", "step", "e2e"}
        assert whats["e2e"]["psnr_db"] > 20 and whats["e2e"]["vs"].startswith("bfloat16")


def test_report_writes_tables_and_readme_section(klein, tmp_path):
    tmp, _ = klein
    readme = tmp_path / "README.md"
    readme.write_text("# x\n\n## Performance\n\n<!-- bench:start -->\nold\n<!-- bench:end -->\n\n## After\n")

    def report(target: Path) -> subprocess.CompletedProcess:
        return subprocess.run(
            [
                sys.executable,
                str(REPO / "benchmarks" / "report.py"),
                str(tmp / "out.jsonl"),
                "--results-dir",
                str(tmp_path / "results"),
                "--readme",
                str(target),
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )

    done = report(readme)
    assert done.returncode == 0, done.stderr
    (markdown,) = (tmp_path / "results").glob("*.md")
    assert (tmp_path / "results" / f"{markdown.stem}.jsonl").is_file()
    text = markdown.read_text()
    for heading in (
        "One denoise step",
        "Stages at 32x32",
        "Step time by image size",
        "imagegen quantized",
        "Parity with diffusers",
    ):
        assert heading in text, heading
    section = readme.read_text()
    assert "old" not in section and section.endswith("<!-- bench:end -->\n\n## After\n")
    assert "FLUX.2 Klein 4B" in section and f"results/{markdown.name}" in section

    no_markers = tmp_path / "PLAIN.md"
    no_markers.write_text("nothing here\n")
    done = report(no_markers)
    assert done.returncode == 0 and "no <!-- bench:start -->" in done.stdout and "| model |" in done.stdout
    assert no_markers.read_text() == "nothing here\n"


def test_zimage_transformer_sections_and_a_failing_section(tmp_path):
    records = bench(
        tmp_path, "--models", "zimage-turbo", "--sections", "step,batch,decode,parity,quant", "--quant-modes", "nope"
    )
    failed = [r for r in records if "error" in r]
    assert [r["section"] for r in failed] == ["quant"] and "nope" in failed[0]["error"]  # recorded; the run goes on
    assert {"imagegen", "diffusers"} <= {r["impl"] for r in records if r["section"] == "step" and "ms" in r}
    assert [r["batch"] for r in measured(records, "batch", "imagegen")] == [2]
    assert measured(records, "decode", "diffusers") and records[-1]["section"] == "done"
    transformer = [r for r in records if r.get("what") == "transformer step"]
    assert transformer and transformer[0]["rel_err"] < 0.1


def test_budget_skips_sections_that_do_not_fit(tmp_path):
    records = bench(
        tmp_path, "--models", "flux2-klein-4b", "--sections", "floor,step", "--impls", "imagegen", "--budget-s", "0.001"
    )
    assert all("skipped" in r for r in records[1:-1]) and "time budget" in records[1]["skipped"]


def invoke(*args: str):
    return CliRunner().invoke(get_app(), list(args))


@pytest.mark.parametrize("random", [False, True])
def test_imagegen_bench_command(klein, random):
    tmp, _ = klein
    folder = tmp / "work" / "flux2-klein-4b"
    args = [
        "bench",
        "--model",
        "flux2-klein-4b",
        "--weights",
        str(folder),
        "--size",
        "32x32",
        "--repeats",
        "1",
        "--warmup",
        "1",
        "--json",
    ] + (["--random"] if random else [])
    result = invoke(*args)
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in result.output.splitlines() if line.startswith("{")]
    assert [r["stage"] for r in records] == ["load", "encode", "step", "decode", "e2e"]
    assert all(r["model"] == "flux2-klein-4b" and r["random"] is random and r["ms"] > 0 for r in records)
    assert records[-1]["steps"] == 4


def test_imagegen_bench_table_and_errors(klein):
    tmp, _ = klein
    folder = tmp / "work" / "flux2-klein-4b"
    result = invoke(
        "bench",
        "-m",
        "flux2-klein-4b",
        "--weights",
        str(folder),
        "--size",
        "32x32",
        "--repeats",
        "1",
        "--warmup",
        "0",
        "--quantize",
        "4",
    )
    assert result.exit_code == 0, result.output
    lines = result.output.strip().splitlines()
    assert lines[0].startswith("flux2-klein-4b 32x32 bfloat16 4") and [line.split()[0] for line in lines[1:]] == [
        "load",
        "encode",
        "step",
        "decode",
        "e2e",
    ]
    result = invoke("bench", "-m", "flux2-klein-4b", "--weights", str(folder), "--size", "30x30")
    assert result.exit_code == 1 and result.output.startswith("Error:") and "multiple of 16" in result.output


def test_pipeline_profile_times_every_stage(klein):
    """benchmarks/profile_pipeline.py on the kept tiny checkpoint: every stage's wall time (and, on CUDA, its
    kernels' GPU time; here the record says why not)."""
    tmp, _ = klein
    out = tmp / "profile.jsonl"
    script = REPO / "benchmarks" / "profile_pipeline.py"
    folder = tmp / "work" / "flux2-klein-4b"
    args = [sys.executable, str(script), str(folder), "--size", "64", "--repeats", "1", "--out", str(out)]
    done = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    records = [json.loads(line) for line in out.read_text().splitlines()]
    stages = {r["stage"]: r for r in records if r.get("section") == "stage"}
    assert list(stages) == [
        "encode",
        "denoise",
        "vae_decode",
        "host_images",
        "pipeline_decode",
        "generate",
        "encode_new_length",
        "encode_boolean_mask",
    ]
    assert all(r["ms"] > 0 and ("gpu_ms" in r or r["kernels"].startswith("unavailable")) for r in stages.values())
    assert set(records[-1]["ms"]) >= {"encode", "denoise", "decode", "total"}


def _tiny_benchmark(script: str, out: Path, *args: str) -> list[dict]:
    """Run benchmarks/<script> --tiny writing JSON lines to `out`; its records."""
    done = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / script), "--tiny", "--out", str(out), *args],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return [json.loads(line) for line in out.read_text().splitlines()]


def test_controlnet_benchmark_compares_with_diffusers_on_shared_weights(tmp_path):
    """benchmarks/bench_controlnet.py: a step bare and steered (1.0 and 2.1 layouts) in both frameworks, on the same
    weights: the controlled outputs agree (float32 on the CPU)."""
    records = _tiny_benchmark("bench_controlnet.py", tmp_path / "controlnet.jsonl")
    steps = [(r["layout"], r["step"]) for r in records if "step" in r]
    assert steps == [(layout, step) for layout in ("1.0", "2.1") for step in ("bare", "controlnet", "overhead")]
    for record in (r for r in records if r.get("step") == "overhead"):
        assert record["controlled_output_rel_err"] < 1e-4 and record["imagegen"] > 0 and record["diffusers"] > 0


def test_cold_start_benchmark_times_both_frameworks_in_new_processes(tmp_path):
    """benchmarks/bench_cold.py: each framework's import, load, first and second image in fresh processes (tiny
    Klein on the CPU); imagegen's records also split each image by stage."""
    args = ("--runs", "1", "--impls", "imagegen,diffusers", "--workdir", str(tmp_path / "work"))
    records = _tiny_benchmark("bench_cold.py", tmp_path / "cold.jsonl", *args)
    runs = {r["impl"]: r for r in records if r.get("run") == 1}
    assert set(runs) == {"imagegen", "diffusers"}
    for record in runs.values():
        assert "error" not in record and record["load_s"] > 0 and record["second_s"] > 0
    assert set(runs["imagegen"]["first_stages_s"]) == {"encode", "denoise", "decode", "total"}


def test_quant_benchmark_fp8_section(tmp_path):
    """benchmarks/bench_quant.py --sections fp8 in tiny mode: the fp8 layer against the bf16 one per shape and token
    count (the portable path on the CPU: no cuBLASLt, no torch._scaled_mm columns)."""
    records = _tiny_benchmark("bench_quant.py", tmp_path / "quant.jsonl", "--sections", "fp8", "--repeats", "2")
    rows = [r for r in records if r.get("section") == "fp8"]
    assert [r["tokens"] for r in rows] == [8, 32]
    for r in rows:
        assert r["cublaslt"] is False and r["fp8_ms"] > 0 and r["bf16_ms"] > 0 and "torch_scaled_mm_ms" not in r
