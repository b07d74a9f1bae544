"""The package's modules import each other without a cycle.

The graph is read from the source with ``ast``, not from ``sys.modules``: every ``import otca_fast.x`` /
``from otca_fast.x import ...`` anywhere in a module — at the top, inside a function, under ``TYPE_CHECKING`` —
is an edge, because an import moved into a function to dodge a cycle still leaves the two modules depending on
each other. ``from otca_fast.p import x`` is an edge to ``otca_fast.p.x`` when ``x`` is a submodule, else to
``otca_fast.p``; an edge to a package means its ``__init__``. Relative imports are resolved. The
``otca_fast/kernels`` symlink (to the repository's ``kernels/``) is followed: its modules are imported as
``otca_fast.kernels.*``.
"""

from __future__ import annotations

import ast
import os
from pathlib import Path

import pytest

PACKAGE = "otca_fast"
ROOT = Path(__file__).resolve().parent.parent / PACKAGE


def module_files(root: Path = ROOT, package: str = PACKAGE) -> dict[str, Path]:
    """Module name -> file for every .py under ``root`` (symlinked folders followed, package ``__init__`` as the
    package's name)."""
    files: dict[str, Path] = {}
    paths = [Path(folder) / f for folder, _, names in os.walk(root, followlinks=True) for f in names
             if f.endswith(".py")]
    for path in sorted(paths):
        parts = path.relative_to(root).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        files[".".join((package, *parts))] = path
    return files


def packages(files: dict[str, Path], root: Path = ROOT, package: str = PACKAGE) -> set[str]:
    """Names of the package folders (with or without ``__init__.py``)."""
    found = {package}
    for name in files:
        parts = name.split(".")
        found.update(".".join(parts[:i]) for i in range(1, len(parts)))
    return found


def imports_of(name: str, path: Path, modules: set[str], is_package: bool) -> set[str]:
    """The package-internal modules that ``name`` (in ``path``) imports anywhere in its source."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    found: set[str] = set()

    def add(target: str) -> None:
        while target and target not in modules:  # ``import otca_fast.x.y.Z``-like spellings: the longest module
            target = target.rpartition(".")[0]
        if target and target != name:
            found.add(target)

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == PACKAGE or alias.name.startswith(PACKAGE + "."):
                    add(alias.name)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if is_package else name.split(".")[:-1]
                base = base[:len(base) - (node.level - 1)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            if source != PACKAGE and not source.startswith(PACKAGE + "."):
                continue
            for alias in node.names:
                sub = f"{source}.{alias.name}"
                add(sub if sub in modules else source)
    return found


def import_graph(root: Path = ROOT, package: str = PACKAGE) -> dict[str, set[str]]:
    """Module -> the package modules it imports (packages as their ``__init__``)."""
    files = module_files(root, package)
    pkgs = packages(files, root, package)
    modules = set(files) | pkgs
    graph = {name: set() for name in modules}
    for name, path in files.items():
        graph[name] = imports_of(name, path, modules, is_package=path.name == "__init__.py")
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as ``[a, b, ..., a]``, or None when the graph is acyclic (iterative DFS, sorted for a stable
    answer)."""
    WHITE, GREY, BLACK = 0, 1, 2
    colour = dict.fromkeys(graph, WHITE)
    for start in sorted(graph):
        if colour[start] != WHITE:
            continue
        stack = [(start, iter(sorted(graph[start])))]
        colour[start] = GREY
        while stack:
            node, children = stack[-1]
            for child in children:
                state = colour.get(child, WHITE)
                if state == GREY:
                    path = [n for n, _ in stack]
                    return path[path.index(child):] + [child]
                if state == WHITE:
                    colour[child] = GREY
                    stack.append((child, iter(sorted(graph.get(child, ())))))
                    break
            else:
                colour[node] = BLACK
                stack.pop()
    return None


def test_find_cycle_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"a"}}) == ["a", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set(), "d": {"a", "c"}}) is None


def test_import_graph_reads_function_level_and_relative_imports(tmp_path):
    pkg = tmp_path / PACKAGE
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("def f():\n    from otca_fast.sub import b\n")
    (pkg / "sub" / "__init__.py").write_text("from .b import g\n")
    (pkg / "sub" / "b.py").write_text("from .. import a\nimport otca_fast.sub.c\n")
    (pkg / "sub" / "c.py").write_text("from otca_fast import sub\n")
    graph = import_graph(pkg)
    assert graph[f"{PACKAGE}.a"] == {f"{PACKAGE}.sub.b"}
    assert graph[f"{PACKAGE}.sub"] == {f"{PACKAGE}.sub.b"}
    assert graph[f"{PACKAGE}.sub.b"] == {f"{PACKAGE}.a", f"{PACKAGE}.sub.c"}
    assert graph[f"{PACKAGE}.sub.c"] == {f"{PACKAGE}.sub"}
    assert find_cycle(graph) == [f"{PACKAGE}.a", f"{PACKAGE}.sub.b", f"{PACKAGE}.a"]


def test_the_graph_covers_the_package():
    graph = import_graph()
    for name in (f"{PACKAGE}.ops", f"{PACKAGE}.models.base", f"{PACKAGE}.credit", f"{PACKAGE}.kernels.grpo_loss"):
        assert name in graph
    assert f"{PACKAGE}.reference" in graph[f"{PACKAGE}.ops"]
    assert f"{PACKAGE}.kernels.sde_step" in graph[f"{PACKAGE}.kernels.grpo_loss"]


def test_the_package_imports_without_a_cycle():
    cycle = find_cycle(import_graph())
    if cycle is not None:
        pytest.fail("import cycle: " + " -> ".join(cycle))
