"""The plugin SDK is what docs/writing-a-plugin.md lists: the in-tree plugins and the example import nothing
else from imagegen, and every listed name exists."""

from __future__ import annotations

import ast
import importlib
import importlib.util
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PLUGIN_SOURCES = [*ROOT.glob("plugins/*/imagegen_*/**/*.py"), *ROOT.glob("examples/*/imagegen_*/**/*.py")]


def documented() -> dict[str, set[str]]:
    """{module: names} from the fenced block under "The SDK on one screen"."""
    text = (ROOT / "docs" / "writing-a-plugin.md").read_text()
    block = re.search(r"## The SDK on one screen.*?```\n(.*?)```", text, re.S).group(1)
    sdk: dict[str, set[str]] = {}
    module = ""
    for line in block.splitlines():
        if line and not line[0].isspace():
            module, *names = line.split()
        else:
            names = line.split()
        sdk.setdefault(module, set()).update(names)
    return sdk


def imported(path: Path) -> set[tuple[str, str]]:
    """(module, name) for each imagegen name a file uses: `from imagegen.x import y` and `imagegen.x.y`."""
    tree = ast.parse(path.read_text())
    modules: dict[str, str] = {}  # local name -> the imagegen module it is
    used: set[tuple[str, str]] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            modules.update({a.asname or a.name: a.name for a in node.names if a.name.split(".")[0] == "imagegen"})
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").split(".")[0] == "imagegen":
            for alias in node.names:
                full = f"{node.module}.{alias.name}"
                if is_module(full):
                    modules[alias.asname or alias.name] = full
                else:
                    used.add((node.module, alias.name))
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in modules:
            module = modules[node.value.id]
            if not is_module(f"{module}.{node.attr}"):
                used.add((module, node.attr))
    return used


def is_module(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:  # the parent is a module, not a package
        return False


def test_plugins_import_only_the_documented_sdk():
    sdk = documented()
    assert PLUGIN_SOURCES
    outside = sorted(
        f"{path.relative_to(ROOT)}: {module}.{name}"
        for path in PLUGIN_SOURCES
        for module, name in imported(path)
        if name not in sdk.get(module, set())
    )
    assert not outside, "not in docs/writing-a-plugin.md's SDK list:\n" + "\n".join(outside)


def test_an_undocumented_import_is_caught(tmp_path):
    plugin = tmp_path / "plugin.py"
    plugin.write_text(
        "import imagegen\nfrom imagegen.pipeline import arrays\nfrom imagegen import scheduler\n"
        "x = imagegen.ModelSpec, imagegen.batch, scheduler.euler_step, scheduler.np\n"
    )
    assert imported(plugin) == {
        ("imagegen.pipeline", "arrays"),
        ("imagegen", "ModelSpec"),
        ("imagegen.scheduler", "euler_step"),
        ("imagegen.scheduler", "np"),
    }


def test_every_documented_name_exists():
    missing = [
        f"{module}.{name}"
        for module, names in documented().items()
        for name in sorted(names)
        if not hasattr(importlib.import_module(module), name)
    ]
    assert not missing, missing
