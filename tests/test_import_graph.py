"""The import graph of ``segany`` has no cycle (read from the source with ``ast``: nothing is
imported to build it).

Module-level imports count, absolute and relative, including those under ``if``/``try`` at
module level; importing ``segany.a.b`` also runs ``segany/a/__init__.py``, so that package
counts too (unless it is the importer's own package). Imports inside functions or classes
are deferred and do not count for the rule; a second test checks that the two cycles
removed in issue 23 (``cli`` <-> the sub-command CLIs, ``engine.server`` <-> ``train.loop``
<-> ``train.routes``) do not come back even through deferred imports.
"""

from __future__ import annotations

import ast
from pathlib import Path

import segany

ROOT = Path(segany.__file__).resolve().parent

#: Cycles through deferred imports known today, each with its reason.
DEFERRED_CYCLES: set[frozenset[str]] = set()


def _modules() -> dict[str, tuple[Path, bool]]:
    mods = {}
    for path in sorted(ROOT.rglob("*.py")):
        parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
        is_pkg = parts[-1] == "__init__"
        mods[".".join(parts[:-1] if is_pkg else parts)] = (path, is_pkg)
    return mods


def _owner(name: str, mods: dict) -> str | None:
    """The module ``name`` is, or the nearest package or module containing it."""
    while name and name not in mods:
        name = name.rpartition(".")[0]
    return name or None


def _imports(tree: ast.Module, *, deferred: bool) -> list[ast.Import | ast.ImportFrom]:
    found, stack = [], list(tree.body)
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            found.append(node)
        elif deferred or not isinstance(
            node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Lambda)
        ):
            stack.extend(ast.iter_child_nodes(node))
    return found


def import_graph(*, deferred: bool = False) -> dict[str, set[str]]:
    """module -> the segany modules it imports (at module level unless ``deferred``)."""
    mods = _modules()
    graph: dict[str, set[str]] = {}
    for mod, (path, is_pkg) in mods.items():
        package = mod if is_pkg else mod.rpartition(".")[0]
        targets: set[str] = set()
        for node in _imports(ast.parse(path.read_text(), str(path)), deferred=deferred):
            if isinstance(node, ast.Import):
                targets |= {a.name for a in node.names}
                continue
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            for alias in node.names:  # a name may be a submodule (from . import x)
                sub = f"{source}.{alias.name}"
                targets.add(sub if sub in mods else source)
        deps = set()
        for target in targets:
            if target.split(".")[0] != "segany":
                continue
            owner = _owner(target, mods)
            deps.add(owner)
            parts = owner.split(".")
            for i in range(1, len(parts)):  # packages run on the way to ``owner``
                parent = ".".join(parts[:i])
                if not (mod == parent or mod.startswith(parent + ".")):
                    deps.add(parent)
        deps.discard(mod)
        graph[mod] = deps
    return graph


def components(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def cycles(graph: dict[str, set[str]], comps: list[list[str]] | None = None) -> list[list[str]]:
    """One cycle (a closed path) through each component with a cycle."""
    return [_one_cycle(c, graph) for c in (components(graph) if comps is None else comps)]


def _one_cycle(comp: list[str], graph: dict[str, set[str]]) -> list[str]:
    """A shortest path start -> ... -> start inside the component (breadth-first)."""
    start, members = comp[0], set(comp)
    prev: dict[str, str] = {}
    queue = [start]
    while queue:
        v = queue.pop(0)
        for w in sorted(graph[v] & members):
            if w == start:
                path = [v]
                while path[-1] != start:
                    path.append(prev[path[-1]])
                return [*reversed(path), start]
            if w not in prev:
                prev[w] = v
                queue.append(w)
    return comp


def test_the_graph_sees_every_kind_of_import():
    graph = import_graph()
    assert "segany.cli_common" in graph["segany.cli"]  # from .cli_common import ...
    assert "segany.datasets.records" in graph["segany.datasets.coco"]  # relative, level 1
    assert "segany.train.routes" in graph["segany.engine.server"]  # level 2
    assert "segany.train" in graph["segany.engine.server"]  # the package runs first
    assert "segany.train.trainer" not in graph["segany.engine.label"]  # deferred: not here
    assert "segany.engine.label" in import_graph(deferred=True)["segany.engine.label_cli"]
    # the cycle finder finds a planted cycle, as a closed path
    planted = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(planted) == [["a", "b", "c", "a"]]


def test_no_import_cycle():
    found = cycles(import_graph())
    assert not found, "import cycles:\n" + "\n".join(" -> ".join(c) for c in found)


def test_no_deferred_cycle_but_the_known_ones():
    graph = import_graph(deferred=True)
    new = [c for c in components(graph) if frozenset(c) not in DEFERRED_CYCLES]
    assert not new, "import cycles (deferred imports included):\n" + "\n".join(
        " -> ".join(c) for c in cycles(graph, new)
    )
