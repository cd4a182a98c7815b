"""No import cycles in medsynth: between modules, and between sub-packages (layers).

Every ``import`` statement counts (module level, inside functions, under TYPE_CHECKING), read with
ast, so a cycle hidden in a lazy import still fails. The package face (``medsynth/__init__.py``,
which re-exports lazily) is left out.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "medsynth"


def module_graph(root: Path) -> dict[str, set[str]]:
    """module -> the medsynth modules it imports."""
    mods: dict[str, Path] = {}
    for f in root.rglob("*.py"):
        rel = f.relative_to(root.parent).with_suffix("")
        mods[".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)] = f

    def resolve(name: str) -> str:
        while name and name not in mods:
            name = name.rsplit(".", 1)[0] if "." in name else ""
        return name

    graph: dict[str, set[str]] = {}
    for name, f in mods.items():
        pkg = name if f.name == "__init__.py" else name.rsplit(".", 1)[0]
        out = graph.setdefault(name, set())
        for node in ast.walk(ast.parse(f.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom):
                target = node.module or ""
                if node.level:
                    parts = pkg.split(".")
                    target = ".".join(parts[: len(parts) - node.level + 1] + ([node.module] if node.module else []))
                cands = [f"{target}.{a.name}" if f"{target}.{a.name}" in mods else target for a in node.names]
            elif isinstance(node, ast.Import):
                cands = [a.name for a in node.names]
            else:
                continue
            for c in map(resolve, cands):
                if c and c != name and c != root.name:
                    out.add(c)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one node (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    found: list[list[str]] = []
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on.add(root)
        while work:
            v, it = work[-1]
            w = next(it, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = len(index)
                    stack.append(w)
                    on.add(w)
                    work.append((w, iter(sorted(graph.get(w, ())))))
                elif w in on:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = []
                while True:
                    x = stack.pop()
                    on.discard(x)
                    comp.append(x)
                    if x == v:
                        break
                if len(comp) > 1:
                    found.append(sorted(comp))
    return found


def layers(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    """medsynth.synthesis.ldm -> medsynth.synthesis; top-level modules are their own layer."""

    def layer(m: str) -> str:
        return ".".join(m.split(".")[:2])

    out: dict[str, set[str]] = {}
    for a, bs in graph.items():
        out.setdefault(layer(a), set()).update(layer(b) for b in bs if layer(b) != layer(a))
    return out


def test_the_checker_finds_cycles_of_modules_and_of_layers(tmp_path: Path) -> None:
    pkg = tmp_path / "pkg"
    for sub in ("a", "b"):
        (pkg / sub).mkdir(parents=True)
        (pkg / sub / "__init__.py").write_text("")
    (pkg / "__init__.py").write_text("from pkg.a import x\n")  # the face is left out
    (pkg / "a" / "x.py").write_text("def f():\n    from pkg.b import y\n")
    (pkg / "a" / "z.py").write_text("")
    (pkg / "b" / "y.py").write_text("from ..a import z\n")  # a.x -> b.y -> a.z: layers a <-> b
    (pkg / "c.py").write_text("import pkg.d\n")
    (pkg / "d.py").write_text("from pkg import c\n")  # c <-> d: modules
    graph = module_graph(pkg)
    assert graph["pkg.a.x"] == {"pkg.b.y"} and graph["pkg.b.y"] == {"pkg.a.z"}
    assert cycles(graph) == [["pkg.c", "pkg.d"]]
    assert sorted(map(sorted, cycles(layers(graph)))) == [["pkg.a", "pkg.b"], ["pkg.c", "pkg.d"]]


def test_medsynth_has_no_import_cycles() -> None:
    graph = module_graph(PACKAGE)
    assert len(graph) > 30
    assert cycles(graph) == [], "cycle of modules"
    assert cycles(layers(graph)) == [], "cycle of sub-packages"


def test_leaves_import_nothing_above_them() -> None:
    """data, models and the diffusion math import only each other, errors and the config models."""
    graph = module_graph(PACKAGE)
    allowed = ("medsynth.data", "medsynth.models", "medsynth.diffusion", "medsynth.errors", "medsynth.config",
               "medsynth.registry")
    for name, deps in graph.items():
        if name.startswith(("medsynth.models", "medsynth.diffusion")):
            above = sorted(d for d in deps if not d.startswith(allowed))
            assert not above, f"{name} imports {above}"
    assert not any(d.startswith("medsynth.training") for n, ds in graph.items() if n.startswith("medsynth.synthesis")
                   for d in ds), "synthesis imports training"
