"""Optimizer offload (ZeRO-Offload): fp32 master weights and Adam moments in host memory, the
step on the CPU. Emitted through FSDP2's ``CPUOffloadPolicy`` inside ``apply_dp``; priced by
``estimate.offload_step_time`` and the host bytes of ``CostModel.rank_memory``. Searched only
where the GPU profile prices the host link and the host optimizer."""

from __future__ import annotations

from autopar.core.gpu import GpuProfile
from autopar.core.model_spec import ModelSpec
from autopar.core.strategy import Strategy
from autopar.techniques.base import Runs, Technique

VALUES = (False, True)
# Recompute modes emitted beside offload: under CPUOffloadPolicy the per-op policy's recompute meets
# FSDP2's host-to-device copies a different number of times than the forward did ("aten.copy_
# invocation index ... not found in storage", contract sweep); Megatron's selective policy runs.
OFFLOAD_RECOMPUTE = ("none", "selective", "full")


def priced_on(gpu: GpuProfile) -> bool:
    return bool(gpu.host_link_gbps and gpu.host_optimizer_gbps)


def gpu_violations(s: Strategy, gpu: GpuProfile) -> list[str]:
    if s.offload_optimizer and not priced_on(gpu):
        return [f"offload=1 needs host_link_gbps and host_optimizer_gbps in the {gpu.name} profile"]
    return []


def emitted_rule(s: Strategy, spec: ModelSpec | None, world: int, seq_len: int | None) -> list[str]:
    """No per-op recompute policy (``op``) beside FSDP2's ``CPUOffloadPolicy``: torch's selective checkpointing
    meets the offload copies a different number of times than the forward did (``OFFLOAD_RECOMPUTE``)."""
    if s.offload_optimizer and s.recompute not in OFFLOAD_RECOMPUTE:
        return [f"offload=1 with recompute={s.recompute} is not emitted yet (the per-op policy's recompute "
                "meets FSDP2's offload copies); use recompute=selective or full"]
    return []


def stage_rule(s: Strategy, spec: ModelSpec | None, world: int, seq_len: int | None) -> list[str]:
    """Below ZeRO-3, optimizer offload is one program whatever the stage: ``dp_program.dp_mode`` runs
    FSDP2 with ``CPUOffloadPolicy`` and no resharding after forward (the policy needs sharded parameters),
    so parameters, gradients and AdamW states are sharded (on the host) at zero 0 and 1 too: ZeRO-2's
    program, priced the same at every stage (tests/test_offload_stage.py). It is searched and emitted
    as zero=2 so that the plan names what runs. Without a reduced gradient (dp*cp = edp = 1) every stage
    is the same configuration and the search keeps the default stage."""
    if not s.offload_optimizer or s.zero_stage >= 2 or (s.dp * s.cp == 1 and s.edp == 1):
        return []
    return [f"offload=1 with zero={s.zero_stage} runs the zero=2 program (FSDP2 CPUOffloadPolicy shards parameters, "
            "gradients and AdamW states at every ZeRO stage); use zero=2,offload=1"]


def sharded_offload_rule(stages: tuple[int, ...], stack: str, how: str):
    """A rule: optimizer offload on ``stack`` runs at these ZeRO ``stages`` only (``how``: the config key)."""
    def rule(s: Strategy, spec: ModelSpec | None, world: int, seq_len: int | None) -> list[str]:
        if s.offload_optimizer and s.zero_stage not in stages:
            return [f"offload=1 with zero={s.zero_stage}: --runtime {stack} offloads the optimizer with {how}, at "
                    f"zero {' | '.join(map(str, stages))}; use one of them"]
        return []
    rule.__doc__ = f"{stack} offloads the optimizer ({how}) at zero {' | '.join(map(str, stages))} only."
    return rule


# What each stack runs of optimizer offload (fp32 master weights and AdamW states on the host, the step on the CPU):
# - torch: autopar's program (FSDP2 ``CPUOffloadPolicy``; the emit rules above).
# - torchtitan: ``training.enable_cpu_offload`` (FSDP2 ``CPUOffloadPolicy`` on its ``fully_shard``): zero 2, 3;
#   torch's per-op policy meets the policy's copies as in autopar's program (``emitted_rule``: no ``op`` with it).
# - megatron: ``--optimizer-cpu-offload`` (hybrid device optimizer) keeps parameters and gradients on the GPU
#   and offloads a fraction of the states: not the program offload=1 prices; left out.
# - deepspeed: ``zero_optimization.offload_optimizer.device = "cpu"`` (ZeRO-Offload, DeepSpeedCPUAdam), declared
#   by DeepSpeed for ZeRO stages 1-3; declared here at 2 and 3: the cost model prices offload below ZeRO-3 as one
#   program with sharded gradients (``stage_rule``), which stage 1 (gradients not partitioned) is not.
# - llm-foundry: Composer's FSDP ``fsdp_config`` declares no optimizer offload: left out.
STACKS = {
    "torch": Runs("autopar's program: FSDP2 CPUOffloadPolicy"),
    "torchtitan": Runs("torchtitan training.enable_cpu_offload", {},
                       (sharded_offload_rule((2, 3), "torchtitan", "FSDP2's CPUOffloadPolicy"), emitted_rule)),
    "megatron": Runs("Megatron-LM --optimizer-cpu-offload keeps parameters on the GPU: not this offload",
                     {"offload_optimizer": (False,)}),
    "deepspeed": Runs("DeepSpeed zero_optimization.offload_optimizer", {},
                      (sharded_offload_rule((2, 3), "deepspeed", "zero_optimization.offload_optimizer"),)),
    "llm-foundry": Runs("Composer fsdp_config declares no optimizer offload", {"offload_optimizer": (False,)}),
}

TECHNIQUE = Technique(
    name="offload",
    fields=("offload_optimizer",),
    rules=(),
    emit_rules=(emitted_rule, stage_rule),
    search={"offload_optimizer": VALUES},
    cost_terms=("estimate:offload_step_time", "estimate:CostModel.rank_memory"),
    apply="autopar.codegen.runtime_parallel.apply_dp",
    stacks=STACKS,
)
