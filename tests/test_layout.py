"""The three rings are visible in the tree: imports point inward only and never in a circle.

Every import is counted, also those inside functions (a lazy import still ties two modules).
The top-level ``dare_lab`` package is left out: it only holds ``__version__`` and the lazy
``dare_lab.merge`` alias.
"""

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "dare_lab"

# room -> the rooms it may import (besides itself); see docs/architecture.md
ALLOWED = {
    "ops": set(),
    "engine": {"ops"},
    "tracking": set(),
    "taskpool": {"engine", "ops", "tracking"},
    "train": {"taskpool", "engine", "ops", "tracking"},
    "pools": {"train", "taskpool", "engine", "ops", "tracking"},
    "analysis": {"pools", "taskpool", "engine", "ops", "tracking"},
    "data_aware": {"taskpool", "engine", "ops", "tracking"},
    "programs": {"analysis", "data_aware", "pools", "train", "taskpool", "engine", "ops", "tracking"},
    "shell": {"programs", "analysis", "data_aware", "pools", "train", "taskpool", "engine", "ops", "tracking"},
}


def _modules() -> dict[str, Path]:
    mods = {}
    for path in PKG.rglob("*.py"):
        parts = path.relative_to(PKG.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        mods[name] = path
    return mods


def _imports(name: str, path: Path, mods: dict[str, Path]) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            subs = {f"{target}.{a.name}" for a in node.names} & set(mods)  # ``from pkg import module``
            out.update(subs or {target})
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
    return out


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    return {m: {t for t in _imports(m, p, mods) if t in mods and t != "dare_lab" and t != m} for m, p in mods.items()
            if m != "dare_lab"}


def test_top_level_holds_only_rooms():
    loose = sorted(p.name for p in PKG.glob("*.py") if p.name not in ("__init__.py", "__main__.py"))
    assert loose == []
    rooms = {p.name for p in PKG.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    assert rooms == set(ALLOWED)


def test_imports_point_inward():
    wrong = []
    for mod, deps in _graph().items():
        room = mod.split(".")[1] if mod.count(".") else None
        if room not in ALLOWED:  # dare_lab.__main__
            continue
        wrong += [f"{mod} -> {d}" for d in deps if d.split(".")[1] != room and d.split(".")[1] not in ALLOWED[room]]
    assert wrong == []


def test_no_import_circles():
    graph = _graph()
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
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
                cycles.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    assert cycles == []


def test_every_internal_import_resolves():
    """Also the lazy and guarded ones (``try: from ... except ImportError``), which would
    otherwise fail silently after a move."""
    import importlib.util

    missing = []
    for name, path in _modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("dare_lab"):
                mod = importlib.import_module(node.module)
                for alias in node.names:
                    if not hasattr(mod, alias.name) and not (
                            hasattr(mod, "__path__") and importlib.util.find_spec(f"{node.module}.{alias.name}")):
                        missing.append(f"{name}: from {node.module} import {alias.name}")
            elif isinstance(node, ast.Import):
                missing += [f"{name}: import {a.name}" for a in node.names
                            if a.name.startswith("dare_lab") and importlib.util.find_spec(a.name) is None]
    assert missing == []
