"""Context parallel: the sequence split over ``cp`` ranks in load-balanced chunk pairs, attention
over all-gathered key/value shards (``codegen.runtime_cp.apply_cp``); priced per layer
(``layer_cost.price_layer``, ``cp_cost.cp_exposed``: the gather and its gradients' reduce-scatter)."""

from __future__ import annotations

from autopar.core.model_spec import ModelSpec
from autopar.core.strategy import Strategy
from autopar.techniques.base import Runs, Technique, custom, custom_refusal


def chunk_rule(s: Strategy, spec: ModelSpec | None, world: int, seq_len: int | None) -> list[str]:
    if s.cp == 1:
        return []
    if custom(spec):
        return [custom_refusal("cp", s.cp, spec)]
    if seq_len and seq_len % (2 * s.cp):
        return [f"cp={s.cp}: seq_len={seq_len} must be divisible by 2*cp = {2 * s.cp} (load-balanced context "
                "parallel chunks)"]
    return []


def window_rule(s: Strategy, spec: ModelSpec | None, world: int, seq_len: int | None) -> list[str]:
    """Context parallel over sliding-window layers is not run as priced. The emitted cp attention
    (``codegen.runtime_cp``), like torchtitan's (torch's ``context_parallel``), intercepts causal SDPA calls
    only; a sliding-window layer calls SDPA with its window mask, which would attend within the rank's
    local chunk alone: wrong attention, so not emitted (nor searched). Megatron's Transformer Engine runs a
    window under cp with its a2a / allgather exchange only, not the ring ``cp_cost`` prices for it."""
    if s.cp == 1 or spec is None or not spec.sliding_window:
        return []
    if not any(spec.is_sliding_layer(i) for i in range(spec.layers)):
        return []
    return [f"cp={s.cp}: {spec.name} has sliding-window attention layers (window {spec.sliding_window}), which "
            "the emitted context parallel does not run; use cp=1"]


# What each stack runs of context parallel (the sequence split over cp ranks, attention over the other ranks'
# key / value shards; ``cost_models.cp_cost.cp_exposed`` prices autopar's program's all-gather form, the
# other stacks' ring):
# - torch: autopar's all-gather form (``codegen.runtime_cp``).
# - torchtitan: ``parallelism.context_parallel_degree`` (torch's ``context_parallel``, key / values passed
#   round by ``context_parallel_rotate_method`` allgather | alltoall); like autopar's program it splits causal
#   SDPA calls only (``window_rule``).
# - megatron: ``--context-parallel-size`` with ``--cp-comm-type`` p2p (ring) | a2a | allgather | a2a+p2p
#   (Transformer Engine attention); Transformer Engine runs a sliding window under cp with a2a / allgather only,
#   not the ring ``cp_cost`` prices (``window_rule``).
# - deepspeed: DeepSpeed-Ulysses splits heads by all-to-all, not the ring / all-gather cp priced here: left out.
# - llm-foundry: no context parallel in its configs.
STACKS = {
    "torch": Runs("autopar's program: all-gather context parallel"),
    "torchtitan": Runs("torchtitan parallelism.context_parallel_degree", {}, (window_rule,)),
    "megatron": Runs("Megatron-LM --context-parallel-size, --cp-comm-type", {}, (window_rule,)),
    "deepspeed": Runs("DeepSpeed-Ulysses is a head all-to-all, not the cp priced here", {"cp": (1,)}),
    "llm-foundry": Runs("no context parallel in llm-foundry", {"cp": (1,)}),
}

TECHNIQUE = Technique(
    name="context_parallel",
    fields=("cp",),
    rules=(chunk_rule,),
    emit_rules=(window_rule,),
    search={"cp": "divisors of world / tp with seq_len divisible by 2*cp"},
    cost_terms=("layer_cost:price_layer",),
    apply="autopar.codegen.runtime_cp.apply_cp",
    stacks=STACKS,
)
