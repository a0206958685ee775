"""The model architecture of ``plan.json`` read without pydantic, so the run directory needs
only torch on the nodes.

``autopar emit`` validated the plan (``core.model_spec.ModelSpec``, defaults filled in) and
wrote it with every field, so the runtime reads the ``model`` object as it is. ``RunSpec``
offers the attributes and the few derived properties the model code uses; a test checks
they agree with ``ModelSpec`` on every preset.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from types import SimpleNamespace


class RunSpec(SimpleNamespace):
    """``plan["model"]`` as attributes (``spec.hidden``, ``spec.family``, ...)."""

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    @property
    def moe_layers(self) -> int:
        return self.layers - self.first_dense_layers if self.is_moe else 0

    @property
    def shared_width(self) -> int:
        """Inner width of the fused shared-expert MLP (0 when there is none)."""
        return self.shared_ffn_hidden or self.shared_experts * self.moe_ffn_hidden

    def is_moe_layer(self, index: int) -> bool:
        return self.is_moe and index >= self.first_dense_layers


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
