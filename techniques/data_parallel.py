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
from autopar.techniques.base import Runs, Technique

ZERO_STAGES = (0, 1, 2, 3)


def batch_rule(s: Strategy, spec: ModelSpec | None, world: int, seq_len: int | None) -> list[str]:
    if s.global_batch and s.global_batch % (s.micro_batch * s.dp):
        per_step = s.micro_batch * s.dp
        return [f"global_batch={s.global_batch} is not divisible by mbs*dp = {s.micro_batch}*{s.dp} = {per_step}; "
                "change mbs or the batch"]
    return []


def deepspeed_pipeline_rule(s: Strategy, spec: ModelSpec | None, world: int, seq_len: int | None) -> list[str]:
    """DeepSpeed's ``PipelineEngine`` asserts ZeRO stage < 2 ("ZeRO-2 and ZeRO-3 are incompatible with
    pipeline parallelism", deepspeed/runtime/pipe/engine.py)."""
    if s.pp > 1 and s.zero_stage >= 2:
        return [f"zero={s.zero_stage} with pp={s.pp}: --runtime deepspeed runs pipelines (PipelineModule) with "
                "zero 0 or 1 only; use zero<=1 or pp=1"]
    return []


def megatron_fsdp_rule(s: Strategy, spec: ModelSpec | None, world: int, seq_len: int | None) -> list[str]:
    """Megatron-LM's ZeRO-3 is FSDP (``--use-torch-fsdp2``, whose help says "FSDP2 is not currently working
    with Pipeline Parallel", or Megatron-FSDP): declared without a pipeline only."""
    if s.pp > 1 and s.zero_stage == 3:
        return [f"zero=3 with pp={s.pp}: --runtime megatron runs FSDP (--use-torch-fsdp2) without pipeline "
                "parallel only; use zero<=1 (--use-distributed-optimizer) or pp=1"]
    return []


def torchtitan_ddp_rule(s: Strategy, spec: ModelSpec | None, world: int, seq_len: int | None) -> list[str]:
    """torchtitan 0.2.2 runs ZeRO-0 (DDP, ``data_parallel_replicate_degree``) as the only parallelism: its
    ``parallelize_llama`` raises "DDP has not supported > 1D parallelism" when the world is larger than the
    replicate mesh, and with cp > 1 it shards the parameters over cp (FSDP)."""
    if s.zero_stage == 0 and s.dp * s.cp > 1 and max(s.tp, s.pp, s.cp, s.ep) > 1:
        return [f"zero=0 with tp={s.tp}, pp={s.pp}, cp={s.cp}, ep={s.ep}: --runtime torchtitan runs DDP "
                "(data_parallel_replicate_degree) alone (\"DDP has not supported > 1D parallelism\"); use zero=2 or "
                "zero=3 (data_parallel_shard_degree)"]
    return []


# What each stack runs of data parallel and ZeRO (the sources name the configuration keys):
# - torch: autopar's program (``dp_program.dp_mode``): DDP, ZeroRedundancyOptimizer, FSDP2 replicate,
#   ``runtime_zero1.ShardedAdamW``, ``fully_shard``: zero 0-3.
# - torchtitan: ``parallelism.data_parallel_replicate_degree`` (DDP: zero 0) and ``data_parallel_shard_degree``
#   (FSDP2 ``fully_shard``: zero 3; ``parallelism.fsdp_reshard_after_forward = "never"``: zero 2). No
#   optimizer-only sharding (ZeRO-1). Its HSDP (replicate x shard) has no field here: not searched. Release
#   0.2.2 runs DDP with no other parallelism (``torchtitan_ddp_rule``; 0.3.0 replicates through FSDP2 instead).
# - megatron: Megatron-Core ``DistributedDataParallel`` (zero 0), ``--use-distributed-optimizer`` (ZeRO-1),
#   ``--use-torch-fsdp2`` or Megatron-FSDP's ``--data-parallel-sharding-strategy optim_grads_params`` (zero 3,
#   declared without a pipeline). Megatron-FSDP's ``optim_grads`` (ZeRO-2) is left out: which releases carry
#   it, and with which parallelisms, is unclear.
# - deepspeed: ``zero_optimization.stage`` 0-3; pipelines (``PipelineModule``) with stage 0 or 1.
# - llm-foundry: Composer ``fsdp_config.sharding_strategy``: NO_SHARD (zero 0), SHARD_GRAD_OP (zero 2),
#   FULL_SHARD (zero 3); HYBRID_SHARD (FULL_SHARD inside a node, replicated across) has no field here. PyTorch
#   FSDP1 has no optimizer-only sharding: no ZeRO-1.
STACKS = {
    "torch": Runs("autopar's program: DDP / ZeroRedundancyOptimizer / ShardedAdamW / FSDP2"),
    "torchtitan": Runs("torchtitan data_parallel_replicate_degree / data_parallel_shard_degree, "
                       "fsdp_reshard_after_forward", {"zero_stage": (0, 2, 3)}, (torchtitan_ddp_rule,)),
    "megatron": Runs("Megatron-Core DDP, --use-distributed-optimizer, --use-torch-fsdp2 / Megatron-FSDP",
                     {"zero_stage": (0, 1, 3)}, (megatron_fsdp_rule,)),
    "deepspeed": Runs("DeepSpeed zero_optimization.stage", {"zero_stage": ZERO_STAGES}, (deepspeed_pipeline_rule,)),
    "llm-foundry": Runs("Composer fsdp_config.sharding_strategy NO_SHARD / SHARD_GRAD_OP / FULL_SHARD",
                        {"zero_stage": (0, 2, 3)}),
}

TECHNIQUE = Technique(
    name="data_parallel",
    fields=("dp", "zero_stage", "micro_batch", "global_batch"),
    rules=(batch_rule,),
    search={"dp": "world / (tp*cp*pp), dividing the global batch", "zero_stage": ZERO_STAGES,
            "micro_batch": "every divisor of global_batch / dp", "global_batch": "fixed by the command line"},
    cost_terms=("estimate:CostModel.dp_time", "estimate:CostModel.grad_sync_time", "estimate:CostModel.optimizer_time",
                "memory:model_state_bytes"),
    apply="autopar.codegen.runtime_parallel.apply_dp",
    stacks=STACKS,
)
