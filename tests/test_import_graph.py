"""The package's own imports run one way: no module of pitchkeras/, server/ or client/ imports itself in a circle.

The graph is read from the source (no import runs): every `import` and `from ... import` of our own modules,
at the top of a module or hidden inside a function, is an edge. `from package import name` is an edge to the
submodule `name` where one exists, else to the package. A package's own `__init__` is not an edge of its
submodules (Python imports it first, but it is not a dependency the submodule chose).
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Source folder -> the package it installs as (setup.cfg's package_dir).
PACKAGES = {"pitchkeras": "pitchkeras", "server": "pitchkeras.server", "client": "pitchkeras.client"}


def modules() -> dict[str, Path]:
    """{dotted module name: source file} of every module we ship."""
    found = {}
    for folder, package in PACKAGES.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            parts = list(path.relative_to(ROOT / folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join([package, *parts])] = path
    return found


def _resolve(module: str, level: int, current: str, is_package: bool) -> str:
    if not level:
        return module
    base = current.split(".")
    base = base[: len(base) - level + (1 if is_package else 0)]
    return ".".join(base + ([module] if module else []))


def imports_of(name: str, path: Path, known: dict) -> set[str]:
    """Our own modules that `name` imports anywhere in its source."""
    targets = set()
    is_package = path.name == "__init__.py"
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            targets.update(alias.name for alias in node.names if alias.name in known)
        elif isinstance(node, ast.ImportFrom):
            source = _resolve(node.module or "", node.level, name, is_package)
            for alias in node.names:
                if f"{source}.{alias.name}" in known:
                    targets.add(f"{source}.{alias.name}")
                elif source in known:
                    targets.add(source)
    targets.discard(name)
    return targets


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(node):
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph.get(node, ())):
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


def _graph() -> dict[str, set[str]]:
    known = modules()
    return {name: imports_of(name, path, known) for name, path in known.items()}


def test_the_graph_is_read_from_every_package():
    graph = _graph()
    assert {"pitchkeras.train.finetuning", "pitchkeras.server.app", "pitchkeras.client.review_client",
            "pitchkeras.io"} <= set(graph)
    assert "pitchkeras.train.config" in graph["pitchkeras.train.finetuning"]
    assert "pitchkeras.io" in graph["pitchkeras.model"]


def test_the_cycle_finder_finds_a_circle_through_a_function_level_import():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(graph) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycle():
    graph = _graph()
    found = cycles(graph)
    described = []
    for component in found:
        edges = [f"{a} -> {b}" for a in component for b in sorted(graph[a]) if b in component]
        described.append("; ".join(edges))
    assert not found, "import cycles:\n" + "\n".join(described)
