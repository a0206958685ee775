"""The host-bound step: an eager program's Python + dispatch + kernel launches as a floor under its step time.

On a GPU the host runs ahead of the device (CUDA's asynchronous queue), so a step costs the GPU's time
as long as the host issues kernels faster than the GPU runs them. When the kernels are small (a
micro-batch of one, many small experts looped one by one, narrow layers) the queue drains and the
GPU waits for the host. Each layer per micro-batch, as the program runs it (forward, backward and what its
recompute mode re-runs), takes at least its kernel launches x ``host_launch_s`` (``layer_floor``): the floor is on
the layer's total, not on each piece, since within a layer the host queue runs ahead across pieces (a backward whose
kernels outlast their launches hides a light forward's host time), and the emitted MoE program syncs once per
layer (its token counts), so the host cannot run further ahead than a layer there; a layer is also the unit the
planner's partition and bounds price (``LayerCost``), so estimate and search read the same floor.

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
from autopar.cost_models.recompute_cost import rerun_ops
from autopar.memo import MISS, IdentityMemo

# A GPU profile without its own host_launch_s takes the H100's (GpuProfile's default, h100-sxm.yaml
# sources.host_launch_s: 56.1 us, the traced MoE step less its optimizer and FSDP copies over its launches). For
# scale: a bare eager op on this repo's CPU container costs 8.4 us, 13.4 us through autograd (`kernel_rates.py
# --device cpu --launch`, no cudaLaunchKernel); the program's modules and FSDP2 hooks add the rest.
# `kernel_rates.py --launch` on the next lent GPU measures the floor there.
EAGER_RUNTIMES = ("torch", "torchtitan", "deepspeed")   # stacks the floor applies to (module docstring)
# layer_calls by (mode, grouped, runtime, ep) and the layer and its ops: every pricing of a layer floors its modes
_CALLS = IdentityMemo(4096)


def host_launch_s(gpu: GpuProfile, runtime: str = "torch") -> float:
    """Host seconds per kernel launch of an eager step; 0 on a CPU device (ops run synchronously) and for a
    runtime outside ``EAGER_RUNTIMES``."""
    if gpu.cores or runtime not in EAGER_RUNTIMES:
        return 0.0
    # a profile pickled before the field, or with None from before it had a default (benchmarks' row caches)
    own = getattr(gpu, "host_launch_s", None)
    return own if own is not None else GpuProfile.model_fields["host_launch_s"].default


def launch_rates(gpu: GpuProfile) -> tuple[float, float]:
    """(kernels per captured op call and forward pass, backward kernels per forward kernel) of the profile
    (``GpuProfile.kernels_per_op_call`` / ``backward_launch_ratio``; their defaults where a profile pickled before
    the fields lacks them)."""
    fields = GpuProfile.model_fields
    return (getattr(gpu, "kernels_per_op_call", fields["kernels_per_op_call"].default),
            getattr(gpu, "backward_launch_ratio", fields["backward_launch_ratio"].default))


def op_calls(op: OpTerm, s: Strategy, grouped: bool = False) -> float:
    """Launching calls of one captured op per micro-batch on one rank: an expert op loops over the rank's
    ``experts / ep`` local experts (the emitted program's per-expert loop, techniques/experts), one call where the
    stack runs them as a grouped GEMM (``StackConstants.expert_grouped_gemm``); others ``op.calls``."""
    if op.shard == "expert":
        return 1.0 if grouped else op.calls / s.ep
    return op.calls


def layer_calls(t: LayerTemplate, s: Strategy, mode: str = "none", grouped: bool = False,
                runtime: str = "torch", ops: list[OpTerm] | None = None) -> tuple[float, float]:
    """(captured op calls of one forward pass, of the forward ops recompute ``mode`` re-runs) of one layer per
    micro-batch (``recompute_cost.rerun_ops``); ``ops``: the layer's ops as the runtime runs them (its captured ones
    by default)."""
    ops = t.ops if ops is None else ops
    key, out = _CALLS.lookup((mode, grouped, runtime, s.ep), (t, ops))   # of ``s``, op_calls reads ep alone
    if out is MISS:
        calls = [op_calls(o, s, grouped) for o in ops]
        out = _CALLS.put(key, (t, ops), (sum(calls), sum(calls[i] for i in rerun_ops(t, ops, mode, runtime))))
    return out


def grouped_experts(stack) -> bool:
    """Whether the stack runs a rank's experts as one grouped GEMM (``StackConstants.expert_grouped_gemm``)."""
    return bool(stack and stack.expert_grouped_gemm)


def launches(gpu: GpuProfile, fwd_calls: float, rerun_calls: float) -> float:
    """Kernel launches of ``fwd_calls`` op calls run forward and backward (x ``backward_launch_ratio``) and
    ``rerun_calls`` re-run, each call ``kernels_per_op_call`` kernels a pass."""
    k, ratio = launch_rates(gpu)
    return k * (fwd_calls * (1.0 + ratio) + rerun_calls)


def layer_launches(t: LayerTemplate, s: Strategy, gpu: GpuProfile, mode: str = "none", grouped: bool = False,
                   runtime: str = "torch") -> float:
    """Kernel launches of one layer per micro-batch: forward, backward and its recompute mode's re-run."""
    return launches(gpu, *layer_calls(t, s, mode, grouped, runtime))


def rank_calls(cm, s: Strategy, layers: list[int], recompute: list[str], first: bool, last: bool
               ) -> tuple[float, float]:
    """(forward op calls, re-run op calls) of one pipeline rank per step: its layers (and the embedding / output
    it holds) for every micro-batch."""
    grouped, rt = grouped_experts(cm.stack), cm.ctx.runtime
    per_mb = [layer_calls(cm.blocks[i], s, recompute[i], grouped, rt) for i in layers]
    per_mb += [layer_calls(t, s, runtime=rt) for t, held in ((cm.embedding, first), (cm.output, last)) if t and held]
    return tuple(sum(c[j] for c in per_mb) * s.num_micro_batches for j in (0, 1))


def rank_launches(cm, s: Strategy, layers: list[int], recompute: list[str], first: bool, last: bool) -> float:
    """Kernel launches of one pipeline rank per step (what a trace's kernel count compares with;
    tests/test_host_bound.py, ``benchmarks/fit_kernel_rates.py``)."""
    return launches(cm.gpu, *rank_calls(cm, s, layers, recompute, first, last))


def layer_floor(layer: LayerTemplate, ops: list[OpTerm], s: Strategy, ctx, fwd_s: float, bwd_s: float,
                recompute_s: dict[str, float]) -> tuple[float, float, dict[str, float]]:
    """(forward, backward, {recompute mode: its extra backward}) of one layer per micro-batch, the GPU's times
    ``fwd_s`` / ``bwd_s`` / ``recompute_s`` floored on their total: forward + backward + each mode's re-run takes
    max(the GPU's total, the host's: its launches x ``host_launch_s``). ``ops``: the layer's ops as the runtime
    runs them. Unchanged on a CPU device, outside ``EAGER_RUNTIMES`` and where no piece is host-bound."""
    h = host_launch_s(ctx.timer.gpu, ctx.runtime)
    if not h:
        return fwd_s, bwd_s, recompute_s
    gpu, grouped, rt = ctx.timer.gpu, grouped_experts(ctx.timer.stack), ctx.runtime
    host = h * launches(gpu, layer_calls(layer, s, "none", grouped, rt, ops)[0], 0.0)   # forward + backward
    host_f = host / (1.0 + launch_rates(gpu)[1])
    fwd, bwd = split_total(fwd_s, bwd_s, host_f, host - host_f)
    dev, base = fwd_s + bwd_s, fwd + bwd
    again = {m: h * launches(gpu, 0.0, layer_calls(layer, s, m, grouped, rt, ops)[1]) for m in recompute_s}
    return fwd, bwd, {m: _extra(dev, host, base, t, again[m]) for m, t in recompute_s.items()}


def _extra(dev: float, host: float, base: float, dev_extra: float, host_extra: float) -> float:
    """A recompute mode's extra backward: max(GPU total, host total) with the re-run's GPU / host seconds, less
    ``base`` (the floored forward + backward); ``dev_extra`` as it is where the GPU bounds all (so no rounding moves a
    GPU-bound price)."""
    total = max(dev + dev_extra, host + host_extra)
    return dev_extra if base == dev and total == dev + dev_extra else max(0.0, total - base)


def split_total(fwd_s: float, bwd_s: float, host_f: float, host_b: float) -> tuple[float, float]:
    """(forward, backward) summing to max(GPU total, host total), split in proportion to each piece's own bound
    (the host's where its launches outlast its kernels): a fully host-bound layer keeps the host's split, a
    GPU-bound one its own times (returned as they are where no piece is host-bound)."""
    wf, wb = max(fwd_s, host_f), max(bwd_s, host_b)
    if wf == fwd_s and wb == bwd_s:
        return fwd_s, bwd_s
    total = max(fwd_s + bwd_s, host_f + host_b)
    fwd = total * wf / (wf + wb)
    return fwd, total - fwd
