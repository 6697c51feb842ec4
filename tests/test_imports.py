"""Core modules import in one direction: the graph of their top-level imports has no cycle, an import inside a
function is one of the few listed here (each with its reason), and modules that once formed cycles import alone in a
fresh interpreter."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "imagegen"
FRONT_ENDS = ("imagegen.cli", "imagegen.server", "imagegen.scaleout")  # defer optional extras and start-up cost

# (importer, imported): why the import waits for a call instead of the module's top
LAZY = {
    ("imagegen.plugins", "imagegen.registry"): "the registry is built from the plugins: adding one rebuilds it",
    ("imagegen.image", "imagegen.hub"): "generation_metadata describes a finished run, which is above image.py",
    ("imagegen.image", "imagegen.plugins"): "generation_metadata describes a finished run, which is above image.py",
    ("imagegen.image", "imagegen.request"): "generation_metadata describes a finished run, which is above image.py",
    ("imagegen.options", "imagegen.lora"): "imagegen.lora finds recorded adapter files through options",
    ("imagegen.quantize", "imagegen.nn"): "imagegen.nn imports weights, which imports quantize",
    ("imagegen.quantize", "imagegen.nn.quantized_linear"): "imagegen.nn imports weights, which imports quantize",
    ("imagegen.quantize", "imagegen.nn.fp8_linear"): "imagegen.nn imports weights, which imports quantize",
    ("imagegen.nn.fp8_extension", "imagegen.kernel_cache"): "the file also runs as a build script, imagegen-free",
    ("imagegen.batch", "imagegen.batch_ranks"): "an image over GPUs: batch_ranks runs batch's rows on ranks",
    ("imagegen.batch", "imagegen.scaleout"): "the optional Ray extra",
    ("imagegen.batch", "imagegen.scaleout.batch"): "the optional Ray extra",
    ("imagegen.testing", "imagegen.cli"): "test helpers: the CLI only for the tests that invoke it",
}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in PACKAGE.rglob("*.py")}


def targets(module: str, node: ast.Import | ast.ImportFrom) -> set[str]:
    """The imagegen modules an import statement runs (a package's submodule named in `from . import x` too)."""
    if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
    else:
        package = module.split(".") if MODULES[module].name == "__init__.py" else module.split(".")[:-1]
        base = (
            ".".join(package[: len(package) - node.level + 1] + [node.module or ""]).strip(".")
            if node.level
            else node.module or ""
        )
        names = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]
    found = set()
    for name in names:  # importing a.b.c runs a and a.b first: edges to one's own packages are not cycles
        parts = name.split(".")
        found |= {
            p
            for p in (".".join(parts[:i]) for i in range(1, len(parts) + 1))
            if p in MODULES and p != module and not module.startswith(p + ".")
        }
    return found


def is_type_checking(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)


def imports(module: str) -> tuple[set[str], set[str]]:
    """(imported at the top, imported inside functions); `if TYPE_CHECKING:` blocks are neither."""
    tree = ast.parse(MODULES[module].read_text())
    top: set[str] = set()
    lazy: set[str] = set()

    def visit(node: ast.AST, in_function: bool) -> None:
        if is_type_checking(node):
            return
        if isinstance(node, ast.Import | ast.ImportFrom):
            (lazy if in_function else top).update(targets(module, node))
        for child in ast.iter_child_nodes(node):
            visit(child, in_function or isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda))

    visit(tree, False)
    return top, lazy


def cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of the graph as a path that returns to its start, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def walk(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state and (found := walk(nxt)):
                return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := walk(node)):
            return found
    return None


def test_top_level_imports_have_no_cycle():
    graph = {m: imports(m)[0] for m in MODULES}
    assert cycle(graph) is None, " -> ".join(cycle(graph))


def test_the_cycle_finder_finds_one():
    assert cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert cycle({"a": {"b"}, "b": set()}) is None


def test_imports_inside_functions_are_the_listed_ones():
    lazy = {(m, target) for m in MODULES if not m.startswith(FRONT_ENDS) for target in imports(m)[1]}
    assert lazy == set(LAZY), f"unlisted: {sorted(lazy - set(LAZY))}; listed but gone: {sorted(set(LAZY) - lazy)}"


@pytest.mark.parametrize(
    "module",
    [
        "imagegen.registry",
        "imagegen.pipeline",
        "imagegen.hub",
        "imagegen.plugins",
        "imagegen.image",
        "imagegen.options",
        "imagegen.batch",
    ],
)
def test_imports_alone_in_a_fresh_interpreter(module):
    done = subprocess.run([sys.executable, "-c", f"import {module}"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
