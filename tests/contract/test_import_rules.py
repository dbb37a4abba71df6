"""The rooms' import rules (design.md, docs/departures.md), read from the source.

    xenbind      never imports remusd, receiver or daemonkit
    daemonkit    imports only xenbind.errors of the project
    remusd       never imports receiver, and receiver never imports remusd
    xenbind.types  imports nothing of the project
    everywhere   no import cycle between modules (function-level imports
                 count too: a lazy import hides a cycle, it does not remove it)

Every import statement of every module counts, wherever it stands, except
under ``if TYPE_CHECKING:`` (never run: annotations only). ``from P
import X`` is an edge to ``P.X`` when that is a module, else to ``P``; a
module's edges to its own enclosing packages are left out (Python runs a
package's ``__init__`` before any of its submodules, whoever imports them).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PACKAGES = ("xenbind", "daemonkit", "remusd", "receiver")


def _modules() -> dict[str, Path]:
    mods: dict[str, Path] = {}
    for pkg in PACKAGES:
        for path in sorted((REPO / pkg).rglob("*.py")):
            rel = path.relative_to(REPO).with_suffix("")
            parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
            mods[".".join(parts)] = path
    return mods


MODULES = _modules()


def _resolve(mod: str, is_pkg: bool, node: ast.ImportFrom) -> str:
    if node.level == 0:
        return node.module or ""
    base = mod.split(".")
    if not is_pkg:
        base = base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _edges(mod: str) -> set[str]:
    path = MODULES[mod]
    tree = ast.parse(path.read_text(), str(path))
    for guard in ast.walk(tree):  # drop the bodies of `if TYPE_CHECKING:`
        if isinstance(guard, ast.If) and "TYPE_CHECKING" in ast.unparse(guard.test):
            guard.body = []
    out: set[str] = set()
    for node in ast.walk(tree):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            src = _resolve(mod, path.name == "__init__.py", node)
            for a in node.names:
                sub = f"{src}.{a.name}"
                targets.append(sub if sub in MODULES else src)
        for t in targets:
            # the longest project module that t names (an attribute path is cut)
            while t and t not in MODULES:
                t = t.rpartition(".")[0]
            if t and t != mod and not mod.startswith(t + "."):
                out.add(t)
    return out


GRAPH = {m: _edges(m) for m in MODULES}


def _room(mod: str) -> str:
    return mod.split(".")[0]


def test_the_graph_is_read():
    # a parser that found nothing would pass every rule below
    assert len(MODULES) > 60
    assert "xenbind.types" in GRAPH["xenbind.stream.decoder"]
    assert "xenbind.hypervisor" in GRAPH["xenbind.sim.client"]
    assert "daemonkit.transport" in GRAPH["daemonkit.tls"]


@pytest.mark.parametrize(
    "room,allowed",
    [
        ("xenbind", {"xenbind"}),
        ("remusd", {"xenbind", "daemonkit", "remusd"}),
        ("receiver", {"xenbind", "daemonkit", "receiver"}),
    ],
)
def test_rooms_import_only_what_they_may(room, allowed):
    bad = sorted(
        f"{m} imports {t}"
        for m, ts in GRAPH.items()
        if _room(m) == room
        for t in ts
        if _room(t) not in allowed
    )
    assert not bad, bad


def test_daemonkit_imports_only_the_error_types():
    bad = sorted(
        f"{m} imports {t}"
        for m, ts in GRAPH.items()
        if _room(m) == "daemonkit"
        for t in ts
        if _room(t) != "daemonkit" and t != "xenbind.errors"
    )
    assert not bad, bad


def test_value_types_import_nothing_of_the_project():
    assert GRAPH["xenbind.types"] == set()


def _cycles() -> list[list[str]]:
    """Tarjan's strongly connected components with more than one module."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    found: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(GRAPH[v]):
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
                found.append(sorted(comp))

    for v in sorted(GRAPH):
        if v not in index:
            visit(v)
    return found


def test_no_import_cycles():
    assert _cycles() == []


def test_the_cycle_finder_finds_a_cycle():
    GRAPH["xenbind.types"].add("xenbind.stream.events")
    try:
        assert any("xenbind.types" in c for c in _cycles())
    finally:
        GRAPH["xenbind.types"].discard("xenbind.stream.events")
