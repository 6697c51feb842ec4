"""Turn bench_generate.py's JSON lines into benchmarks/results/<date>-<device>.md (plus a copy of the JSON lines), and
regenerate README's performance section between <!-- bench:start --> and <!-- bench:end -->.

    python3 benchmarks/report.py results.jsonl [more.jsonl ...] [--readme README.md] [--results-dir DIR]"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
START, END = "<!-- bench:start -->", "<!-- bench:end -->"
NAMES = {"flux2-klein-4b": "FLUX.2 Klein 4B", "flux2-klein-9b": "FLUX.2 Klein 9B", "zimage-turbo": "Z-Image Turbo"}
STEP_IMPLS = (
    "imagegen",
    "imagegen-paced1",
    "imagegen-paced2",
    "imagegen-paced4",
    "imagegen-pipeline",
    "imagegen-eager",
    "diffusers",
    "diffusers-compile",
    "mflux",
    "mflux-compile",
)
PIPELINE_DEFAULT = "imagegen-paced1"  # how the pipelines run the transformer (imagegen.nn.pacing)
Record = dict[str, Any]


def read(paths: Iterable[Path]) -> list[Record]:
    records = []
    for path in paths:
        for line in Path(path).read_text().splitlines():
            line = line.strip()
            if line.startswith("{"):
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError:
                    continue  # a line cut off by a killed run
    return records


def find(records: list[Record], **match: Any) -> Record | None:
    """The last record with every given field equal (and a measurement: no error, not skipped)."""
    hits = [
        r for r in records if all(r.get(k) == v for k, v in match.items()) and "error" not in r and "skipped" not in r
    ]
    return hits[-1] if hits else None


def ms(r: Record | None, peak: bool = False) -> str:
    if r is None or r.get("ms") is None:
        return "—"
    text = f"{r['ms']:.0f}" if r["ms"] >= 100 else f"{r['ms']:.1f}"
    if peak and r.get("peak_gb") is not None:
        text += f" ({r['peak_gb']:.1f} GB)"
    return text


def ratio(a: Record | None, b: Record | None) -> str:
    if a is None or b is None or not a.get("ms") or not b.get("ms"):
        return "—"
    return f"{a['ms'] / b['ms']:.2f}x"


def table(head: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(head) + " |", "|" + "---|" * len(head), *("| " + " | ".join(r) + " |" for r in rows)]


def models(records: list[Record]) -> list[str]:
    return list(dict.fromkeys(r["model"] for r in records if r.get("model") not in (None, "-")))


def step_record(records: list[Record], model: str, impl: str) -> Record | None:
    if impl == "diffusers-compile":
        return find(records, section="compile", model=model, impl=impl, what="step")
    return find(records, section="step", model=model, impl=impl)


def model_section(records: list[Record], model: str) -> list[str]:
    main = find(records, section="step", model=model, impl="imagegen") or {}
    size, tokens = main.get("size", "1024x1024"), main.get("tokens", "")
    out = [f"## {NAMES.get(model, model)} (`{model}`)", ""]

    base = step_record(records, model, "diffusers")
    rows = []
    for impl in STEP_IMPLS:
        r = step_record(records, model, impl)
        if r is None:
            continue
        floor = f"{r['floor_ratio']:.2f}x" if r.get("floor_ratio") else "—"
        tflops = f"{r['tflops']:.0f}" if r.get("tflops") else "—"
        peak = "—" if r.get("peak_gb") is None else f"{r['peak_gb']:.1f}"
        rows.append([impl, ms(r), ratio(r, base), tflops, floor, peak])
    if rows:
        floor_ms = main.get("floor_ms")
        note = f"; hardware floor {floor_ms:.1f} ms" if floor_ms else ""
        out += [f"### One denoise step, {size} ({tokens.replace('+', ' image + ')} text tokens{note})", ""]
        out += table(["implementation", "ms", "vs diffusers eager", "TFLOP/s", "vs floor", "peak GB"], rows) + [""]

    def cell(section: str, impl: str, **match: Any) -> str:
        return ms(find(records, section=section, model=model, impl=impl, **match), peak=True)

    def load(impl: str) -> str:
        r = find(records, section="load", model=model, impl=impl)
        return f"{r['s']:.1f} s" if r and r.get("s") is not None else "—"

    e2e = find(records, section="e2e", model=model, impl="imagegen") or {}
    steps = e2e.get("steps", "default")
    stage_rows = [
        ["load (s)", load("imagegen"), load("diffusers"), "—", load("mflux")],
        ["text encode", cell("encode", "imagegen", layers="pipeline"), cell("encode", "diffusers"), "—", "—"],
        ["text encode, all layers", cell("encode", "imagegen", layers="all"), cell("encode", "diffusers"), "—", "—"],
        [
            "denoise step",
            cell("step", "imagegen"),
            cell("step", "diffusers"),
            ms(step_record(records, model, "diffusers-compile"), True),
            cell("step", "mflux-compile"),
        ],
        ["VAE decode", cell("decode", "imagegen"), cell("decode", "diffusers"), "—", cell("decode", "mflux")],
        [
            f"end to end ({steps} steps)",
            cell("e2e", "imagegen"),
            cell("e2e", "diffusers"),
            cell("compile", "diffusers-compile", what="e2e"),
            "—",
        ],
        ["end to end, prompt cached", cell("e2e", "imagegen-cached-prompt"), "—", "—", "—"],
    ]
    if step_record(records, model, PIPELINE_DEFAULT):
        stage_rows[4:4] = [
            ["denoise step, paced (the pipelines' default)", cell("step", PIPELINE_DEFAULT), "—", "—", "—"]
        ]
    out += [f"### Stages at {size}: ms (peak GB)", ""]
    out += table(["stage", "imagegen", "diffusers", "diffusers compiled", "mflux"], stage_rows) + [""]

    shapes = [
        r for r in records if r.get("model") == model and r.get("section") in ("scaling", "batch", "refs") and "ms" in r
    ]
    keys = list(dict.fromkeys((r["size"], r["batch"], r["refs"], r["tokens"]) for r in shapes))
    main_key = (size, 1, 0, tokens)
    if keys:
        rows = []
        for key in sorted({main_key, *keys}, key=lambda k: (k[2], k[1], int(k[0].split("x")[0]))):
            match = dict(zip(("size", "batch", "refs"), key[:3]))
            cells = []
            for impl in ("imagegen", "diffusers", "mflux-compile"):
                pool = [
                    r
                    for r in records
                    if r.get("model") == model
                    and r.get("impl") == impl
                    and "ms" in r
                    and r.get("section") in ("step", "scaling", "batch", "refs")
                    and all(r.get(k) == v for k, v in match.items())
                ]
                cells.append(ms(pool[-1] if pool else None))
            label = f"{key[0]}, batch {key[1]}" + (f", {key[2]} reference image(s)" if key[2] else "")
            rows.append([label, key[3], *cells])
        out += ["### Step time by image size, batch and reference images (ms)", ""]
        out += table(["shape", "tokens (image+text)", "imagegen", "diffusers", "mflux compiled"], rows) + [""]

    quant = [r for r in records if r.get("model") == model and r.get("section") == "quant"]
    modes = list(dict.fromkeys(r["impl"] for r in quant))
    if modes:
        rows = [["bfloat16", load("imagegen"), cell("step", "imagegen"), cell("e2e", "imagegen"), "reference"]]
        for impl in modes:
            loaded = find(quant, impl=impl, what="load")
            run = find(quant, impl=impl, what="e2e")
            compared = [r for r in quant if r.get("impl") == impl and "psnr_db" in r]  # runs with a bf16 image
            diff = (
                f"PSNR {compared[-1]['psnr_db']:.1f} dB, mean abs {compared[-1]['pixel_mean_abs']:.1f}"
                if compared
                else "—"
            )
            rows.append(
                [
                    impl.removeprefix("imagegen-"),
                    f"{loaded['s']:.1f} s" if loaded else "—",
                    ms(find(quant, impl=impl, what="step"), True),
                    ms(run, True),
                    diff,
                ]
            )
        out += ["### imagegen quantized: load, step and end to end (peak GB), image vs bfloat16 (same seed)", ""]
        out += table(["weights", "load", "step ms", "end to end ms", "image difference"], rows) + [""]

    parity = list(
        {
            r["what"]: r
            for r in records
            if r.get("model") == model and r.get("section") == "parity" and "what" in r and r.get("impl") != "imagegen"
        }.values()
    )  # the latest of each output
    if parity:
        rows = []
        for r in parity:
            if "rel_err" in r:
                rows.append([r["what"], f"{r['rel_err']:.2e}", f"{r['mean_rel_err']:.2e}"])
            elif "psnr_db" in r:
                rows.append(
                    [
                        r["what"],
                        f"max {r['pixel_max_abs']:.0f}/255",
                        f"mean {r['pixel_mean_abs']:.2f}/255, PSNR {r['psnr_db']:.1f} dB",
                    ]
                )
        out += ["### Parity with diffusers / transformers (identical weights and inputs, bfloat16)", ""]
        out += table(["output", "max rel. error", "mean rel. error"], rows) + [""]
    return out


def with_floor(records: list[Record]) -> list[Record]:
    """Give every step record its floor (its FLOPs at the measured MLX GEMM rate), also records of runs that
    did not measure the rate themselves."""
    rate = find(records, section="floor", impl="mlx")
    if rate is None or not rate.get("tflops"):
        return records
    out = []
    for r in records:
        if r.get("gflop") and r.get("ms") and not r.get("floor_ms"):
            floor_ms = r["gflop"] / rate["tflops"]  # GFLOP / (TFLOP/s) = ms
            r = {**r, "floor_ms": round(floor_ms, 1), "floor_ratio": round(r["ms"] / floor_ms, 3)}
        out.append(r)
    return out


def problems(records: list[Record]) -> list[str]:
    lines = []
    for i, r in enumerate(records):
        later = [
            x
            for x in records[i + 1 :]
            if "error" not in x
            and "skipped" not in x
            and all(x.get(k) == r.get(k) for k in ("model", "section", "impl", "what") if k in r)
        ]
        if ("error" in r or "skipped" in r) and not later:
            what = " ".join(str(r.get(k)) for k in ("model", "section", "impl") if r.get(k))
            lines.append(f"- {what}: {'error: ' + r['error'] if 'error' in r else 'skipped: ' + r['skipped']}")
    return lines


def render(records: list[Record]) -> str:
    head = find(records, section="header") or {}
    v = head.get("versions", {})
    version = ", ".join(
        f"{k} {v[k]}" for k in ("mlx", "torch", "diffusers", "transformers", "mflux", "imagegen") if v.get(k)
    )
    args = head.get("args", {})
    out = [
        f"# imagegen benchmarks: {head.get('device', 'unknown device')}, {head.get('date', '')[:10]}",
        "",
        f"{version}. Random weights in the real configs, bfloat16; median of {args.get('repeats', '?')} runs "
        f"after {args.get('warmup', '?')} warm-ups ({args.get('e2e_repeats', '?')} for end to end). Peak memory "
        "is the allocator's peak during the timed runs, weights included, in GB (10^9 bytes). "
        "Produced by `benchmarks/bench_generate.py`, rendered by `benchmarks/report.py`.",
        "",
    ]
    gemm = find(records, section="floor", impl="mlx")
    if gemm:
        torch_gemm = find(records, section="floor", impl="torch")
        extra = f" (torch: {torch_gemm['tflops']:.0f})" if torch_gemm else ""
        out += [
            f"Hardware floor: a step's matmul and attention FLOPs at the measured MLX bf16 GEMM rate, "
            f"{gemm['tflops']:.0f} TFLOP/s at {gemm['shape']}{extra}.",
            "",
        ]
    for model in models(records):
        out += model_section(records, model)
    issues = problems(records)
    if issues:
        out += ["## Not measured", "", *issues, ""]
    return "\n".join(out)


def readme_section(records: list[Record], results: str) -> str:
    head = find(records, section="header") or {}
    rows = []
    for model in models(records):

        def get(impl: str, model: str = model) -> Record | None:
            return step_record(records, model, impl)

        ours, e2e = get("imagegen"), find(records, section="e2e", model=model, impl="imagegen")
        floor = f"{ours['floor_ratio']:.2f}x" if ours and ours.get("floor_ratio") else "—"
        rows.append(
            [
                NAMES.get(model, model),
                ms(ours),
                ms(get("diffusers")),
                ms(get("diffusers-compile")),
                ms(get("mflux-compile")),
                floor,
                ms(e2e, True),
                ms(find(records, section="e2e", model=model, impl="diffusers"), True),
            ]
        )
    lines = [
        f"One denoise step at 1024x1024 and end to end, bfloat16, on {head.get('device', '?')} "
        f"({head.get('date', '')[:10]}); ms, peak GB in brackets. Full tables: [{results}]({results}).",
        "",
    ]
    lines += table(
        [
            "model",
            "imagegen step",
            "diffusers",
            "diffusers compiled",
            "mflux compiled",
            "vs floor",
            "imagegen end to end",
            "diffusers end to end",
        ],
        rows,
    )
    return "\n".join(lines)


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "device"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("inputs", nargs="+", type=Path, help="JSON-lines files from bench_generate.py")
    p.add_argument("--results-dir", type=Path, default=HERE / "results")
    p.add_argument("--readme", type=Path, default=None, help="README to update between the bench markers")
    args = p.parse_args(argv)
    records = with_floor(read(args.inputs))
    head = find(records, section="header")
    if head is None:
        print("no header record in the input", file=sys.stderr)
        return 1
    stem = f"{head['date'][:10]}-{slug(head['device'])}"
    args.results_dir.mkdir(parents=True, exist_ok=True)
    markdown = args.results_dir / f"{stem}.md"
    markdown.write_text(render(records) + "\n")
    (args.results_dir / f"{stem}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    print(f"wrote {markdown}")
    if args.readme is not None:
        readme = args.readme.resolve()
        try:
            link = markdown.resolve().relative_to(readme.parent).as_posix()
        except ValueError:
            link = markdown.as_posix()
        section = readme_section(records, link)
        text = readme.read_text() if readme.is_file() else ""
        if START in text and END in text and text.index(START) < text.index(END):
            before, rest = text.split(START, 1)
            after = rest.split(END, 1)[1]
            readme.write_text(f"{before}{START}\n{section}\n{END}{after}")
            print(f"updated {readme}")
        else:
            print(f"{readme} has no {START} ... {END} markers; the section is:\n\n{section}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
