"""The house's layers: every import in the package points down the layer table, and no modules
import each other in a circle. Read from the source (ast), so an import inside a function counts
too; the entry points (train.py, serve.py) and bench/ sit on top and may import anything."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "moela"

# Each folder of moela/ and the folders it may import (besides itself). Bottom to top: configs ->
# kernels -> model -> parallel -> data -> training, inference -> the entry layer. The model reaches
# the mesh only through the Partitioner interface it defines (moela.model.runtime), which
# parallel implements; data needs no model.
LAYERS: dict[str, set[str]] = {
    "compat": set(),  # moela/compat.py: what differs between JAX releases; importable from every layer
    "configs": set(),
    "kernels": {"configs"},
    "model": {"configs", "kernels"},
    "parallel": {"configs", "kernels", "model"},
    "data": {"configs"},
    "training": {"configs", "kernels", "model", "parallel", "data"},
    "inference": {"configs", "kernels", "model", "parallel", "data"},
    "planner": {"configs", "kernels", "model", "parallel", "data", "training"},
    "scaling": {"configs", "kernels", "model", "parallel", "data", "training"},
    "cli": {"configs", "kernels", "model", "parallel", "data", "training", "inference"},
}
for _allowed in LAYERS.values():
    _allowed.add("compat")
LAYERS["compat"].discard("compat")


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imports(path: Path) -> list[tuple[str, int]]:
    """(module imported, line) for every ``moela`` import in the file. ``from moela.x import y``
    names the submodule ``moela.x.y`` when there is one, else the package ``moela.x``."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names if alias.name.split(".")[0] == "moela"]
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "moela":
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                found.append((sub if sub in MODULES else node.module, node.lineno))
    return found


def folder(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None


def test_every_folder_is_in_the_layer_table():
    folders = {folder(m) for m in MODULES} - {None}
    assert folders == set(LAYERS), f"add to (or remove from) LAYERS: {sorted(folders ^ set(LAYERS))}"


def test_imports_point_down_the_layers():
    upward = []
    for module, path in MODULES.items():
        here = folder(module)
        for target, line in imports(path):
            there = folder(target)
            if there is None and target != "moela":
                continue
            if here is None or there == here:
                continue
            if there is None or there not in LAYERS[here]:
                upward.append(
                    f"{path.relative_to(ROOT)}:{line} imports {target} "
                    f"({here} may import only {sorted(LAYERS[here]) or 'nothing of moela'})"
                )
    assert not upward, "imports that run up (or across) the layers:\n" + "\n".join(upward)


def test_no_module_imports_itself_in_a_circle():
    graph = {m: sorted({t for t, _ in imports(p) if t in MODULES and t != m}) for m, p in MODULES.items()}
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    cycles = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in graph[node]:
            if state.get(nxt) == 1:
                cycle = path[path.index(nxt) :] + [nxt]
                cycles.append(" -> ".join(str(MODULES[m].relative_to(ROOT)) for m in cycle))
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for module in graph:
        if module not in state:
            visit(module, [module])
    assert not cycles, "modules that import each other in a circle:\n" + "\n".join(cycles)


@pytest.mark.parametrize(
    "source,target,ok",
    [
        ("model", "parallel", False),
        ("parallel", "model", True),
        ("configs", "scaling", False),
        ("kernels", "configs", True),
    ],
)
def test_the_table_says_what_the_design_says(source, target, ok):
    """A few decisions spelled out, so that a change to the table is a change someone meant."""
    assert (target in LAYERS[source]) is ok
