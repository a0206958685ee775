"""The runtime that travels with a run directory: ``autopar_rt/``, so nodes need only torch.

``train.py`` imports ``autopar_rt.runtime`` (and ``runtime_ckpt``), copies of autopar's own
``codegen/runtime*.py`` and model code (``profiles/models``) with their ``autopar.*``
imports renamed to ``autopar_rt.*``. The plan's model is read by ``runtime_spec.RunSpec``
(no pydantic); the cost model, the planner, pydantic, networkx, yaml and scipy are not in
the closure. Emit refuses to write a copy that would still import ``autopar`` at import
time (a module-level ``import autopar...``): the run directory would fail on a bare node.
Imports inside functions (``runtime_pp.even_stages``, used by ``emit`` only) stay lazy.
"""

from __future__ import annotations

import ast
from pathlib import Path

from autopar import __version__

ROOT = Path(__file__).resolve().parents[1]  # the autopar package folder
PACKAGE = "autopar_rt"
# vendored path -> source path, relative to the autopar package
# (every codegen/runtime*.py: a runtime module added later travels without an edit here)
MODULES = {
    **{p.name: f"codegen/{p.name}" for p in sorted((ROOT / "codegen").glob("runtime*.py"))},
    "models/__init__.py": "profiles/models/__init__.py",
    "models/layers.py": "profiles/models/layers.py",
    "models/transformer.py": "profiles/models/transformer.py",
    "models/rope.py": "profiles/models/rope.py",
    "rope_math.py": "core/rope_math.py",  # RoPE scaling factors: plain Python, read by models/rope.py
    "models/hf.py": "profiles/models/hf.py",  # transformers modules (their plans only)
    "errors.py": "errors.py",
    "dp_program.py": "techniques/dp_program.py",  # dp_mode: one rule for the program and its price
    "moe_program.py": "techniques/moe_program.py",  # moe_tokens_local: the same for the MoE's tokens under sp
}
# applied in order to every copied module
RENAMES = (
    ("from autopar.core.model_spec import ModelSpec", f"from {PACKAGE}.runtime_spec import RunSpec as ModelSpec"),
    ("autopar.codegen.runtime", f"{PACKAGE}.runtime"),
    ("autopar.profiles.models", f"{PACKAGE}.models"),
    ("autopar.core.rope_math", f"{PACKAGE}.rope_math"),
    ("autopar.errors", f"{PACKAGE}.errors"),
    ("autopar.techniques.dp_program", f"{PACKAGE}.dp_program"),
    ("autopar.techniques.moe_program", f"{PACKAGE}.moe_program"),
)


def vendored_runtime() -> dict[str, str]:
    """``{"autopar_rt/<file>": source}`` for the run directory; RuntimeError if a copy would
    still import autopar when loaded."""
    out = {f"{PACKAGE}/__init__.py": f'"""autopar {__version__} runtime, copied by `autopar emit`: train.py '
                                     'needs only torch."""\n',
           }
    for dest, src in MODULES.items():
        text = (ROOT / src).read_text()
        for old, new in RENAMES:
            text = text.replace(old, new)
        if dest == "runtime_spec.py":
            text = _paste_spec_methods(text)
        _check_closure(dest, text)
        out[f"{PACKAGE}/{dest}"] = text
    return out


def _check_closure(name: str, text: str) -> None:
    """Module-level imports (``if TYPE_CHECKING`` blocks aside) must not reach autopar."""
    for node in ast.parse(text).body:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            continue
        for sub in ast.walk(node) if not isinstance(node, (ast.FunctionDef, ast.ClassDef)) else []:
            mods = []
            if isinstance(sub, ast.Import):
                mods = [a.name for a in sub.names]
            elif isinstance(sub, ast.ImportFrom) and sub.level == 0:
                mods = [sub.module or ""]
            bad = [m for m in mods if m == "autopar" or m.startswith("autopar.")]
            if bad:
                raise RuntimeError(f"emit: the run directory's {PACKAGE}/{name} would import {bad[0]} at load time; "
                                   "add it to codegen/emit_vendor.MODULES or make the import lazy")


def _paste_spec_methods(text: str) -> str:
    """Replace ``spec_methods()`` (which imports ``ModelSpec``) by a plain class holding the source
    of ``ModelSpec``'s methods and properties (its pydantic validators left out)."""
    src = (ROOT / "core/model_spec.py").read_text()
    lines = src.splitlines()
    cls = next(n for n in ast.parse(src).body if isinstance(n, ast.ClassDef) and n.name == "ModelSpec")
    methods = []
    for node in cls.body:
        if not isinstance(node, ast.FunctionDef):
            continue
        if any("validator" in ast.unparse(d) for d in node.decorator_list):
            continue
        start = min([d.lineno for d in node.decorator_list] + [node.lineno]) - 1
        methods.append("\n".join(lines[start: node.end_lineno]))
    body = "\n\n".join(methods) or "    pass"
    a = text.index("def spec_methods() -> type:")
    b = text.index("\n\n\ndef ", a)
    head = 'class _SpecMethods:\n    """ModelSpec\'s methods and properties, copied by ``autopar emit``."""\n\n'
    return text[:a] + head + body + "\n\n\ndef spec_methods() -> type:\n    return _SpecMethods" + text[b:]
