"""Files, metadata and options from the outside: what a reliability probe found (issue 18, items 15-17, 19, 21, 23)."""

from __future__ import annotations

import errno
import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image, PngImagePlugin

from imagegen.image import read_metadata
from imagegen.testing import invoke, one_line_error


@pytest.fixture(autouse=True)
def in_tmp(tmp_path, monkeypatch, hello_plugin):
    monkeypatch.chdir(tmp_path)
    return tmp_path


def png_with(path: Path, text: str) -> Path:
    info = PngImagePlugin.PngInfo()
    info.add_text("imagegen", text)
    Image.new("RGB", (8, 8)).save(path, pnginfo=info)
    return path


# ---- 15: output files honour the umask ------------------------------------------------------------------------
def test_outputs_honour_the_umask(in_tmp):
    from imagegen.batch import run_batch

    old = os.umask(0o022)
    try:
        assert invoke("run", "-m", "hello", "x", "--size", "32x32", "-o", "u.png").exit_code == 0
        (in_tmp / "p.jsonl").write_text('{"prompt": "x", "id": "a", "model": "hello", "size": "32x32"}\n')
        run_batch(in_tmp / "p.jsonl", in_tmp / "out")
    finally:
        os.umask(old)
    for path in (in_tmp / "u.png", in_tmp / "out" / "a.png", in_tmp / "out" / "results.jsonl"):
        assert stat.S_IMODE(path.stat().st_mode) == 0o644, path


# ---- 16: --from never opens what a PNG names -------------------------------------------------------------------
def test_from_uses_the_local_model_and_says_what_the_png_asked_for(in_tmp):
    assert invoke("run", "-m", "hello", "x", "--size", "32x32", "--seed", "3", "-o", "a.png").exit_code == 0
    meta = read_metadata("a.png")
    meta["weights"] = {"source": "evil/repo", "config_sha256": "0"}
    png_with(in_tmp / "b.png", json.dumps(meta))
    result = invoke("run", "--from", "b.png", "-o", "c.png")
    assert result.exit_code == 0, result.output
    assert "made with the weights 'evil/repo'" in result.output and "pass --weights" in result.output
    assert read_metadata("c.png")["weights"]["source"] == "procedural"


def test_from_never_opens_reference_paths_named_in_a_png(in_tmp):
    """Reference images are recorded by file name and content hash; a replay finds them beside the PNG or here,
    by name only, and only with the same content."""
    Image.new("RGB", (32, 32), (200, 10, 10)).save(in_tmp / "red.png")
    made = invoke("run", "-m", "hello-remix", "x", "--image", "red.png", "--size", "32x32", "-o", "e.png")
    assert made.exit_code == 0, made.output
    meta = read_metadata("e.png")
    assert meta["images"] == ["red.png"] and len(meta["inputs"]["red.png"]) == 64
    meta["images"], meta["inputs"] = ["/etc/passwd"], {}  # a path, as a stranger could write it
    png_with(in_tmp / "f.png", json.dumps(meta))
    one_line_error(invoke("run", "--from", "f.png"), "'passwd'", "pass it again")
    assert invoke("run", "--from", "e.png", "-o", "g.png").exit_code == 0
    Image.new("RGB", (32, 32), (0, 0, 200)).save(in_tmp / "red.png")  # same name, other content
    one_line_error(invoke("run", "--from", "e.png", "-o", "h.png"), "'red.png'", "with that content")


@pytest.mark.parametrize(
    "text, fragment",
    [
        ("[1, 2]", "not a JSON object"),
        ("{bad", "not valid JSON"),
        ('{"prompt": "x", "seed": "abc"}', "field 'seed' is not usable"),
        ('{"prompt": "x", "width": true}', "field 'width' is not usable"),
    ],
)
def test_corrupted_metadata_is_one_line(in_tmp, text, fragment):
    png_with(in_tmp / "bad.png", text)
    one_line_error(invoke("run", "--from", "bad.png"), fragment)
    if "seed" not in text and "width" not in text:
        one_line_error(invoke("info", "bad.png"), fragment)


# ---- 17: imagegen info is safe on a terminal and in a pipe ----------------------------------------------------
def test_info_escapes_control_characters(in_tmp):
    prompt = "red\x1b[2J\rwave\x00 \u202eevil"
    assert invoke("run", "-m", "hello", prompt, "--size", "32x32", "-o", "c.png").exit_code == 0
    out = invoke("info", "c.png").stdout
    assert "\x1b" not in out and "\r" not in out and "\x00" not in out and "\u202e" not in out
    assert "red\\x1b[2J\\rwave\\x00 \\u202eevil" in out
    assert "\x1b" not in invoke("info", "c.png", "--json").stdout


def test_info_into_a_closed_pipe_exits_quietly(in_tmp):
    assert invoke("run", "-m", "hello", "x", "--size", "32x32", "-o", "p.png").exit_code == 0
    script = (
        f"import sys; sys.path.insert(0, {str(Path(__file__).parents[1] / 'examples' / 'imagegen-hello')!r});"
        "from imagegen import plugins; import imagegen_hello.plugin as m;"
        "plugins.register_plugin(m, 'hello', 'imagegen-hello', '0.1.0');"
        "from imagegen.cli import main; sys.argv = ['imagegen', 'info', 'p.png']; main()"
    )
    proc = subprocess.run(
        f'{sys.executable} -c "{script}" | head -1', shell=True, capture_output=True, text=True, cwd=in_tmp
    )
    assert proc.stdout.count("\n") == 1 and proc.stderr == "", proc.stderr


# ---- 19: nothing silently ignored -----------------------------------------------------------------------------
def test_size_with_width_or_height_is_refused(in_tmp):
    one_line_error(invoke("run", "-m", "hello", "x", "--size", "32x32", "-W", "64"), "not both")


@pytest.mark.parametrize("name, kind", [("x.jpg", "JPEG"), ("x.jpeg", "JPEG"), ("x.webp", "WEBP"), ("x.PNG", "PNG")])
def test_output_format_follows_the_extension_and_keeps_metadata(in_tmp, name, kind):
    result = invoke("run", "-m", "hello", "fmt", "--size", "32x32", "--seed", "5", "-o", name)
    assert result.exit_code == 0, result.output
    with Image.open(in_tmp / name) as img:
        assert img.format == kind
    meta = read_metadata(in_tmp / name)
    assert meta["prompt"] == "fmt" and meta["seed"] == 5
    again = invoke("run", "--from", name, "-o", "again.png")
    assert again.exit_code == 0, again.output


def test_settings_too_long_for_a_jpeg_are_one_line(in_tmp):
    one_line_error(invoke("run", "-m", "hello", "x" * 70_000, "--size", "32x32", "-o", "long.jpg"), "write a .png")
    assert not list(in_tmp.glob("*.jpg"))


def test_an_unknown_output_extension_is_refused_before_generating(in_tmp):
    one_line_error(invoke("run", "-m", "hello", "x", "--size", "32x32", "-o", "x.gif"), "use a .png, .jpg")
    assert not list(in_tmp.glob("*.gif"))


def test_output_dash_writes_the_png_to_stdout(in_tmp):
    script = (
        f"import sys; sys.path.insert(0, {str(Path(__file__).parents[1] / 'examples' / 'imagegen-hello')!r});"
        "from imagegen import plugins; import imagegen_hello.plugin as m;"
        "plugins.register_plugin(m, 'hello', 'imagegen-hello', '0.1.0');"
        "from imagegen.cli import main; sys.argv = ['imagegen', 'run', '-m', 'hello', 'x', '--size', '32x32',"
        " '--seed', '9', '-o', '-']; main()"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, cwd=in_tmp)
    assert proc.returncode == 0, proc.stderr
    (in_tmp / "s.png").write_bytes(proc.stdout)
    assert read_metadata(in_tmp / "s.png")["seed"] == 9 and b"(seed 9)" in proc.stderr
    one_line_error(invoke("run", "-m", "hello", "x", "--size", "32x32", "-n", "2", "-o", "-"), "--count 1")


def test_quantize_with_the_default_group_size_is_accepted():
    import imagegen

    spec = imagegen.registry.get("flux2-klein-4b")
    assert spec.check_quantize("4@64") == "4" and spec.check_quantize("4@32") == "4@32"


def test_debug_is_accepted_after_the_subcommand(monkeypatch):
    from imagegen.cli import take_debug_flag

    monkeypatch.delenv("IMAGEGEN_DEBUG", raising=False)
    assert take_debug_flag(["run", "x", "--debug"]) == ["run", "x"] and os.environ["IMAGEGEN_DEBUG"] == "1"
    assert take_debug_flag(["run", "--", "--debug"]) == ["run", "--", "--debug"]


@pytest.mark.parametrize(
    "args, fragment", [(["--repeats", "0"], "--repeats must be >= 1"), (["--warmup", "-1"], "--warmup >= 0")]
)
def test_bench_refuses_nonsense_repeats(args, fragment):
    one_line_error(invoke("bench", "-m", "hello", *args), fragment)


# ---- 21: batch ------------------------------------------------------------------------------------------------
def test_batch_accepts_a_bom_and_refuses_ids_differing_by_case_and_huge_steps(in_tmp):
    from imagegen.batch import BatchInputError, read_rows

    (in_tmp / "bom.jsonl").write_bytes('\ufeff{"prompt": "x", "model": "hello"}\n'.encode())
    assert read_rows(in_tmp / "bom.jsonl")[0].prompt == "x"
    (in_tmp / "case.jsonl").write_text('{"prompt": "x", "id": "Cat"}\n{"prompt": "y", "id": "cat"}\n')
    with pytest.raises(BatchInputError, match="line 2: id 'cat' differs only by case from the id on line 1"):
        read_rows(in_tmp / "case.jsonl")
    (in_tmp / "steps.jsonl").write_text('{"prompt": "x", "steps": 100000}\n')
    with pytest.raises(BatchInputError, match="'steps' must be between 1 and 200"):
        read_rows(in_tmp / "steps.jsonl")
    one_line_error(invoke("batch", "bom.jsonl", "-o", "out", "--steps", "5000"), "--steps must be between 1 and 200")


def test_batch_on_a_full_disk_is_a_clear_line_and_a_failure_record(in_tmp, monkeypatch):
    from imagegen import batch
    from imagegen.image import write_atomic

    (in_tmp / "p.jsonl").write_text(
        "".join(json.dumps({"prompt": "x", "id": f"r{i}", "model": "hello", "size": "32x32"}) + "\n" for i in range(3))
    )

    def full(path, data):
        if Path(path).suffix == ".png":
            raise OSError(errno.ENOSPC, "No space left on device")
        return write_atomic(path, data)

    monkeypatch.setattr(batch, "write_atomic", full)
    result = invoke("batch", "p.jsonl", "-o", "out")
    one_line_error(result, "Cannot write", "No space left on device", "Stopped", "re-run to resume")
    failures = [json.loads(line) for line in (in_tmp / "out" / "failures.jsonl").read_text().splitlines()]
    assert [f["id"] for f in failures] == ["r0"] and "No space left" in failures[0]["error"]
    assert not list((in_tmp / "out").glob("*.png"))


# ---- 23: install hints name a distribution that is ours -------------------------------------------------------
def test_install_hints_name_our_distribution_and_survive_rich_markup():
    from imagegen.errors import install_hint

    hint = install_hint("serve")
    assert '"imagegen-mlx[serve]"' in hint and 'pip install -e ".[serve]"' in hint
    for command, extra in (("serve", "ray"), ("batch", "ray"), ("pull", "hub")):
        text = " ".join(invoke(command, "--help").stdout.split())
        assert f"imagegen-mlx[{extra}]" in text, (command, text)
