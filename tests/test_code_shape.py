"""Code shape of the autopar package (ast): median function length at most 20 lines, no function
over 60 (body lines, after the signature and docstring), no file over 500 lines. tests/ and
benchmarks/ are scripts, not the package, and are left out; so are the code generator's
templates (not Python modules). The benchmarks' modules are read by one another (``published_rows``)
and keep the 500-line cap."""

from __future__ import annotations

import ast
import statistics
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SKIP = {"tests", "benchmarks", ".venv", "autopar.egg-info", "docs"}
MAX_FUNCTION, MEDIAN_FUNCTION, MAX_FILE = 60, 20, 500


def _files() -> list[Path]:
    out = []
    for path in sorted(ROOT.rglob("*.py")):
        rel = path.relative_to(ROOT)
        if rel.parts[0] in SKIP or any(p.startswith(".") for p in rel.parts) or "templates" in rel.parts:
            continue
        out.append(path)
    return out


def _functions(path: Path) -> list[tuple[str, int]]:
    """(name, lines of its body): from the first statement after the docstring to the end. The
    signature is left out: a CLI command declares its options there, one per line."""
    tree = ast.parse(path.read_text(), filename=str(path))
    out = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            if len(body) > 1 and isinstance(body[0], ast.Expr) and isinstance(getattr(body[0], "value", None),
                                                                              ast.Constant):
                body = body[1:]
            out.append((f"{path.relative_to(ROOT)}:{node.name}", node.end_lineno - body[0].lineno + 1))
    return out


def test_reads_the_package():
    names = [p.relative_to(ROOT).as_posix() for p in _files()]
    assert "planner/search.py" in names and "techniques/pipeline.py" in names


def test_no_file_over_500_lines():
    long = [f"{p.relative_to(ROOT)} ({n} lines)" for p in _files()
            if (n := len(p.read_text().splitlines())) > MAX_FILE]
    assert not long, f"files over {MAX_FILE} lines (split them): " + ", ".join(long)


def test_no_function_over_60_lines():
    long = [f"{name} ({n})" for p in _files() for name, n in _functions(p) if n > MAX_FUNCTION]
    assert not long, f"functions over {MAX_FUNCTION} lines (split them): " + ", ".join(long)


def test_median_function_length():
    lengths = [n for p in _files() for _, n in _functions(p)]
    assert statistics.median(lengths) <= MEDIAN_FUNCTION, f"median function length {statistics.median(lengths)}"


def test_no_benchmark_module_over_500_lines():
    """benchmarks/published_rows.py held 502 lines (review R5) before its ARCHS table moved to published_archs.py."""
    long = [f"{p.name} ({n} lines)" for p in sorted((ROOT / "benchmarks").glob("*.py"))
            if (n := len(p.read_text().splitlines())) > MAX_FILE]
    assert not long, f"benchmark files over {MAX_FILE} lines (split them): " + ", ".join(long)
