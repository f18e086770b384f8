"""The import graph of the three packages: one-way layers, no cycles, no private names taken from
another module. A lazy import counts like any other: one written to dodge a cycle is a cycle."""

import ast
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ("cluster", "tuning", "trainers")
LAYER = {"cluster": 2, "tuning": 1, "trainers": 0}  # imports may only point down


def _modules() -> dict[str, str]:
    found = {}
    for package in PACKAGES:
        for folder, _, files in os.walk(os.path.join(ROOT, package)):
            for name in files:
                if name.endswith(".py"):
                    path = os.path.join(folder, name)
                    dotted = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
                    found[dotted.removesuffix(".__init__")] = path
    return found


MODULES = _modules()


def _imports(module: str) -> list[tuple[str, str | None]]:
    """(imported project module, name taken from it or None) for every import in `module`."""
    tree = ast.parse(open(MODULES[module]).read())
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(a.name, None) for a in node.names if a.name in MODULES]
        elif isinstance(node, ast.ImportFrom) and node.module in MODULES and node.level == 0:
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                out.append((sub, None) if sub in MODULES else (node.module, alias.name))
    return out


GRAPH = {m: sorted({target for target, _ in _imports(m)} - {m}) for m in MODULES}


def test_imports_flow_down_the_layers():
    upward = [f"{m} -> {t}" for m, targets in GRAPH.items() for t in targets
              if LAYER[t.split(".")[0]] > LAYER[m.split(".")[0]]]
    assert upward == []


def test_no_import_cycles():
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    cycles = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in GRAPH[node]:
            if state.get(nxt) == 1:
                cycles.append(" -> ".join(path[path.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for module in sorted(MODULES):
        if module not in state:
            visit(module, [module])
    assert cycles == []


@pytest.mark.parametrize("package", PACKAGES)
def test_no_private_name_is_imported_from_another_module(package):
    private = [f"{m}: from {source} import {name}"
               for m in MODULES if m.split(".")[0] == package
               for source, name in _imports(m)
               if name and name.startswith("_") and not name.startswith("__")]
    assert private == []
