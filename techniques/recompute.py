"""Activation recomputation per layer: ``none``, ``selective`` (attention core re-run, Korthikanti
et al. 2022) or ``full`` (only the block input kept), chosen per layer with the stage partition.
Applied by ``codegen.runtime_ac.apply_ac``; priced by the saved / working bytes of each mode
(``layer_model``) and the re-run forward (``layer_cost.price_layer``)."""

from __future__ import annotations

from typing import get_args

from autopar.core.model_spec import ModelSpec
from autopar.core.strategy import Recompute, Strategy
from autopar.techniques.base import Runs, Technique, custom

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


# What each stack runs of activation recomputation (per layer: the plan's ``layer_recompute`` mixes the modes):
# - torch: autopar's program (``codegen.runtime_ac``), every mode.
# - torchtitan: ``activation_checkpoint.mode`` none | full | selective; ``selective_ac_option = "op"`` is the
#   per-op policy (``op``); an integer N (every N-th block checkpointed whole) is priced as ``selective`` by the
#   published rows' mapping (``benchmarks/published_rows.recompute``), so ``selective`` stays declared.
# - megatron: ``--recompute-granularity selective`` (core attention, Korthikanti et al. 2022) | ``full`` with
#   ``--recompute-method uniform | block``; no per-op policy.
# - deepspeed: ``deepspeed.checkpointing.checkpoint`` (``activation_checkpointing``): whole blocks.
# - llm-foundry: ``fsdp_config.activation_checkpointing`` (whole blocks).
STACKS = {
    "torch": Runs("autopar's program: checkpoint / per-op policies"),
    "torchtitan": Runs("torchtitan activation_checkpoint.mode, selective_ac_option"),
    "megatron": Runs("Megatron-LM --recompute-granularity selective | full",
                     {"recompute": ("none", "selective", "full")}),
    "deepspeed": Runs("DeepSpeed activation_checkpointing: whole blocks", {"recompute": ("none", "full")}),
    "llm-foundry": Runs("llm-foundry fsdp_config.activation_checkpointing: whole blocks",
                        {"recompute": ("none", "full")}),
}

TECHNIQUE = Technique(
    name="recompute",
    fields=("recompute",),
    rules=(mode_rule,),
    search={"recompute": "per layer, every mode the cost model prices (layer_cost.RECOMPUTE_MODES)"},
    cost_terms=("layer_model:saved_bytes", "layer_model:working_bytes", "layer_cost:price_layer"),
    apply="autopar.codegen.runtime_ac.apply_ac",
    stacks=STACKS,
)
