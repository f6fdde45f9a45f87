"""The package's floors point one way (../shared/DESIGN.md, "Architecture"): no import cycles, and
the pure layers import neither Lightning nor a data module."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "probseg"

PURE_LAYERS = ["probseg._ops", "probseg.losses", "probseg.metrics.functional", "probseg.metrics",
               "probseg.calibration", "probseg.layers"]
FORBIDDEN = ("lightning", "pytorch_lightning", "probseg.data", "probseg.models", "probseg.callbacks")
"""Packages (with their submodules) a pure layer must not import; torchmetrics' own helper package
lightning_utilities is allowed."""


def module_files() -> dict[str, Path]:
    """Dotted module name -> file, for every module of the package."""
    modules = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join(parts)] = path
    return modules


def import_graph() -> dict[str, set[str]]:
    """Edges module -> probseg module it imports, at any depth of the file (lazy imports inside
    functions count: they run), except under ``if TYPE_CHECKING:``."""
    modules = module_files()

    def resolve(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        tree = ast.parse(path.read_text(), str(path))
        typing_only = {
            id(node)
            for block in ast.walk(tree)
            if isinstance(block, ast.If) and "TYPE_CHECKING" in ast.unparse(block.test)
            for node in ast.walk(block)
        }
        targets = set()
        for node in ast.walk(tree):
            if id(node) in typing_only:
                continue
            if isinstance(node, ast.Import):
                targets.update(resolve(alias.name) for alias in node.names if alias.name.startswith("probseg"))
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("probseg"):
                # `from probseg.x import y` imports the module probseg.x.y when y is one, else probseg.x
                targets.update(resolve(f"{node.module}.{alias.name}") for alias in node.names)
        graph[name] = {t for t in targets if t and t != name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a list of modules (first == last), or None; depth-first search."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for target in sorted(graph.get(node, ())):
            if state.get(target) == 1:
                return path[path.index(target):] + [target]
            if target not in state and (cycle := visit(target)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_cycle_finder_finds_a_planted_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert find_cycle(graph) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_import_graph_sees_lazy_imports_and_skips_type_checking_blocks():
    graph = import_graph()
    assert "probseg._ops" in graph["probseg.data.fusion"]
    # probseg/__init__.py imports its submodules lazily, by name strings: no edges.
    assert graph["probseg"] == set()


def test_the_package_has_no_import_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_bottom_floor_imports_nothing_from_probseg():
    assert import_graph()["probseg._ops"] == set()


@pytest.mark.parametrize("module", PURE_LAYERS)
def test_pure_layers_import_neither_lightning_nor_data_modules(module):
    code = (
        f"import sys, json; import {module}; "
        f"print(json.dumps(sorted(m for m in sys.modules if m in {FORBIDDEN!r} "
        f"or m.startswith(tuple(p + '.' for p in {FORBIDDEN!r})))))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert json.loads(result.stdout) == [], f"import {module} pulled in these modules"


def test_the_package_never_imports_pyro():
    """pyro-ppl is a test dependency only (the planar flow's reference in tests/layers/test_flows.py)."""
    code = ("import sys, probseg.models, probseg.layers, probseg.lightning_cli, probseg.sampling; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('pyro', 'pyroapi')))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"
