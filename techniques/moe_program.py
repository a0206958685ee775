"""Which tokens autopar's MoE program routes under tensor parallel: the one rule the emitted program applies
(``codegen.runtime_parallel.apply_tp``) and the cost model prices (``cost_models.tp_collectives``).
Pure Python, no autopar import: ``autopar emit`` copies it into the run directory (``codegen.emit_vendor``)."""

from __future__ import annotations


def moe_tokens_local(sp: bool, ep: int, etp: int, shared_experts: bool) -> bool:
    """Under tensor parallel (tp > 1), whether an MoE layer's program routes and dispatches the rank's own
    sequence-parallel shard of tokens and returns its output on that shard: with sp, expert parallel
    (``ep * etp > 1``) and no shared experts (Megatron-Core's MoE layer under sequence parallel, its
    ``MoEAlltoAllTokenDispatcher`` taking the sequence-sharded hidden states: no all-gather before the layer,
    no reduce-scatter after it). Shared experts are tensor-parallel and need the gathered sequence; experts
    replicated over tp (ep = etp = 1) run the whole sequence on every tp rank. The program
    (``codegen.runtime_parallel.apply_tp``) and the price (``cost_models.tp_collectives``) both read this."""
    return sp and ep * etp > 1 and not shared_experts
