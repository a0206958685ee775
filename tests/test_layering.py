"""Layering: every autopar module's imports (module-level and function-local, read with ast)
respect core -> profiles -> cost_models -> planner -> codegen -> cli, and no import cycle exists."""

from __future__ import annotations

import ast
from pathlib import Path

import networkx as nx
import pytest

ROOT = Path(__file__).resolve().parents[1]          # the repo root is the autopar package
SKIP = {"tests", ".venv", "autopar.egg-info", "docs", "benchmarks"}

# layer -> packages it must never import (benchmarks/ and tests/ are scripts on top of everything)
FORBIDDEN = {
    "core": {"profiles", "cost_models", "planner", "codegen", "cli", "techniques"},
    "techniques": {"profiles", "cost_models", "planner", "codegen", "cli"},
    "profiles": {"cost_models", "planner", "codegen", "cli"},
    "cost_models": {"planner", "codegen", "cli"},
    "planner": {"codegen", "cli"},
    "codegen": {"cli"},
}


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = [p for p in rel.parts if p != "__init__"]
    return ".".join(["autopar", *parts])


def _modules() -> dict[str, Path]:
    out = {}
    for path in ROOT.rglob("*.py"):
        rel = path.relative_to(ROOT)
        if rel.parts[0] in SKIP or any(p.startswith(".") for p in rel.parts):
            continue
        out[_module_name(path)] = path
    return out


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """autopar modules ``name`` imports anywhere in its source (``from autopar.x import y``
    counts ``autopar.x.y`` when that is a module, else ``autopar.x``)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    pkg = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("autopar")}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:   # relative import
                anchor = pkg.rsplit(".", node.level - 1)[0] if node.level > 1 else pkg
                base = f"{anchor}.{base}" if base else anchor
            if not base.startswith("autopar"):
                continue
            for a in node.names:
                out.add(f"{base}.{a.name}" if f"{base}.{a.name}" in known else base)
    return {m for m in out if m != name}


def _graph() -> nx.DiGraph:
    mods = _modules()
    g = nx.DiGraph()
    g.add_nodes_from(mods)
    for name, path in mods.items():
        for dep in _imports(name, path, set(mods)):
            if dep in mods:
                g.add_edge(name, dep)
    return g


def _layer(mod: str) -> str:
    parts = mod.split(".")
    return parts[1] if len(parts) > 2 else parts[-1]


def test_reads_the_package():
    g = _graph()
    assert "autopar.core.strategy" in g and "autopar.cost_models.estimate" in g
    assert g.has_edge("autopar.cost_models.estimate", "autopar.core.strategy")


@pytest.mark.parametrize("layer", sorted(FORBIDDEN))
def test_no_layer_imports_above_itself(layer):
    g = _graph()
    bad = sorted(f"{a} -> {b}" for a, b in g.edges
                 if _layer(a) == layer and _layer(b) in FORBIDDEN[layer])
    assert not bad, f"{layer}/ imports a layer above it:\n" + "\n".join(bad)


def test_core_imports_only_errors_and_fileio():
    g = _graph()
    allowed = {"core", "errors", "fileio", "autopar"}
    bad = sorted(f"{a} -> {b}" for a, b in g.edges if _layer(a) == "core" and _layer(b) not in allowed)
    assert not bad, "core/ imports:\n" + "\n".join(bad)


def test_no_import_cycle():
    g = _graph()
    g.remove_nodes_from([n for n in list(g) if n == "autopar"])   # the package root re-exports nothing
    cycles = list(nx.simple_cycles(g, length_bound=8))
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c + [c[0]]) for c in cycles[:10])
