"""The package's import graph: no cycles between files and no import of a higher layer.

Layers, bottom up (design notes): structures/errors/config and ops; eval and matching; models
and data; export (wraps models); engine; cli. Every ``import`` counts, also inside functions
and under ``TYPE_CHECKING``: a lazy import is still a dependency.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "detkit"
LAYERS = {
    "detkit": 0,
    "detkit.errors": 0,
    "detkit.files": 0,
    "detkit.structures": 0,
    "detkit.allowlist": 0,
    "detkit.config": 0,
    "detkit.options": 0,
    "detkit.ops": 1,
    "detkit.eval": 2,
    "detkit.matching": 2,
    "detkit.models": 3,
    "detkit.data": 3,
    "detkit.export": 4,
    "detkit.engine": 5,
    "detkit.cli": 6,
    "detkit.testing": 7,  # shared fakes for tests: may use anything
}


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in PACKAGE.rglob("*.py")}


def _resolve(name: str, modules: dict[str, Path]) -> str | None:
    """The module file an imported dotted name lives in (``a.b.C`` -> ``a.b``)."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def _imports(path: Path, modules: dict[str, Path]) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [f"{node.module}.{alias.name}" for alias in node.names]
        else:
            continue
        for name in names:
            if name.startswith("detkit"):
                target = _resolve(name, modules)
                if target is not None:
                    found.add(target)
    return found


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(path, modules) - {name} for name, path in modules.items()}


def _layer(module: str) -> int:
    best = max((k for k in LAYERS if module == k or module.startswith(k + ".")), key=len)
    return LAYERS[best]


def test_every_module_has_a_layer(graph):
    for module in graph:
        assert _layer(module) >= 0


def test_no_module_imports_a_higher_layer(graph):
    upward = [
        f"{source} (layer {_layer(source)}) imports {target} (layer {_layer(target)})"
        for source, targets in graph.items()
        for target in targets
        if _layer(target) > _layer(source)
    ]
    assert not upward, "\n".join(sorted(upward))


def test_no_import_cycles(graph):
    """Tarjan's strongly connected components: any component of two or more files is a cycle
    (a package's ``__init__`` re-exporting its own modules counts only if they import it)."""
    index, low, on_stack, stack, cycles = {}, {}, set(), [], []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in graph.get(node, ()):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    assert not cycles, "\n".join(" <-> ".join(c) for c in cycles)
