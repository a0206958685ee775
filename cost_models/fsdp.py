"""Which data-parallel programs gather parameters unit by unit inside every micro-batch (FSDP), as
opposed to synchronising whole gradients once per step (DDP, ZeRO-1/2 optimizers)."""

from __future__ import annotations

FSDP_RUNTIMES = ("torch", "torchtitan")  # data parallel by FSDP2 (autopar's programs, torchtitan)


def gathers_per_unit(runtime: str, zero_stage: int, offload: bool = False) -> bool:
    """Whether a plan's data-parallel traffic is FSDP's: per micro-batch, each unit's parameters
    all-gathered one unit ahead of its forward (and, ZeRO-3, again in the backward) and its
    gradients reduce-scattered in the backward, priced per layer (``CostModel.zero3_layer_exposed``)
    with the step's first gather and last reduce-scatter exposed.

    ZeRO-3 runs so under every runtime. ZeRO-2 does on the FSDP runtimes: autopar's emitted
    program is ``fully_shard(reshard_after_forward=False)`` (``codegen.runtime_parallel.dp_mode``),
    which keeps the gathered parameters from forward to backward, reshards after the backward
    (FSDP2's default) and reduce-scatters every micro-batch (``codegen.runtime._grad_sync``), as
    PyTorch FSDP1's ``SHARD_GRAD_OP`` does (llm-foundry; PyTorch FSDP docs, ShardingStrategy:
    "parameters are sharded outside computation ... unsharded in forward, kept for backward").
    Megatron-Core's distributed optimizer and DeepSpeed ZeRO-2 keep whole parameters and reduce
    the gradients in buckets during the last backward, gathering the updated shards once per step
    (``overlap.grad_sync_exposed``).

    Optimizer offload runs FSDP2 with ``CPUOffloadPolicy`` at every ZeRO stage
    (``codegen.runtime_parallel.dp_mode``: below ZeRO-3 the ZeRO-2 program above), so on the FSDP
    runtimes it is per unit whatever the stage."""
    return zero_stage >= 3 or (runtime in FSDP_RUNTIMES and (zero_stage == 2 or offload))


def per_unit(cm, s) -> bool:
    """``gathers_per_unit`` of a ``CostModel``'s runtime for strategy ``s``."""
    return gathers_per_unit(cm.ctx.runtime, s.zero_stage, s.offload_optimizer)
