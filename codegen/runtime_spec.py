"""The model architecture of ``plan.json`` read without pydantic, so the run directory needs
only torch on the nodes.

``autopar emit`` validated the plan (``core.model_spec.ModelSpec``, defaults filled in) and
wrote it with every field, so the runtime reads the ``model`` object as it is. ``RunSpec``
offers the fields as attributes and ``ModelSpec``'s methods and properties on top (copied
into the run directory by ``emit_vendor``); a test checks they agree on every preset.
"""

from __future__ import annotations

import json
import os
import types
from pathlib import Path
from types import SimpleNamespace


class RunSpec(SimpleNamespace):
    """``plan["model"]`` as attributes (``spec.hidden``, ``spec.family``, ...); the derived
    properties and methods (``is_moe``, ``resolved_norm``, ...) are ``ModelSpec``'s own,
    looked up when an attribute is not a field."""

    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        attr = getattr(spec_methods(), name, None)
        if isinstance(attr, property):
            return attr.fget(self)
        if callable(attr):
            return types.MethodType(attr, self)
        raise AttributeError(f"model spec has no field or property '{name}'")


def spec_methods() -> type:
    """The class holding ``ModelSpec``'s methods: ``ModelSpec`` itself inside autopar; in the
    run directory ``emit_vendor`` replaces this function by a plain class with their source."""
    from autopar.core.model_spec import ModelSpec

    return ModelSpec


def load_run_spec(plan_path: str | os.PathLike) -> RunSpec:
    """The ``model`` of a plan file; ``ValueError`` with one line when it cannot be read."""
    p = Path(plan_path)
    try:
        data = json.loads(p.read_text())
        return RunSpec(**data["model"])
    except FileNotFoundError:
        raise ValueError(f"--plan {p}: no such file; fix: run from the folder `autopar emit` wrote") from None
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise ValueError(f"--plan {p}: not a plan written by autopar ({type(exc).__name__}: {exc}); "
                         "fix: re-run `autopar emit`") from None
