"""Imports go one way: no cycle between the library's modules, no backend importing another, nothing in the
library importing `saferollout.cli` (only the CLI itself and the `python -m` entry points may).

The imports are read from the source with `ast` (every import statement, also those inside functions), so a
lazy import that closes a cycle is caught as well as a top-level one.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

LIB = Path(__file__).resolve().parents[1] / "lib"
PACKAGE = "saferollout"
BACKENDS = ("saferollout.backends.local", "saferollout.backends.azure")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(LIB).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(path): path for path in sorted((LIB / PACKAGE).rglob("*.py"))}


def imported(module: str) -> set[str]:
    """The library modules `module` imports (a `from package import name` counts as the submodule `name`
    when there is one, else as the package)."""
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the package, up `level - 1` packages
                parent = package.split(".")[:len(package.split(".")) - (node.level - 1)]
                base = ".".join(parent + ([base] if base else []))
            found.update(f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base for alias in node.names)
    return {name for name in found if name in MODULES and name != module}


GRAPH = {module: imported(module) for module in MODULES}


def is_entry_point(module: str) -> bool:
    return module == "saferollout.cli" or module.startswith("saferollout.cli.") or module.endswith(".__main__")


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph[node]):
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
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_the_import_reader_sees_the_imports_it_is_meant_to_forbid():
    assert "saferollout.backends.query" in GRAPH["saferollout.backends.azure.metrics"]
    assert "saferollout.rollout" in GRAPH["saferollout.cli.rollout"]
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_cycle_between_library_modules():
    assert cycles(GRAPH) == []


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_backend_imports_another(backend):
    others = [b for b in BACKENDS if b != backend]
    wrong = {module: sorted(t for t in targets if any(t == o or t.startswith(o + ".") for o in others))
             for module, targets in GRAPH.items() if module == backend or module.startswith(backend + ".")}
    assert {module: targets for module, targets in wrong.items() if targets} == {}


def test_nothing_in_the_library_imports_the_cli():
    importers = sorted(module for module, targets in GRAPH.items() if not is_entry_point(module)
                       and any(t == "saferollout.cli" or t.startswith("saferollout.cli.") for t in targets))
    assert importers == []
