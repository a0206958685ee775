"""Which torch API runs a plan's data parallel (``dp_mode``): the one rule the emitted program applies
(``codegen.runtime_parallel.apply_dp``) and the cost model prices (``cost_models.fsdp_copy.program``).
Pure Python, no autopar import: ``autopar emit`` copies it into the run directory (``codegen.emit_vendor``)."""

from __future__ import annotations


def dp_mode(zero_stage: int, dp_cp: int, has_dtensor: bool, has_ep: bool, pipeline: bool = False,
            offload: bool = False, dtype: str = "fp32") -> str:
    """Which torch API implements the data-parallel part of a plan (and its precision).

    - ``none``: dp*cp = 1, fp32, no offload: the module as built.
    - ``ddp``: fp32 zero 0/1 on plain parameters without a pipeline: ``DistributedDataParallel``
      (ZeRO-1 adds ``ZeroRedundancyOptimizer``, params/grads whole, states partitioned, its parameter
      broadcasts after the step exposed: ``cost_models.fsdp.broadcasts_after_step``).
      Wraps a *materialized* module.
    - ``replicate``: zero 0 with tensor parallel (DTensor parameters, which DDP cannot hold),
      with a pipeline (DDP's bucket rebuild breaks when schedules interleave microbatch
      backwards), or in 16-bit: FSDP2's ``replicate``, an all-reduce per block, no sharding,
      its ``MixedPrecisionPolicy`` giving 16-bit compute weights and collectives.
    - ``zero1``: zero 1 with DTensor, expert or pipelined parameters, or 16-bit: no wrapper,
      ``runtime_zero1.ShardedAdamW`` (whole params and grads, sharded fp32 master + moments; bucketed
      reduce-scatters during the last backward, all-gathers beside the next forward, as Megatron-Core's
      overlapped distributed optimizer): ZeRO-1 as priced (``cost_models.fsdp.gathers_next_forward``;
      under zero-bubble schedules ``syncs_after_backward``: exposed).
    - ``fsdp2``: ZeRO-2 = ``fully_shard(reshard_after_forward=False)`` (parameters stay
      gathered from forward to backward, gradients and optimizer states sharded);
      ZeRO-3 = ``fully_shard`` (parameters re-gathered in backward, also under a pipeline);
      optimizer offload = either with ``CPUOffloadPolicy`` (any zero stage: the policy needs
      FSDP2's sharded parameters, which then live on the host with their gradients and states).
    """
    if offload:
        return "fsdp2"
    half = dtype != "fp32"
    if zero_stage >= 2 and (dp_cp > 1 or half):
        return "fsdp2"
    if zero_stage == 1 and (half or (dp_cp > 1 and (has_dtensor or has_ep or pipeline))):
        return "zero1"
    if dp_cp == 1 and not half:
        return "none"
    if half or has_dtensor or pipeline:
        return "replicate"
    return "ddp"


def plan_dp_mode(s, dtype: str) -> str:
    """``dp_mode`` of a plan's strategy ``s`` (a ``core.strategy.Strategy``: its zero stage, dp, cp, tp, etp, ep, pp
    and offload) trained in ``dtype``: tensor or expert-tensor parallel weights are DTensors, expert (or
    expert-tensor) parallel puts experts on their own group. What the emitted program runs
    (``codegen.emit_checks``) and what the cost model prices (``cost_models.fsdp``) read it here."""
    return dp_mode(s.zero_stage, s.dp * s.cp, s.tp > 1 or s.etp > 1, s.ep > 1 or s.etp > 1, s.pp > 1,
                   s.offload_optimizer, dtype)


# Pipeline schedules that split each micro-batch's backward into an input-gradient pass and a later weight-gradient
# pass (torch's ``stage_backward_weight``), the zero-bubble ones: ``techniques.pipeline.ZERO_BUBBLE`` reads it here.
SPLIT_BACKWARD = ("zb_interleaved", "zbv", "dualpipev")


def whole_backward(schedule: str | bool) -> bool:
    """Whether a micro-batch's backward is one autograd pass, so gradient hooks see every weight gradient in it:
    every pipeline ``schedule`` but ``SPLIT_BACKWARD``'s (``True`` / ``False``: a pipeline without a name / none).
    The one rule for ZeRO-1's overlap and FSDP's per-micro-batch resharding: ``codegen.runtime_parallel.apply_dp``
    reduce-scatters ZeRO-1 during the last backward only here, ``cost_models.fsdp.syncs_after_backward`` prices
    it exposed elsewhere and ``planner.bounds.grad_sync_floor`` keys its floor on it."""
    return schedule not in SPLIT_BACKWARD


# ZeRO-1's gradient bucket (``codegen.runtime_zero1``): the bytes of training-dtype gradient one reduce-scatter and
# one all-gather move, PyTorch DDP's ``bucket_cap_mb`` default (25 MiB); Megatron-Core's distributed optimizer
# buckets 40M elements or more (``DistributedDataParallelConfig.bucket_size``). Read by the program and its price
# (``cost_models.fsdp.step_sync_exposed``: the last bucket's reduce-scatter and the first one's gather stay exposed).
ZERO1_BUCKET_BYTES = 25 * 2**20
