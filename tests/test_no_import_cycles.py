"""No import circles in ``src/attnkit``: every import points down, no module imports one that imports it back.

Imports are read from the source (``ast``), not executed: at module level (including inside
top-level ``if``/``try``, excluding ``if TYPE_CHECKING:``) and, separately, anywhere (deferred imports
inside functions hide a circle instead of removing it). ``from package import name`` counts as an
import of ``package.name`` only when ``package/__init__.py`` does not itself bind ``name``.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import attnkit

SRC = Path(attnkit.__file__).resolve().parent.parent


def _modules(root: Path) -> dict[str, Path]:
    modules = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def _bound(tree: ast.Module) -> set[str]:
    """Names a package ``__init__`` binds at top level (so ``from package import name`` reads them)."""
    names: set[str] = set()
    for node in tree.body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names |= {(alias.asname or alias.name).split(".")[0] for alias in node.names}
        elif isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.Assign):
            names |= {target.id for target in node.targets if isinstance(target, ast.Name)}
    return names


def _is_type_checking(node: ast.AST) -> bool:
    test = getattr(node, "test", None)
    return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(test)


def _top_level(tree: ast.Module) -> list[ast.AST]:
    nodes: list[ast.AST] = []
    for node in tree.body:
        if isinstance(node, (ast.If, ast.Try)) and not _is_type_checking(node):
            nodes += [child for child in ast.walk(node) if not isinstance(child, (ast.FunctionDef, ast.ClassDef))]
        else:
            nodes.append(node)
    return nodes


def _from_target(modules: dict[str, Path], bound: dict[str, set[str]], base: str, name: str) -> str:
    """What ``from base import name`` loads: the submodule ``base.name`` unless ``base/__init__`` binds ``name``."""
    submodule = f"{base}.{name}"
    return submodule if submodule in modules and name not in bound.get(base, ()) else base


def import_graph(root: Path, *, anywhere: bool) -> dict[str, dict[str, int]]:
    """module -> {imported module: line} for the modules under ``root`` (a package folder)."""
    modules = _modules(root)
    trees = {name: ast.parse(path.read_text(), str(path)) for name, path in modules.items()}
    bound = {name: _bound(trees[name]) for name, path in modules.items() if path.name == "__init__.py"}
    graph: dict[str, dict[str, int]] = {name: {} for name in modules}
    for name, tree in trees.items():
        package = name if modules[name].name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(tree) if anywhere else _top_level(tree):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(parts + ([base] if base else []))
                targets = [_from_target(modules, bound, base, alias.name) for alias in node.names]
            else:
                continue
            for target in targets:
                if target in modules and target != name:
                    graph[name].setdefault(target, node.lineno)
    return graph


def cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """Strongly connected groups of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for other in graph[node]:
            if other not in index:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            group = []
            while True:
                other = stack.pop()
                group.append(other)
                if other == node:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    for node in graph:
        if node not in index:
            visit(node)
    return found


def _describe(graph: dict[str, dict[str, int]], group: list[str]) -> str:
    return "; ".join(f"{a} -> {b} (line {graph[a][b]})" for a in group for b in graph[a] if b in group)


def test_detector_finds_a_planted_circle(tmp_path):
    package = tmp_path / "pkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "a.py").write_text("from pkg.b import g\n\ndef f():\n    return g\n")
    (package / "b.py").write_text("def g():\n    from pkg import a\n    return a\n")
    (package / "c.py").write_text("import pkg.a\n")
    assert cycles(import_graph(package, anywhere=False)) == []
    assert cycles(import_graph(package, anywhere=True)) == [["pkg.a", "pkg.b"]]


@pytest.mark.parametrize("anywhere", [False, True], ids=["module-level", "anywhere"])
def test_no_import_cycles(anywhere):
    graph = import_graph(SRC / "attnkit", anywhere=anywhere)
    assert len(graph) > 100  # the walk saw the package
    found = cycles(graph)
    assert not found, "import circles:\n" + "\n".join(_describe(graph, group) for group in found)
