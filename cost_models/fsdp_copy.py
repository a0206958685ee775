"""FSDP2's own device copies and casts per step (and ``CPUOffloadPolicy``'s host traffic): what
``torch.distributed.fsdp.fully_shard`` and ``replicate`` (``_composable.replicate_with_fsdp``) move in
device memory around each unit's collectives, priced at the profile's memory-bound rate.

Counted from torch 2.13's source (``torch/distributed/fsdp/_fully_shard/``; the GPU check ran torch 2.11):

- a gather (``FSDPParamGroup.unshard`` + ``wait_for_unshard``) over n > 1 ranks: copy-in
  (``_get_param_all_gather_inputs``: one ``_foreach_copy_`` of the fp32 shard into a 16-bit flat buffer, the
  ``MixedPrecisionPolicy`` cast, then ``all_gather_copy_in_cuda``'s copy into the all-gather output), the
  collective, copy-out (``split_with_sizes_copy`` into the unsharded parameters, full size). One rank
  (``world_size == 1``, and always under ``replicate``'s ``DDPMeshInfo``): ``all_gather_inputs`` (the cast)
  and one ``copy_`` into the unsharded parameter.
- a reduce (``foreach_reduce``): ``chunk_cat`` of the unsharded gradients into the reduce buffer (full size,
  cast to ``reduce_dtype`` on the way), the collective (one rank: a ``copy_`` instead), the cast of the
  reduced shard back to the fp32 parameter dtype, and its accumulation into the sharded gradient
  (``_local_tensor += ...``) from a step's second reduce on.

Copy-out and the reduce copy-in run on the compute stream; the copy-in and the post-reduce cast and
accumulation on FSDP's side streams. All are memory bound beside compute-bound GEMMs and attention, which
leave them no idle SMs to run in, so every byte is priced on the critical path: the GPU check
(docs/validation.md, "FSDP2 copies and casts, priced") measured zero=3 on one H100 41 ms slower per step than
``replicate``; the bytes below that differ between them, 133.9 GB, take that at 3.27 TB/s, near the HBM peak
(``benchmarks/fsdp_copy_probe.py``).
At dp > 1 these copies sit beside the collectives (``CostModel.dp_time``), which overlap compute on their
own streams; the copies do not hide there either, so they add to the step at every dp size.

Megatron-Core and DeepSpeed keep whole 16-bit parameters and fp32 main gradients (no per-unit copies):
no term. llm-foundry runs FSDP1 (flat parameters: the all-gather writes the unsharded flat parameter the
module's parameters view, its reduce-scatter reads the flat gradient: no copy-out, no copy-in; only the
1/n shard casts remain), but its rows price as ``--runtime torch``; see docs/validation.md."""

from __future__ import annotations

from typing import Literal

from autopar.core.gpu import GpuProfile
from autopar.cost_models import fsdp
from autopar.cost_models.memory import bytes_per_param
from autopar.techniques.dp_program import plan_dp_mode

MASTER_BYTES = 4  # FSDP2's sharded parameters and gradients stay fp32 (``mp_policy``: only compute is 16-bit)
ACCUMULATE_BYTES = 12  # sharded_grad += new: read both fp32 tensors, write one
FsdpProgram = Literal["fsdp2", "replicate", "none"]
# ``fsdp.FsdpImpl`` (the pricing context's ``fsdp_impl``): DEFAULT is bf16 parameters with an fp32 reduce (the
# full-size gradient cast ``fsdp1_step_bytes`` counts and ``fsdp.reduce_bytes``; "fp32_params" is historical).


def gather_copy_bytes(n: int, compute_bytes: int) -> float:
    """Device bytes read + written per parameter of a unit by one FSDP2 gather over ``n`` ranks
    (``_fsdp_param_group.unshard``/``wait_for_unshard``, ``_fsdp_collectives.foreach_all_gather``):
    the ``MixedPrecisionPolicy`` cast of the fp32 shard (4 + c bytes per shard element, only when the
    compute dtype is narrower), the copy into the all-gather buffer (2c per shard element) and the
    copy-out into the unsharded parameters (2c per element). One rank: the cast and one ``copy_``."""
    cast = MASTER_BYTES + compute_bytes if compute_bytes < MASTER_BYTES else 0
    if n <= 1:
        return cast + 2 * compute_bytes
    return (cast + 2 * compute_bytes) / n + 2 * compute_bytes


def reduce_copy_bytes(n: int, grad_bytes: int, reduce_bytes: int, accumulate: bool) -> float:
    """Device bytes read + written per parameter of a unit by one FSDP2 reduce over ``n`` ranks
    (``_fsdp_collectives.foreach_reduce``): ``chunk_cat`` copy-in of the gradients (g + r per element),
    one rank's ``reduce_output.copy_`` in place of the reduce-scatter (2r), the cast of the shard to
    fp32 (r + 4 per shard element, when r < 4), and ``+=`` into the sharded gradient (12 per shard
    element) when the step already holds one."""
    out = grad_bytes + reduce_bytes + (2 * reduce_bytes if n <= 1 else 0)
    cast = reduce_bytes + MASTER_BYTES if reduce_bytes < MASTER_BYTES else 0
    return out + (cast + (ACCUMULATE_BYTES if accumulate else 0)) / max(n, 1)


def step_copy_bytes(params: float, n: int, gathers: int, reduces: int, compute_bytes: int, reduce_bytes: int,
                    accumulate: bool = True) -> float:
    """Bytes of FSDP2's copies per step for ``params`` parameters of one rank sharded over ``n``:
    ``gathers`` gathers and ``reduces`` reduces, the first reduce of the step assigning the sharded
    gradient (``zero_grad(set_to_none=True)``), the others accumulating into it (``accumulate``: False
    where the gradient accumulates on the host, ``CPUOffloadPolicy``)."""
    if params <= 0 or (gathers <= 0 and reduces <= 0):
        return 0.0
    per_param = gathers * gather_copy_bytes(n, compute_bytes)
    if reduces > 0:
        per_param += reduce_copy_bytes(n, compute_bytes, reduce_bytes, False)
        per_param += (reduces - 1) * reduce_copy_bytes(n, compute_bytes, reduce_bytes, accumulate)
    return params * per_param


def fsdp1_step_bytes(params: float, n: int, gathers: int, reduces: int, fp32_params: bool) -> float:
    """Bytes of PyTorch FSDP1's device casts per step (``torch/distributed/fsdp/_flat_param.py``,
    ``_runtime_utils._reduce_grad``): the all-gather writes the unsharded flat parameter whose views are the
    module's parameters (no copy-out) and the reduce-scatter reads the flat gradient (no copy-in). Left:
    with bf16 parameters (PURE) the cast of the fp32 shard before each all-gather (6 bytes per shard
    element); with fp32 parameters (DEFAULT) the cast of the whole fp32 gradient to the bf16 reduce
    dtype before each reduce-scatter (6 bytes per element); both: the reduced shard cast back to fp32 and
    accumulated from the step's second reduce on (6 + 12 per shard element)."""
    if params <= 0 or n <= 1:
        return 0.0
    cast = MASTER_BYTES + 2
    per_param = (0.0 if fp32_params else gathers * cast / n) + reduces * ((cast if fp32_params else 0) + cast / n)
    return params * (per_param + max(reduces - 1, 0) * ACCUMULATE_BYTES / n)


def program(runtime: str, s, dtype: str) -> FsdpProgram:
    """Which FSDP2 API runs the data parallel of strategy ``s`` (a ``core.strategy.Strategy``) trained in
    ``dtype``: torchtitan shards with ``fully_shard`` at every ZeRO stage it is priced with (2 and 3); autopar's
    program (``--runtime torch``) as the emitted program picks it (``techniques.dp_program.plan_dp_mode``:
    ``fsdp2`` and ``replicate`` are FSDP2; ``zero1`` (ShardedAdamW), ``ddp`` and ``none`` run no FSDP2).
    Megatron and DeepSpeed run no FSDP2."""
    if runtime == "torchtitan":
        return "fsdp2" if s.zero_stage >= 2 or s.offload_optimizer else "none"
    if runtime != "torch":
        return "none"
    mode = plan_dp_mode(s, dtype)
    return mode if mode in ("fsdp2", "replicate") else "none"


def rank_params(r, costs) -> tuple[float, float]:
    """(dense, expert) parameters of rank ``r``'s blocks, one FSDP2 unit each. The root unit (embedding,
    final norm, output: ``fully_shard(model)``) is left out, as ``CostModel.optimizer_time`` leaves it out of
    the rank's step: the planner prices a rank's step terms per block count (``planner.partition``)."""
    return sum(costs[i].params_dense for i in r.layers), sum(costs[i].params_expert for i in r.layers)


def copy_time(cm, s, r, costs) -> float:
    """Seconds per step of FSDP2's copies on rank ``r`` (memory bound, on the critical path)."""
    if not r.layers:
        return 0.0
    return cm.timer.membound(copy_bytes(cm, s, *rank_params(r, costs)))


def copy_bytes(cm, s, dense: float, expert: float) -> float:
    """Device bytes of FSDP2's copies per step on a rank holding ``dense`` / ``expert`` block parameters (linear
    in them: the search's ``step_floors.copy_floor`` reads the mean rank's)."""
    kind = program(cm.ctx.runtime, s, cm.dtype)
    if kind == "none":
        return 0.0
    c = 4 if cm.dtype == "fp32" else 2  # fp16 / fp8 plans run bf16 weights (codegen.runtime_parallel.mp_policy)
    red = fsdp.reduce_bytes(cm.ctx.runtime, bytes_per_param(cm.dtype)[1]) if c < 4 else 4
    impl = cm.ctx.fsdp_impl
    if impl in fsdp.FSDP1_IMPLS:  # FSDP1 (llm-foundry): shards every stage it runs, flat parameters
        if not fsdp.per_unit(cm, s):
            return 0.0
        syncs = fsdp.unit_syncs_per_step(cm, s)
        g = syncs * (2 if fsdp.regathers(cm, s) else 1)
        return fsdp1_step_bytes(dense + expert, s.dp * s.cp, g, syncs, impl == "fsdp1_fp32_params")
    if kind == "replicate":  # gathered each micro-batch (once under a pipeline), reduced once per step
        g = 1 if s.pp > 1 else s.num_micro_batches
        return step_copy_bytes(dense + expert, 1, g, 1, c, red)
    syncs = fsdp.unit_syncs_per_step(cm, s)
    g = syncs * (2 if fsdp.regathers(cm, s) else 1)
    acc = not s.offload_optimizer
    return step_copy_bytes(dense, s.dp * s.cp, g, syncs, c, red, acc) + \
        step_copy_bytes(expert, s.edp, g, syncs, c, red, acc)


def offload_copies(zero_stage: int, micro_batches: int) -> tuple[int, int]:
    """(gathers, reductions) of the host-held shard per step under ``CPUOffloadPolicy``: one all-gather per
    ``micro_batches`` (two under ZeRO-3: forward and backward) and one reduce-scatter (``micro_batches``:
    ``fsdp.unit_syncs_per_step``, 1 where a pipeline defers FSDP's traffic to the stage's last backward)."""
    return micro_batches * (2 if zero_stage >= 3 else 1), micro_batches


def offload_step_time(params: float, dtype: str, gpu: GpuProfile, gathers: int = 1, reductions: int = 1) -> float:
    """Optimizer offload as emitted: FSDP2 ``CPUOffloadPolicy`` (torch.distributed.fsdp). The
    rank's parameter shard ``params`` is copied host -> device in fp32 (4 bytes, the master
    copy) at each of ``gathers`` all-gathers per step (each micro-batch's forward, and its
    backward again under ZeRO-3), its reduced gradient shard device -> host after each of
    ``reductions`` reduce-scatters (one per micro-batch), and AdamW runs on the CPU over the
    fp32 states (memory bound on the GPU's share of host bandwidth; ZeRO-Offload, Ren et al.
    2021, Sec. 4). Not overlapped with compute."""
    p, g, o = bytes_per_param(dtype)
    copies = params * (gathers * 4 + reductions * g) / (gpu.host_link_gbps * 1e9)
    adam = params * (2 * o + g + p) / (gpu.host_optimizer_gbps * 1e9)
    return copies + adam
