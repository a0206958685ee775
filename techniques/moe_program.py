"""Which tokens autopar's MoE program routes under tensor parallel: the one rule the emitted program applies
(``codegen.runtime_parallel.apply_tp``) and the cost model prices (``cost_models.tp_collectives``).
Pure Python, no autopar import: ``autopar emit`` copies it into the run directory (``codegen.emit_vendor``)."""

from __future__ import annotations


def moe_tokens_local(sp: bool, ep: int, etp: int) -> bool:
    """Under tensor parallel (tp > 1), whether an MoE layer's program routes and dispatches the rank's own
    sequence-parallel shard of tokens and returns its output on that shard: with sp and expert parallel
    (``ep * etp > 1``), Megatron-Core's MoE layer under sequence parallel (its ``MoEAlltoAllTokenDispatcher``
    takes the sequence-sharded hidden states: no all-gather before the layer, no reduce-scatter after it).
    Shared experts or not (until 2026-11-27 they made the layer gather the whole sequence): the shared
    experts run as a sequence-parallel tensor-parallel MLP that gathers its own input and reduce-scatters
    its output back to the shard, so the router and dispatcher beside them can take the shard. Experts
    replicated over tp (ep = etp = 1) run the whole sequence on every tp rank. The program
    (``codegen.runtime_parallel.apply_tp``) and the price (``cost_models.tp_collectives``) both read this,
    for every runtime: it is also Megatron-Core's rule. ``MoELayer.forward``
    (megatron/core/transformer/moe/moe_layer.py) hands the sequence-sharded hidden states to the router
    (``TopKRouter``: its gate weight is marked ``sequence_parallel``, its gradient summed over tp in
    ``finalize_model_grads``) and to the token dispatcher; its shared experts (``SharedExpertMLP``,
    moe/shared_experts.py) are a tensor-parallel MLP whose column-parallel ``linear_fc1`` gathers that
    sharded input itself and whose ``linear_fc2`` reduce-scatters back to it (its optional gate reads
    the shard too)."""
    return sp and ep * etp > 1
