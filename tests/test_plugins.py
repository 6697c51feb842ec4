"""Plugin host and registry: entry points, aliases, families, broken and duplicate plugins, allow-list."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import types
import venv
from pathlib import Path

import pytest
from typer.testing import CliRunner

import imagegen
from imagegen import plugins, registry
from imagegen.cli import get_app

ROOT = Path(__file__).resolve().parents[1]


def test_in_tree_plugins_are_found_through_entry_points(fresh_plugins):
    infos = {i.distribution: i for i in plugins.plugin_infos()}
    assert {"imagegen-flux2", "imagegen-zimage"} <= set(infos)
    assert all(i.error is None for i in infos.values())
    assert "register_models" in infos["imagegen-flux2"].hooks


def test_get_resolves_id_alias_and_family(hello_plugin):
    spec = registry.get("hello-waves")
    assert registry.get("hello") is spec  # alias
    assert registry.get("HELLO-WAVES") is spec
    assert spec.plugin == "hello" and spec.family == "hello"
    assert "hello-waves" in [s.id for s in registry.all_specs()]


def test_family_name_resolves_to_default_variant(hello_plugin):
    def two_variants(register):
        load = hello_plugin.load
        register(imagegen.ModelSpec(id="fam-small", family="fam", load=load, needs_weights=False))
        register(imagegen.ModelSpec(id="fam-big", family="fam", load=load, needs_weights=False, family_default=True))

    module = types.SimpleNamespace(register_models=imagegen.hookimpl(two_variants))
    plugins.register_plugin(module, "fam")
    try:
        assert registry.get("fam").id == "fam-big"
    finally:
        plugins.unregister_plugin("fam")


def test_unknown_model_suggests_nearest_names(hello_plugin):
    with pytest.raises(imagegen.UnknownModelError) as e:
        registry.get("hello-wave")
    assert "hello-waves" in e.value.suggestions
    assert "hello-waves" in str(e.value)


def test_unknown_model_in_cli_is_one_line_nonzero(hello_plugin):
    result = CliRunner().invoke(get_app(), ["run", "--model", "helo", "x"])
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and "Unknown model 'helo'" in lines[0] and "hello" in lines[0]
    assert "Traceback" not in result.output


def test_duplicate_model_id_is_a_warning_and_skipped(hello_plugin):
    def again(register):
        register(imagegen.ModelSpec(id="hello-waves", family="copy", load=hello_plugin.load, needs_weights=False))
        register(imagegen.ModelSpec(id="copy-ok", family="copy", load=hello_plugin.load, needs_weights=False))

    plugins.register_plugin(types.SimpleNamespace(register_models=imagegen.hookimpl(again)), "copycat")
    try:
        with pytest.warns(UserWarning, match="copycat.*hello-waves.*already taken"):
            specs = registry.all_specs()
        ids = {s.id: s.plugin for s in specs}
        assert ids["hello-waves"] == "hello" and ids["copy-ok"] == "copycat"
    finally:
        plugins.unregister_plugin("copycat")


def test_plugin_raising_in_register_models_is_reported_not_fatal(hello_plugin):
    def broken(register):
        raise RuntimeError("boom")

    plugins.register_plugin(types.SimpleNamespace(register_models=imagegen.hookimpl(broken)), "broken")
    try:
        with pytest.warns(UserWarning, match="broken.*boom"):
            assert registry.get("hello").id == "hello-waves"
    finally:
        plugins.unregister_plugin("broken")


def _fake_distribution(root: Path, name: str, module_source: str) -> None:
    """A minimal installed distribution on sys.path: a module plus dist-info with an entry point."""
    module = name.replace("-", "_")
    (root / f"{module}.py").write_text(textwrap.dedent(module_source))
    info = root / f"{module}-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[imagegen]\n{module} = {module}\n")


def test_plugin_failing_to_import_warns_and_models_still_work(tmp_path, monkeypatch, fresh_plugins):
    _fake_distribution(tmp_path, "imagegen-broken", "raise ImportError('missing dependency xyz')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    plugins.reset()
    with pytest.warns(UserWarning, match="imagegen-broken.*failed to load.*xyz"):
        infos = {i.distribution: i for i in plugins.plugin_infos()}
    assert "xyz" in infos["imagegen-broken"].error
    assert infos["imagegen-flux2"].error is None
    result = CliRunner().invoke(get_app(), ["plugins", "--json"])
    assert result.exit_code == 0
    rows = {r["distribution"]: r for r in json.loads(result.stdout)}
    assert rows["imagegen-broken"]["error"] and rows["imagegen-zimage"]["error"] is None
    assert CliRunner().invoke(get_app(), ["models", "--json"]).exit_code == 0


def test_load_plugins_allow_list(monkeypatch, fresh_plugins):
    monkeypatch.setenv("IMAGEGEN_LOAD_PLUGINS", "")
    plugins.reset()
    assert plugins.plugin_infos() == []
    monkeypatch.setenv("IMAGEGEN_LOAD_PLUGINS", "imagegen_flux2")
    plugins.reset()
    assert [i.distribution for i in plugins.plugin_infos()] == ["imagegen-flux2"]


def test_example_plugin_pip_installs_into_a_venv_offline(tmp_path):
    """A real third-party install: a new venv, pip install (no network), then the CLI sees the model."""
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=False).create(env_dir)
    python = env_dir / "bin" / "python"
    site = subprocess.check_output(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], text=True
    ).strip()
    # the new venv sees this environment's packages (imagegen, mlx, pip, setuptools) through a .pth file
    outer = [p for p in sys.path if p.endswith("site-packages")]
    Path(site, "outer.pth").write_text("\n".join(outer) + "\n")
    source = shutil.copytree(ROOT / "examples" / "imagegen-hello", tmp_path / "imagegen-hello")  # builds leave files
    subprocess.run(
        [str(python), "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-build-isolation", str(source)],
        check=True,
        env={**os.environ, "PIP_NO_INPUT": "1"},
    )
    run = subprocess.run(
        [str(python), "-m", "imagegen", "models", "--json"], capture_output=True, text=True, check=True
    )
    ids = [r["id"] for r in json.loads(run.stdout)]
    assert "hello-waves" in ids
    out = tmp_path / "wave.png"
    subprocess.run(
        [
            str(python),
            "-m",
            "imagegen",
            "run",
            "--model",
            "hello",
            "a wave",
            "-o",
            str(out),
            "--size",
            "64x64",
            "--seed",
            "5",
        ],
        check=True,
        capture_output=True,
    )
    assert out.stat().st_size > 100
