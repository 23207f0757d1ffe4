"""The layer order, checked: no import cycle, and no layer imports one above it.

Why a test and not a convention: the pipeline must stay pure (no Kafka, no config), the
runtime must not leak into the core, and an upward import is one line that nobody notices
in review until it becomes a cycle.  This reads every module of ``streamproc`` with
:mod:`ast` (top-level, nested and ``TYPE_CHECKING`` imports alike: an upward type import is
still an upward dependency) and fails when

* two modules import each other, directly or through others (a module cycle);
* two first-level units (``streamproc.crypto``, ``streamproc.config``, ...) do (a layer
  cycle);
* a unit imports a unit of its own or a higher layer in :data:`LAYERS`;
* a first-level unit exists that :data:`LAYERS` does not place (a new module or package
  must be given a layer, and ``docs/architecture.md`` must say where).

:data:`LAYERS` is the order documented in ``docs/architecture.md`` (the test checks the
document names every unit, in this order).  The checker is also run on small synthetic
packages to prove it catches each violation.
"""

from __future__ import annotations

import ast
from collections.abc import Iterable, Mapping
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PACKAGE = REPO / "streamproc"

#: Lowest first.  A unit may import units of *lower* layers only; units that share a layer
#: are independent of each other.  ``streamproc`` is the package root (``__version__``).
LAYERS: tuple[frozenset[str], ...] = tuple(
    frozenset(layer.split())
    for layer in (
        "streamproc errors",
        "validation",
        "crypto",
        "schema identity",
        "operators privacy",
        "policy",
        "pipeline",
        "config",
        "audit client",
        "observability integrations reid",
        "runtime",
        "devbroker devtls",
        "demo devkafka",
        "cli",
    )
)


def modules(root: Path) -> dict[str, Path]:
    """Dotted module name -> file, for every ``.py`` under the package directory ``root``."""
    out: dict[str, Path] = {}
    for f in sorted(root.rglob("*.py")):
        parts = list(f.relative_to(root.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = f
    return out


def import_graph(mods: Mapping[str, Path]) -> dict[str, set[str]]:
    """Module -> the modules of the same package it imports (resolved to existing modules).

    ``from a.b import c`` is an edge to ``a.b.c`` when that is a module, else to ``a.b``;
    relative imports are resolved against the importing module.  A submodule importing its
    own parent package counts (the parent's ``__init__`` usually imports it back).
    """
    pkg = next(iter(mods)).split(".")[0]
    edges: dict[str, set[str]] = {m: set() for m in mods}
    for m, f in mods.items():
        base = m.split(".") if f.name == "__init__.py" else m.split(".")[:-1]
        for node in ast.walk(ast.parse(f.read_text(), str(f))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    up = base[: len(base) - (node.level - 1)]
                    target = ".".join(up + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                targets = [
                    f"{target}.{a.name}" if f"{target}.{a.name}" in mods else target
                    for a in node.names
                ]
            for t in targets:
                while t and t not in mods:
                    t = t.rpartition(".")[0]
                if t and t != m and t.split(".")[0] == pkg:
                    edges[m].add(t)
    return edges


def unit(module: str) -> str:
    """The first-level unit of a module: ``streamproc.crypto.kms.aws`` -> ``crypto``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def cycles(edges: Mapping[str, Iterable[str]]) -> list[list[str]]:
    """Strongly connected components with more than one node (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    found: list[list[str]] = []
    counter = 0
    for root in sorted(edges):
        if root in index:
            continue
        work = [(root, iter(sorted(edges[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            v, it = work[-1]
            w = next(it, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = counter
                    counter += 1
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(edges.get(w, ())))))
                elif w in on_stack:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp: list[str] = []
                while True:
                    x = stack.pop()
                    on_stack.discard(x)
                    comp.append(x)
                    if x == v:
                        break
                if len(comp) > 1:
                    found.append(sorted(comp))
    return found


def violations(root: Path, layers: tuple[frozenset[str], ...]) -> list[str]:
    """Every cycle, upward or sideways import and unplaced unit, one line each."""
    mods = modules(root)
    edges = import_graph(mods)
    rank = {u: i for i, layer in enumerate(layers) for u in layer}
    problems = [f"module cycle: {' <-> '.join(c)}" for c in cycles(edges)]
    units: dict[str, set[str]] = {}
    for m, targets in edges.items():
        units.setdefault(unit(m), set()).update(unit(t) for t in targets if unit(t) != unit(m))
    problems += [f"layer cycle: {' <-> '.join(c)}" for c in cycles(units)]
    problems += [f"{u} is in no layer (place it in LAYERS)" for u in sorted(set(units) - set(rank))]
    for m, targets in sorted(edges.items()):
        src = unit(m)
        for t in sorted(targets):
            dst = unit(t)
            if dst == src or src not in rank or dst not in rank:
                continue
            if rank[dst] >= rank[src]:
                how = "a higher layer than" if rank[dst] > rank[src] else "the same layer as"
                problems.append(f"{m} imports {t}: {dst} is in {how} {src}")
    return problems


def test_streamproc_has_no_cycle_and_no_upward_import() -> None:
    assert violations(PACKAGE, LAYERS) == []


def test_architecture_doc_lists_the_layers_in_order() -> None:
    """docs/architecture.md names every unit in its layer table, lowest layer first."""
    doc = (REPO / "docs" / "architecture.md").read_text()
    section = doc.split("## Layers", 1)[1].split("\n## ", 1)[0]
    rows = [r for r in section.splitlines() if r.startswith("| ") and not r.startswith("| layer")]
    named = [
        frozenset(
            w.strip("`/").removeprefix("streamproc.")
            for w in r.split("|")[2].replace(",", " ").split()
            if w.startswith("`")
        )
        for r in rows
        if not set(r) <= {"|", "-", " "}
    ]
    assert tuple(named) == LAYERS


# -- the checker catches what it claims to --------------------------------------------------


def _package(tmp_path: Path, files: Mapping[str, str]) -> Path:
    root = tmp_path / "pkg"
    for name, text in {"__init__.py": "", **files}.items():
        f = root / name
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text(text)
    return root


TOY_LAYERS = (frozenset({"pkg", "low"}), frozenset({"mid"}), frozenset({"high"}))


def test_checker_accepts_downward_imports(tmp_path: Path) -> None:
    root = _package(
        tmp_path,
        {
            "low.py": "X = 1\n",
            "mid/__init__.py": "from pkg.low import X\n",
            "mid/a.py": "from . import b\nfrom .b import Y\n",
            "mid/b.py": "from ..low import X\nY = X\n",
            "high.py": "import pkg.mid.a\nfrom pkg import low\n",
        },
    )
    assert violations(root, TOY_LAYERS) == []


def test_checker_finds_an_upward_import(tmp_path: Path) -> None:
    root = _package(
        tmp_path,
        {"low.py": "def f():\n    from pkg.high import H\n    return H\n", "high.py": "H = 1\n"},
    )
    assert violations(root, TOY_LAYERS) == [
        "pkg.low imports pkg.high: high is in a higher layer than low"
    ]


def test_checker_finds_a_sideways_import(tmp_path: Path) -> None:
    layers = (frozenset({"pkg"}), frozenset({"a", "b"}))
    root = _package(tmp_path, {"a.py": "import pkg.b\n", "b.py": ""})
    assert violations(root, layers) == ["pkg.a imports pkg.b: b is in the same layer as a"]


def test_checker_finds_module_and_layer_cycles(tmp_path: Path) -> None:
    root = _package(
        tmp_path,
        {
            "mid/__init__.py": "",
            "mid/a.py": "from pkg.mid.b import B\nA = 1\n",
            "mid/b.py": "from pkg.mid import a\nB = 1\n",
            "high.py": "",
            "low.py": "from pkg.high import *\n",
        },
    )
    layers = (frozenset({"pkg"}), frozenset({"low", "mid", "high"}))
    found = violations(root, layers)
    assert "module cycle: pkg.mid.a <-> pkg.mid.b" in found
    root2 = _package(
        tmp_path / "two",
        {"x/__init__.py": "", "x/a.py": "import pkg.y.b\n", "y/__init__.py": "", "y/b.py": "",
         "y/c.py": "from pkg.x import a\n"},
    )
    assert "layer cycle: x <-> y" in violations(root2, (frozenset({"pkg", "x", "y"}),))


def test_checker_finds_a_unit_without_a_layer(tmp_path: Path) -> None:
    root = _package(tmp_path, {"low.py": "", "newthing.py": "from pkg import low\n"})
    assert "newthing is in no layer (place it in LAYERS)" in violations(root, TOY_LAYERS)


@pytest.mark.parametrize("text", ["from pkg.high import H\n", "import pkg.high.sub\n"])
def test_checker_resolves_absolute_forms(tmp_path: Path, text: str) -> None:
    root = _package(tmp_path, {"low.py": text, "high/__init__.py": "H = 1\n", "high/sub.py": ""})
    assert any("pkg.low imports pkg.high" in v for v in violations(root, TOY_LAYERS))
