"""Activation recomputation per layer: ``none``, ``selective`` (attention core re-run, Korthikanti
et al. 2022) or ``full`` (only the block input kept), chosen per layer with the stage partition.
Applied by ``codegen.runtime_ac.apply_ac``; priced by the saved / working bytes of each mode
(``layer_model``) and the re-run forward (``layer_cost.price_layer``)."""

from __future__ import annotations

from typing import get_args

from autopar.core.model_spec import ModelSpec
from autopar.core.strategy import Recompute, Strategy
from autopar.techniques.base import Technique, custom

MODES: tuple[str, ...] = get_args(Recompute)


def mode_problem(mode: str, spec: ModelSpec | None) -> str | None:
    """Why ``mode`` cannot run on this model (None when it can): per-layer overrides use it too."""
    if custom(spec) and mode not in ("none", "full"):
        return (f"recompute={mode} needs the built-in attention modules; a custom module supports recompute=full "
                "(whole blocks) or none")
    return None


def mode_rule(s: Strategy, spec: ModelSpec | None, world: int, seq_len: int | None) -> list[str]:
    msg = mode_problem(s.recompute, spec)
    return [msg] if msg else []


TECHNIQUE = Technique(
    name="recompute",
    fields=("recompute",),
    rules=(mode_rule,),
    search={"recompute": "per layer, every mode the cost model prices (layer_cost.RECOMPUTE_MODES)"},
    cost_terms=("layer_model:saved_bytes", "layer_model:working_bytes", "layer_cost:price_layer"),
    apply="autopar.codegen.runtime_ac.apply_ac",
)
