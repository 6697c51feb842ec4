"""Issue 22's goals, met or not, from the JSON lines of one GPU run (benchmarks/gpu_session.sh) and the junit XML of
`pytest -m cuda`: one `GOAL ... met / NOT met` line each, also written as JSON lines with --out.

    python3 benchmarks/goals.py RUN_DIR/*.jsonl [--junit RUN_DIR/cuda-tests.xml] [--out RUN_DIR/goals.jsonl]

The benchmarks that decide a goal themselves (bench_vae, bench_throughput, bench_cold) emit `section: goal`
records, repeated here; the quantized and end-to-end goals are computed from bench_generate's records."""

from __future__ import annotations

import argparse
import json
import sys
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

QUANT_RATIO = 1.15  # quantized end to end <= this x bf16
FP8_RATIO = 1.0  # the FP8 stretch: faster than bf16
KLEIN_4BIT_GB = 8.0  # 4-bit Klein 4B end to end peak
E2E_MS = {"flux2-klein-4b": 260.0, "zimage-turbo": 800.0}


def read_records(paths: list[Path]) -> list[dict[str, Any]]:
    records = []
    for path in paths:
        for line in path.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(record, dict):
                records.append(record)
    return records


def quant_goals(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Goal 2 (quantized end to end <= 1.15x bf16, 4-bit Klein 4B < 8 GB; fp8 faster than bf16) and goal 5 (end to
    end, in bf16 and with fp8)."""
    bf16 = {r["model"]: r for r in records if r.get("section") == "e2e" and r.get("impl") == "imagegen" and "ms" in r}
    lines = []
    for model, r in bf16.items():
        if model in E2E_MS:
            lines.append(
                {
                    "goal": f"{model} end to end (bf16)",
                    "ms": r["ms"],
                    "goal_ms": E2E_MS[model],
                    "peak_gb": r.get("peak_gb"),
                    "met": r["ms"] <= E2E_MS[model],
                }
            )
    for r in records:
        if r.get("section") != "quant" or r.get("what") != "e2e" or "ms" not in r or r.get("model") not in bf16:
            continue
        base = bf16[r["model"]]
        ratio = r["ms"] / base["ms"]
        line = {
            "goal": f"{r['model']} {r['impl']} end to end vs bf16",
            "ms": r["ms"],
            "bf16_ms": base["ms"],
            "ratio": round(ratio, 3),
            "goal_ratio": QUANT_RATIO,
            "peak_gb": r.get("peak_gb"),
            "bf16_peak_gb": base.get("peak_gb"),
            "met": ratio <= QUANT_RATIO,
        }
        if r["model"] == "flux2-klein-4b" and r.get("quantize") == "4":
            line["goal_peak_gb"] = KLEIN_4BIT_GB
            line["met"] = line["met"] and r.get("peak_gb") is not None and r["peak_gb"] < KLEIN_4BIT_GB
        if r.get("quantize") == "fp8":
            line |= {"goal": f"{r['model']} fp8 end to end faster than bf16", "goal_ratio": FP8_RATIO}
            line["met"] = ratio < FP8_RATIO
            if r["model"] in E2E_MS:
                goal_ms = E2E_MS[r["model"]]
                lines.append(
                    {
                        "goal": f"{r['model']} end to end (fp8)",
                        "ms": r["ms"],
                        "goal_ms": goal_ms,
                        "psnr_db": r.get("psnr_db"),
                        "met": r["ms"] <= goal_ms,
                    }
                )
        lines.append(line)
    return lines


def test_goal(junit: Path) -> dict[str, Any]:
    """Goal 6: the GPU kernel tests ran in this GPU run, and passed."""
    if not junit.is_file():
        return {"goal": "pytest -m cuda", "met": False, "why": f"{junit} missing (pytest not run or not installed)"}
    cases = ET.parse(junit).getroot().iter("testcase")
    counts = {"passed": 0, "failed": 0, "skipped": 0, "collection_errors": 0}
    for case in cases:
        error = case.find("error")
        if error is not None and "collection failure" in (error.get("message") or ""):
            counts["collection_errors"] += 1  # a test module whose packages this machine lacks
        elif case.find("failure") is not None or error is not None:
            counts["failed"] += 1
        else:
            counts["skipped" if case.find("skipped") is not None else "passed"] += 1
    return {"goal": "pytest -m cuda", **counts, "met": counts["passed"] > 0 and not counts["failed"]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("files", nargs="+", type=Path)
    p.add_argument("--junit", type=Path, default=None)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    records = read_records([f for f in args.files if f.is_file() and f != args.out])
    lines = [test_goal(args.junit)] if args.junit else []
    lines += quant_goals(records)
    lines += [
        {k: v for k, v in r.items() if k not in ("section", "t_s")} for r in records if r.get("section") == "goal"
    ]
    for line in lines:
        verdict = "met" if line.get("met") else "NOT met"
        details = ", ".join(f"{k}={v}" for k, v in line.items() if k not in ("goal", "met"))
        print(f"GOAL {line['goal']}: {verdict} ({details})")
    if args.out is not None:
        args.out.write_text("".join(json.dumps({"section": "goal", **line}) + "\n" for line in lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
