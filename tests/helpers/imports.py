"""The import graph of capstriton's modules, read from the source (ast, nothing imported):
every ``import`` / ``from ... import`` in a module, at any depth (one placed inside a function
counts too), as an edge to the capstriton module it names."""
from __future__ import annotations

import ast
from pathlib import Path

from tests.helpers import REPO

# package name -> its folder (the kernels install as capstriton.kernels)
PACKAGES = {"capstriton": "capstriton", "capstriton.kernels": "kernels"}


def module_files(root: Path = REPO) -> dict[str, Path]:
    """{dotted module name: file} for every module of the installed packages."""
    modules = {}
    for package, folder in PACKAGES.items():
        for path in sorted((root / folder).rglob("*.py")):
            parts = list(path.relative_to(root / folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            modules[".".join([package, *parts])] = path
    return modules


def _resolve(module: str, is_package: bool, level: int, name: str | None) -> str:
    base = module.split(".") if is_package else module.split(".")[:-1]
    if level > 1:
        base = base[: len(base) - (level - 1)]
    return ".".join(base + ([name] if name else []))


def import_graph(root: Path = REPO) -> dict[str, set[str]]:
    """{module: the capstriton modules it imports}."""
    files = module_files(root)
    graph: dict[str, set[str]] = {}
    for module, path in files.items():
        edges = graph.setdefault(module, set())
        is_package = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                source = _resolve(module, is_package, node.level, node.module) if node.level else node.module
                # `from package import submodule` names the submodule; other names, their module
                targets = [f"{source}.{a.name}" if f"{source}.{a.name}" in files else source for a in node.names]
            edges.update(t for t in targets if t in files and t != module)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, found, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def longest_chain(graph: dict[str, set[str]]) -> list[str]:
    """The longest import chain a -> b -> ... of an acyclic graph."""
    best: dict[str, list[str]] = {}

    def chain(v):
        if v not in best:
            best[v] = [v]
            tails = [chain(w) for w in sorted(graph.get(v, ()))]
            best[v] = [v] + max(tails, key=len, default=[])
        return best[v]

    return max((chain(v) for v in sorted(graph)), key=len)
