"""The package's import layers, read from the source: no upward import and no import circle.

Layers, lowest first (a module may import its own layer and those below it)::

    core  <  linalg  <  metrics  <  plots  <  engine, integrations  <  config
          <  session  <  triggers, checkpoints, report  <  legacy  <  cli  <  the package itself

``integrations`` (the sinks) and ``engine`` sit side by side and never import each other:
both know the record type from ``core.records``. Imports inside functions count too: a
lazy import still makes the dependency. The package's ``__init__`` re-exports the public
names and sits on top.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

#: ``{first part under uma_callbacks: rank}``; a module not listed fails the test (place it).
RANKS = {
    "core": 0,
    "linalg": 1,
    "metrics": 2,
    "plots": 3,
    "engine": 4,
    "integrations": 4,
    "config": 5,
    "metric_specs": 5,
    "session": 6,
    "triggers": 7,
    "checkpoints": 7,
    "report": 7,
    "legacy": 8,
    "cli": 9,
    "": 10,  # uma_callbacks/__init__.py
}
#: Groups of one rank that must not import each other.
APART = [("engine", "integrations")]


def _source_files() -> dict[str, Path]:
    files = {}
    for path in sorted((ROOT / "uma_callbacks").rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        files[".".join(parts)] = path
    for path in sorted((ROOT / "integrations").glob("*.py")):
        name = "uma_callbacks.integrations" + ("" if path.stem == "__init__" else f".{path.stem}")
        files[name] = path
    return files


def _imports(path: Path, module: str, known: set[str]) -> set[str]:
    """Every ``uma_callbacks`` module that ``module`` imports, at any depth of its code."""
    out = set()
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.startswith("uma_callbacks"))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if not target.startswith("uma_callbacks"):
                continue
            for alias in node.names:  # `from uma_callbacks import plots` imports a module
                sub = f"{target}.{alias.name}"
                out.add(sub if sub in known else target)
    return {t for t in out if t != module}


def _group(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def _graph() -> dict[str, set[str]]:
    files = _source_files()
    known = set(files)
    graph = {}
    for module, path in files.items():
        graph[module] = {t if t in known else t.rpartition(".")[0] for t in _imports(path, module, known)}
    return graph


def test_every_module_has_a_layer():
    unplaced = sorted({_group(m) for m in _graph()} - set(RANKS))
    assert not unplaced, f"place these in RANKS (tests/test_layering.py): {unplaced}"


def test_no_upward_import():
    graph = _graph()
    upward = [
        f"{src} -> {dst}"
        for src, targets in graph.items()
        for dst in targets
        if RANKS.get(_group(dst), -1) > RANKS.get(_group(src), 99)
        or any({_group(src), _group(dst)} == set(pair) for pair in APART)
    ]
    assert not upward, "imports against the layers:\n" + "\n".join(sorted(upward))


def test_no_import_circle():
    graph = _graph()
    # Tarjan's strongly connected components; a component of more than one module is a circle
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    circles: list[list[str]] = []
    counter = [0]

    def visit(node: str) -> None:
        index[node] = low[node] = counter[0]
        counter[0] += 1
        stack.append(node)
        on_stack.add(node)
        for nxt in graph.get(node, ()):
            if nxt not in graph:
                continue
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                circles.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    # a package's __init__ re-exporting its submodules is not a circle of concepts
    circles = [c for c in circles if not _only_package_reexports(c, graph)]
    assert not circles, f"import circles: {circles}"


def _only_package_reexports(component: list[str], graph: dict[str, set[str]]) -> bool:
    """True when the circle closes only through a package ``__init__`` importing its own submodules."""
    members = set(component)
    packages = {m for m in members if any(o.startswith(m + ".") for o in members)}
    remaining = {m: {t for t in graph[m] if t in members and t not in packages} for m in members - packages}
    # acyclic once the packages are taken out?
    seen: set[str] = set()
    done: set[str] = set()

    def cyclic(node: str) -> bool:
        if node in done:
            return False
        if node in seen:
            return True
        seen.add(node)
        found = any(cyclic(n) for n in remaining.get(node, ()))
        done.add(node)
        return found

    return not any(cyclic(m) for m in remaining)


def test_the_checker_sees_an_upward_import(tmp_path):
    """The parser itself: a lazy ``from ... import`` inside a function is found."""
    src = tmp_path / "m.py"
    src.write_text("def f():\n    from uma_callbacks.session import Session\n")
    assert _imports(src, "uma_callbacks.core.m", {"uma_callbacks.session"}) == {"uma_callbacks.session"}
