"""The host-bound step: an eager program's Python + dispatch + kernel launches as a floor under its step time.

On a GPU the host runs ahead of the device (CUDA's asynchronous queue), so a step costs the GPU's time
as long as the host issues kernels faster than the GPU runs them. When the kernels are small (a
micro-batch of one, many small experts looped one by one, narrow layers) the queue drains and the
GPU waits for the host. Each layer's forward and backward (per micro-batch, as the program runs them) takes at
least its kernel launches x ``host_launch_s`` (``layer_floor``): the emitted MoE program syncs once per layer (its
token counts), so the host cannot run further ahead than a layer there, and a layer is the unit the planner's
partition and bounds price (``LayerCost``), so estimate and search read the same floor.

Measured (docs/validation.md "On a GPU: the first run on an H100", ``benchmarks/gpu_trace.py`` on one
H100): autopar's emitted MoE program (h2048, 8 experts top-2, 4 layers, seq 4096, mbs 1, 4 micro-batches) kept
the GPU busy 200.8 ms of a 360 ms step in 5,497 kernel launches (host-bound); the dense llama-gpu program
(h4096) kept it busy 279.1 ms of 297 ms in 3,286 launches (GPU-bound).

Only the eager torch-native stacks (``--runtime torch`` / ``torchtitan`` / ``deepspeed``: one kernel or a few per
captured op, Python modules and hooks around each) have this floor. Megatron-Core launches fused Transformer
Engine kernels and grouped expert GEMMs from a lean host loop: its published rows are not host-bound at the eager
rate (with a step-level version of this floor, commit 91c2b56, Narayanan et al. 2021's PTD-P 174.6B rows priced
-73..-75% and the MoE Parallel Folding Qwen2-57B rows -28..-41%, against within 6.4% without:
``benchmarks/validate_published.py`` on published_modern.yaml, 2026-11-27), so ``EAGER_RUNTIMES`` leaves it out.
With it no published row moves (they are large, GPU-bound runs).

A CPU device runs every op synchronously: its host time is already in each op's price (``op_overhead_s``,
``dtensor_call_overhead_s`` of a measured CPU profile), so no floor applies there.
"""

from __future__ import annotations

from autopar.core.gpu import GpuProfile
from autopar.core.strategy import Strategy
from autopar.cost_models.layer_model import LayerTemplate, OpTerm

# Kernel launches per captured op call and pass (forward; backward counts 2 passes). The captured graph's
# ops are modules and aten nodes (an RMSNorm is one op but ~6 kernels; a cast or an add is one), and the
# step also launches the optimizer's foreach kernels and FSDP2's copies: per step, kernels / (micro-batches
# x 3 passes x captured op calls) = 5,497 / (4 x 3 x 237) = 1.93 on the MoE program and 3,286 / (4 x 3 x 145)
# = 1.89 on the dense one (the traces: docs/validation.md "On a GPU"; tests/test_host_bound.py checks the count).
KERNELS_PER_OP_CALL = 1.9
BACKWARD_PASSES = 2.0   # a backward launches about twice the forward's kernels (grad input + grad weight)
# A GPU profile without its own measurement: the H100's (h100-sxm.yaml sources.host_launch_s: 56.1 us, the traced
# MoE step less its optimizer and FSDP copies over its launches); the host's cost per launch belongs to the CPU and
# the eager framework more than to the GPU. For scale: a bare eager op on this repo's CPU container costs 8.4 us,
# 13.4 us through autograd (`kernel_rates.py --device cpu --launch`, no cudaLaunchKernel); the program's modules
# and FSDP2 hooks add the rest. `kernel_rates.py --launch` on the next lent GPU measures the floor there.
DEFAULT_HOST_LAUNCH_S = 5.61e-5
EAGER_RUNTIMES = ("torch", "torchtitan", "deepspeed")   # stacks the floor applies to (module docstring)


def host_launch_s(gpu: GpuProfile, runtime: str = "torch") -> float:
    """Host seconds per kernel launch of an eager step; 0 on a CPU device (ops run synchronously) and for a
    runtime outside ``EAGER_RUNTIMES``."""
    if gpu.cores or runtime not in EAGER_RUNTIMES:
        return 0.0
    own = getattr(gpu, "host_launch_s", None)  # a profile pickled before the field (benchmarks' row caches)
    return own if own is not None else DEFAULT_HOST_LAUNCH_S


def op_calls(op: OpTerm, s: Strategy, grouped: bool = False) -> float:
    """Launching calls of one captured op per micro-batch on one rank: an expert op loops over the rank's
    ``experts / ep`` local experts (the emitted program's per-expert loop, techniques/experts), one call where the
    stack runs them as a grouped GEMM (``StackConstants.expert_grouped_gemm``); others ``op.calls``."""
    if op.shard == "expert":
        return 1.0 if grouped else op.calls / s.ep
    return op.calls


def rerun(op: OpTerm, mode: str) -> bool:
    """Does recompute mode ``mode`` re-run this op's forward in backward (``layer_model`` module docstring)?"""
    return mode == "full" or (mode == "selective" and op.attn_core) or (mode == "op" and not op.op_kept)


def layer_launches(t: LayerTemplate, s: Strategy, mode: str = "none", grouped: bool = False) -> float:
    """Kernel launches of one layer per micro-batch: forward + backward (``BACKWARD_PASSES``) + the forward ops
    its recompute mode re-runs, each captured op call ``KERNELS_PER_OP_CALL`` kernels."""
    calls = sum(op_calls(o, s, grouped) * (1.0 + BACKWARD_PASSES + rerun(o, mode)) for o in t.ops)
    return calls * KERNELS_PER_OP_CALL


def rank_launches(cm, s: Strategy, layers: list[int], recompute: list[str], first: bool, last: bool) -> float:
    """Kernel launches of one pipeline rank per step: its layers (and the embedding / output it holds) for every
    micro-batch (what a trace's kernel count compares with; tests/test_host_bound.py)."""
    grouped = bool(cm.stack.expert_grouped_gemm)
    per_mb = sum(layer_launches(cm.blocks[i], s, recompute[i], grouped) for i in layers)
    per_mb += sum(layer_launches(t, s) for t, held in ((cm.embedding, first), (cm.output, last)) if t and held)
    return per_mb * s.num_micro_batches


def layer_floor(ops: list[OpTerm], s: Strategy, ctx, fwd_s: float, bwd_s: float) -> tuple[float, float, dict]:
    """(forward, backward, {recompute mode: its re-run's floor}) of one layer per micro-batch: each at least its
    kernel launches x ``host_launch_s``; ``ops``: the layer's ops as the runtime runs them. 0 floors (nothing
    changes) on a CPU device and outside ``EAGER_RUNTIMES``."""
    h = host_launch_s(ctx.timer.gpu, ctx.runtime)
    if not h:
        return fwd_s, bwd_s, {}
    grouped = bool(ctx.timer.stack and ctx.timer.stack.expert_grouped_gemm)
    one = KERNELS_PER_OP_CALL * h   # host seconds per captured op call and pass
    fwd_floor = one * sum(op_calls(o, s, grouped) for o in ops)
    reruns = {m: one * sum(op_calls(o, s, grouped) for o in ops if rerun(o, m)) for m in ("selective", "op", "full")}
    return max(fwd_s, fwd_floor), max(bwd_s, BACKWARD_PASSES * fwd_floor), reruns


def rerun_floor(recompute_s: dict[str, float], floors: dict[str, float]) -> dict[str, float]:
    """Each recompute mode's extra backward time, at least the host time of the forward ops it re-runs."""
    return {m: max(t, floors.get(m, 0.0)) for m, t in recompute_s.items()}
