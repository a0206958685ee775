"""Data parallel, ZeRO 0-3 and FSDP (and the micro-batching that feeds them).

Fields ``dp`` (the rest of ``world / (tp*cp*pp)``), ``zero_stage``, ``micro_batch``,
``global_batch``. ZeRO-0 / 1 run as DDP (+ ZeroRedundancyOptimizer) or FSDP2 ``replicate``
(ZeRO-1 with DTensor, expert or pipelined parameters, or 16-bit: ``runtime_zero1.ShardedAdamW``),
ZeRO-2 and optimizer offload below ZeRO-3 as FSDP2 without resharding after forward, ZeRO-3 as
FSDP2 ``fully_shard`` (``codegen.runtime_parallel.dp_mode``); priced by the gradient
synchronisation (per layer and micro-batch where the program is FSDP's: ``cost_models.fsdp``),
ZeRO-3's per-layer gathers and the optimizer step of the rank's shard.
"""

from __future__ import annotations

from autopar.core.model_spec import ModelSpec
from autopar.core.strategy import Strategy
from autopar.techniques.base import Technique

ZERO_STAGES = (0, 1, 2, 3)


def batch_rule(s: Strategy, spec: ModelSpec | None, world: int, seq_len: int | None) -> list[str]:
    if s.global_batch and s.global_batch % (s.micro_batch * s.dp):
        per_step = s.micro_batch * s.dp
        return [f"global_batch={s.global_batch} is not divisible by mbs*dp = {s.micro_batch}*{s.dp} = {per_step}; "
                "change mbs or the batch"]
    return []


TECHNIQUE = Technique(
    name="data_parallel",
    fields=("dp", "zero_stage", "micro_batch", "global_batch"),
    rules=(batch_rule,),
    search={"dp": "world / (tp*cp*pp), dividing the global batch", "zero_stage": ZERO_STAGES,
            "micro_batch": "every divisor of global_batch / dp", "global_batch": "fixed by the command line"},
    cost_terms=("estimate:CostModel.dp_time", "estimate:CostModel.grad_sync_time", "estimate:CostModel.optimizer_time",
                "memory:model_state_bytes"),
    apply="autopar.codegen.runtime_parallel.apply_dp",
)
