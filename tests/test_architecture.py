"""The layout is the architecture: no import circle, and each layer imports only what lies below it."""

from __future__ import annotations

import ast
from pathlib import Path

import flare_duallora

ROOT = Path(flare_duallora.__file__).parent
PACKAGE = "flare_duallora"


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in ROOT.rglob("*.py")}


def _resolve(name: str, known: set[str]) -> str | None:
    """The package module an import names (``a.b.C`` -> ``a.b`` when ``C`` is not a module)."""
    while name and name not in known:
        name = name.rpartition(".")[0]
    return name or None


def imports_of(mod: str, path: Path, known: set[str]) -> set[str]:
    """Every package module ``mod`` imports, at module level or inside a function (both can close a circle)."""
    tree = ast.parse(path.read_text())
    is_pkg = path.name == "__init__.py"
    out = set()
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = mod if is_pkg else mod.rpartition(".")[0]
                for _ in range(node.level - 1):
                    base = base.rpartition(".")[0]
                prefix = f"{base}.{node.module}" if node.module else base
            else:
                prefix = node.module or ""
            names = [f"{prefix}.{a.name}" for a in node.names] or [prefix]
        for name in names:
            if name.split(".")[0] != PACKAGE:
                continue
            target = _resolve(name, known)
            if target and target != mod:
                out.add(target)
    return out


def import_graph() -> dict[str, set[str]]:
    mods = modules()
    known = set(mods)
    # (Python also imports a module's parent packages first; a package that imports its own children is no circle,
    # a child that imports its parent package's namespace while the parent imports that child is one)
    return {m: imports_of(m, p, known) for m, p in mods.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []
    counter = [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_the_graph_sees_real_imports():
    graph = import_graph()
    assert "flare_duallora.engine.methods" in graph["flare_duallora.engine.adapted"]
    assert "flare_duallora.engine" in graph["flare_duallora.flare.executor"]
    # the checker finds a circle when there is one
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_circle_in_the_package():
    found = cycles(import_graph())
    assert not found, "import circles: " + "; ".join(" <-> ".join(c) for c in found)


# what each layer may import from the package (itself always allowed); nets/data/bundle are leaves beside
LAYERS = {
    "engine": {"engine", "nets"},
    "nets": {"nets"},
    "data": {"data"},
    "bundle": {"bundle", "nets"},
    "metrics": {"metrics"},
    "training": {"training", "engine", "nets", "bundle", "data", "metrics"},
    "flare": {"flare", "training", "engine", "nets", "bundle", "data", "metrics"},
}


def test_layers_import_only_what_lies_below_them():
    bad = []
    for mod, deps in import_graph().items():
        parts = mod.split(".")
        if len(parts) < 2 or parts[1] not in LAYERS:
            continue
        allowed = LAYERS[parts[1]] | {""}
        for dep in deps:
            dparts = dep.split(".")
            layer = dparts[1] if len(dparts) > 1 else ""
            if layer not in allowed:
                bad.append(f"{mod} -> {dep}")
    assert not bad, "layer violations: " + "; ".join(sorted(bad))


def test_the_engine_imports_nothing_from_flare():
    for mod, path in modules().items():
        if mod.startswith(("flare_duallora.engine", "flare_duallora.nets", "flare_duallora.training")):
            text = path.read_text()
            assert "nvflare" not in text.replace("NVFlare", ""), f"{mod} imports nvflare"
