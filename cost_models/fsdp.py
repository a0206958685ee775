"""Which data-parallel programs gather parameters unit by unit inside every micro-batch (FSDP), as
opposed to synchronising whole gradients once per step (DDP, ZeRO-1/2 optimizers); how often a
unit's traffic runs per step (once per micro-batch, or once per step in a stage of torch's
pipelining: ``syncs_once_per_step``); and in which dtype it reduces (``reduce_bytes``)."""

from __future__ import annotations

from functools import lru_cache
from typing import Literal, NamedTuple, get_args

from autopar.cost_models import overlap
from autopar.cost_models.layer_model import tied_copy_params
from autopar.cost_models.pipeline import end_ranks
from autopar.techniques.dp_program import ZERO1_BUCKET_BYTES, dp_mode, plan_dp_mode, whole_backward

# PyTorch DDP bucket_cap_mb default (torch.nn.parallel.DistributedDataParallel), also FSDP2 ``replicate``'s price;
# autopar's ZeRO-1 program buckets ``techniques.dp_program.ZERO1_BUCKET_BYTES`` (``last_bucket_bytes``)
DDP_BUCKET_BYTES = 25 * 2**20

FSDP_RUNTIMES = ("torch", "torchtitan")  # data parallel by FSDP2 (autopar's programs, torchtitan)
# Which FSDP a --runtime torch plan runs (``PricingContext.fsdp_impl``): autopar's program is FSDP2; llm-foundry's
# published rows ran PyTorch FSDP1 (flat parameters) with Composer's mixed precision PURE (bf16 parameters and
# reduce) or DEFAULT (fp32 reduce: ``reduce_bytes``, ``fsdp_copy.fsdp1_step_bytes``), set by
# benchmarks/published_foundry_rows.fsdp_impl through ``session.Inputs``. Meta's Llama 3 row ran Meta's own FSDP
# ("meta": ``syncs_after_backward``), priced as autopar's programs are except where that rule names it.
FsdpImpl = Literal["fsdp2", "fsdp1_pure", "fsdp1_fp32_params", "meta"]
FSDP_IMPLS: tuple[str, ...] = get_args(FsdpImpl)
FSDP1_IMPLS = ("fsdp1_pure", "fsdp1_fp32_params")


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


# Runtimes whose FSDP runs under torch.distributed.pipelining as torch ships it: torchtitan's pipeline
# (``parallelize_llama.apply_fsdp``: ``reshard_after_forward=False`` when pp is enabled).
DEFERRED_RUNTIMES = ("torchtitan",)


def syncs_once_per_step(runtime: str, pp: int, schedule: str = "1f1b") -> bool:
    """Whether a pipelined FSDP stage gathers its parameters once per step and reduce-scatters its
    gradients once per step, at its last micro-batch, instead of once per micro-batch.

    torch.distributed.pipelining (torch 2.13 ``pipelining/stage.py``, ``backward_maybe_with_nosync``
    lines 843-847) runs every micro-batch's backward of an ``FSDPModule`` stage with
    ``set_requires_gradient_sync(False)`` and ``set_reshard_after_backward(False)``; the schedule's
    ``REDUCE_GRAD`` action after the stage's last backward (``perform_reduce_grad``, lines 1174-1191;
    torch 2.4-2.6: the same calls inside ``backward_maybe_with_nosync`` on ``last_backward``) turns
    both back on and runs FSDP's ``post_backward`` for every parameter group: one reduce-scatter
    per unit per step, from the unsharded gradients accumulated in ``reduce_dtype``. torchtitan
    shards with ``reshard_after_forward=False`` under a pipeline, so the parameters gathered in a
    stage's first forward stay gathered to its last backward: one all-gather per unit per step.

    autopar's own program (``--runtime torch``) undoes the stage's setters for full-backward
    schedules (``codegen.runtime_parallel._keep_per_microbatch_sharding``) and reduce-scatters
    every micro-batch, as ``gathers_per_unit`` prices it. Under the zero-bubble schedules
    (not ``techniques.dp_program.whole_backward``) it keeps
    torch's deferral and shards with ``reshard_after_forward=False`` (resharding between a micro-batch's
    input- and weight-gradient passes gave wrong losses): once per step, as torchtitan, for a rank's
    first 3 stages (torch's lowering re-gathers the others: ``techniques.pipeline.torch_rule`` refuses
    more). Counted per unit and step on gloo (tests/test_zero_bubble_fsdp.py). Megatron and DeepSpeed
    do not run FSDP."""
    if pp <= 1:
        return False
    return runtime in DEFERRED_RUNTIMES or (runtime == "torch" and not whole_backward(schedule))


def holds_stage_grads(runtime: str, pp: int, schedule: str, zero_stage: int, offload: bool, dp_cp: int,
                      dtype: str) -> bool:
    """Whether autopar's program accumulates a stage's whole unsharded gradients to its last backward:
    FSDP2 below ZeRO-3 (``techniques.dp_program.dp_mode``, the program's own rule: ZeRO-2 over several
    ranks or in 16 bits, or optimizer offload; tensor and expert parallel do not change that choice) under
    torch's deferral (``syncs_once_per_step``). ZeRO-3 is refused there (``techniques.pipeline.torch_rule``).
    Read by ``runtime_memory.deferred_fsdp_memory`` and the search's memory floor."""
    if runtime != "torch" or zero_stage >= 3 or not syncs_once_per_step(runtime, pp, schedule):
        return False
    return dp_mode(zero_stage, dp_cp, False, False, pp > 1, offload, dtype) == "fsdp2"


def plan_holds_stage_grads(cm, s) -> bool:
    """``holds_stage_grads`` of strategy ``s`` (a ``core.strategy.Strategy`` or the search's probe) priced by
    ``cm``: read by ``runtime_memory.deferred_fsdp_memory`` and the search's floors."""
    return cm_holds_stage_grads(cm, s.pp, s.schedule, s.zero_stage, s.offload_optimizer, s.dp * s.cp)


def cm_holds_stage_grads(cm, pp: int, schedule: str, zero_stage: int, offload: bool, dp_cp: int) -> bool:
    """``holds_stage_grads`` under the runtime and dtype of ``cm`` (a ``CostModel``), memoized (the search asks it
    of every configuration: ``planner.groups.holds_grads``, without building a probe)."""
    return _holds(cm.ctx.runtime, pp, schedule, zero_stage, offload, dp_cp, cm.dtype)


_holds = lru_cache(maxsize=4096)(holds_stage_grads)


def syncs_after_backward(runtime: str, s, dtype: str, impl: str) -> bool:
    """Whether autopar's program runs a rank's whole data-parallel gradient sync after its last backward with
    nothing beside it, instead of bucket by bucket during the last micro-batch's backward
    (``overlap.grad_sync_exposed``), for strategy ``s`` trained in ``dtype`` by FSDP ``impl`` (``FsdpImpl``);
    the program is ``techniques.dp_program.dp_mode``'s, read from the plan as ``codegen.emit_checks`` reads it.

    - ZeRO-0 under a pipeline is FSDP2's ``replicate`` (DDP's bucket rebuild breaks under interleaved
      schedules); torch.distributed.pipelining runs every micro-batch's backward of such a stage with
      ``set_requires_gradient_sync(False)`` and the schedule's ``REDUCE_GRAD`` (``perform_reduce_grad``)
      issues every unit's all-reduce after the stage's last backward, the compute stream waiting on the last
      one (``_root_post_backward_final_callback``). Counted on gloo: every all-reduce inside REDUCE_GRAD
      (tests/test_pipeline_dp_sync.py); interleaved, a chunk's runs before the other's last backwards, which wait on it
      (tests/test_reduce_grad_order.py).
    - ZeRO-1 as ``zero1`` under a zero-bubble schedule (not ``techniques.dp_program.whole_backward``): torch's
      ``stage_backward_weight`` adds the weight gradients to ``param.grad`` itself, outside autograd's
      post-accumulate-grad hooks that start ``runtime_zero1.Bucket``'s reduce-scatters, so ``sync_grads``
      reduce-scatters every bucket after the last backward (``runtime_parallel.apply_dp``: no count). Every
      other ``zero1`` program overlaps it (``gathers_next_forward``). Meta's Llama 3 stack (``impl`` "meta"),
      which the published row prices as ZeRO-1 under its pipeline (``benchmarks/published_dense_rows.llama3_zero``),
      reduces and gathers asynchronously (Llama Team 2024, Sec. 3.3.2): its sync hides behind the last backward.

    Where it does, the whole sync is priced exposed: ``CostModel.dp_time``, ``partition.RankPricer.dp_time`` and
    ``bounds.grad_sync_floor`` read this rule."""
    if runtime != "torch" or impl == "meta" or s.pp <= 1:
        return False
    mode = plan_dp_mode(s, dtype)
    return mode == "replicate" or (mode == "zero1" and not whole_backward(s.schedule))


def gathers_next_forward(runtime: str, s, dtype: str, impl: str) -> bool:
    """Whether autopar's program all-gathers the step's updated parameters beside the next step's first forward:
    ZeRO-1 as ``zero1`` (``runtime_zero1``) outside the zero-bubble schedules. Megatron-Core's distributed optimizer
    with ``--overlap-grad-reduce`` / ``--overlap-param-gather``, as autopar runs it: each bucket
    (``ZERO1_BUCKET_BYTES``) reduce-scatters as the last micro-batch's backward completes its gradients, and its
    all-gather, issued after the step, is waited in the forward pre-hook of the bucket's first module. So half the
    sync (the reduce-scatter) hides behind the last backward, half (the gather) behind the first forward
    (``overlap.grad_sync_exposed`` with ``gather_ahead``), and the last bucket's reduce-scatter and the first one's
    gather run beside nothing (``step_sync_exposed``). Counted on gloo: tests/test_zero1_sync.py. On the first
    pipeline rank that tail is the input embedding's: its gradient completes last and it is read first, a span of
    its own (vocab x hidden, 1 GB in bf16 for Llama 3 8B), priced as ``step_sync_exposed``'s ``edge``; the output
    layer's sync runs beside the blocks' (``end_sync_bytes``)."""
    if runtime != "torch" or impl == "meta":
        return False
    return plan_dp_mode(s, dtype) == "zero1" and not syncs_after_backward(runtime, s, dtype, impl)


def exposed_sync(cm, s) -> bool:
    """``syncs_after_backward`` of a ``CostModel``'s runtime, dtype and FSDP for strategy ``s``."""
    return syncs_after_backward(cm.ctx.runtime, s, cm.dtype, cm.ctx.fsdp_impl)


def broadcasts_after_step(runtime: str, s, dtype: str, impl: str) -> bool:
    """Whether autopar's program sends every rank's updated parameters to the others after the optimizer
    step, with nothing beside it: fp32 ZeRO-1 on plain parameters without a pipeline is DDP + torch's
    ``ZeroRedundancyOptimizer`` (``techniques.dp_program.dp_mode`` "ddp"; ``codegen.runtime.make_optimizer``),
    whose ``step`` ends in ``_sync_params``: each rank broadcasts the parameters it updated and waits on all of
    them (torch 2.13 ``distributed/optim/zero_redundancy_optimizer.py``, ``_broadcast_params_from_rank``).
    DDP's all-reduce runs bucket by bucket in the last micro-batch's backward (``overlap.grad_sync_exposed``);
    the broadcasts, an all-gather's bytes, are exposed."""
    if runtime != "torch" or impl == "meta" or s.zero_stage != 1:
        return False
    return plan_dp_mode(s, dtype) == "ddp"


def step_broadcast_s(cm, s, size: float) -> float:
    """Seconds of ``broadcasts_after_step``'s parameter broadcast of ``size`` bytes (as one all-gather over
    dp*cp), 0 where the program runs none."""
    n = s.dp * s.cp
    if n <= 1 or size <= 0 or not broadcasts_after_step(cm.ctx.runtime, s, cm.dtype, cm.ctx.fsdp_impl):
        return 0.0
    return cm.dp_collective("all_gather", size, n, s.tp)


def step_sync_exposed(cm, s, sync, dense: float, expert: float, bwd_s: float, fwd_s: float,
                      edge: float = 0.0) -> float:
    """Exposed seconds per step of a rank's data-parallel traffic below FSDP (``CostModel.dp_time``;
    ``partition.RankPricer.dp_time`` with its memo): ``sync(bytes, n, stride)`` prices one gradient sync
    (``CostModel.grad_sync_time``) of the rank's ``dense`` (over dp*cp) and ``expert`` (over edp) gradient
    bytes; ``bwd_s`` / ``fwd_s``: one micro-batch's backward / forward it may hide behind (0: nothing hides).
    Whole under ``syncs_after_backward``; else what outlasts the last backward (``overlap.grad_sync_exposed``;
    and the next forward where the gather runs beside it: Megatron-Core's ``--overlap-param-gather``,
    ``gathers_next_forward``) and the last bucket's sync, plus ``ZeroRedundancyOptimizer``'s broadcast
    (``step_broadcast_s``). ``edge``: the bytes of the rank's last ZeRO-1 span (``end_sync_bytes``: the input
    embedding, or a pipeline's tied copy on the last stage), exposed (``gathers_next_forward``: ``max(one bucket,
    edge)``)."""
    n = s.dp * s.cp
    t = sync(dense, n, s.tp) + sync(expert, s.edp, s.ep * s.etp)
    if t <= 0 or exposed_sync(cm, s):
        return t
    zero1 = gathers_next_forward(cm.ctx.runtime, s, cm.dtype, cm.ctx.fsdp_impl)
    last_bucket = sync(max(min(last_bucket_bytes(s, cm.dtype), dense), edge if zero1 else 0.0), n, s.tp)
    ahead = overlap.gathers_ahead(cm.ctx.runtime, s.zero_stage) or zero1
    return overlap.grad_sync_exposed(t, bwd_s, fwd_s, ahead) + last_bucket + step_broadcast_s(cm, s, dense + expert)


def rank_sync_bytes(cm, s, r, costs, gbytes: int) -> tuple[float, float, float]:
    """``(dense, expert, edge)`` gradient bytes of rank ``r`` (a ``RankReport``: its blocks ``r.layers``; the input
    embedding and the output layer on the ranks ``pipeline.end_ranks`` names) that ``step_sync_exposed`` prices for
    strategy ``s``: its blocks' plus ``end_sync_bytes``' (``costs``: ``CostModel.layer_costs``). Read by
    ``CostModel.dp_time`` and ``dp_comm_total``."""
    dense = sum(costs[i].params_dense for i in r.layers) * gbytes
    expert = sum(costs[i].params_expert for i in r.layers) * gbytes
    first, last = end_ranks(s.pp, s.vpp, s.schedule)
    ends, edge = end_sync_bytes(cm, s, costs["embedding"] if r.rank == first else None,
                                costs["output"] if r.rank == last else None, gbytes)
    return dense + ends, expert, edge


def end_sync_bytes(cm, s, embedding, output, gbytes: int) -> tuple[float, float]:
    """``(with_blocks, edge)``: gradient bytes of a rank's input ``embedding`` and ``output`` layer (their
    ``LayerCost``s where the rank holds them, else None) synced by autopar's ZeRO-1 program (``runtime_zero1``: one
    bucket over every parameter of the part; ``cm``: the ``CostModel``, ``s``: the strategy), 0 for other programs and
    runtimes (DDP and FSDP2 ``replicate`` sync the ends too: not priced).

    - overlapped (``gathers_next_forward``): the output layer's (final norm, untied head) with the blocks' - the
      first spans (``zero1_ends``), reduced and gathered beside them. ``edge``: the last spans', the embedding's or
      a tied copy's, reduced after the last backward and gathered first (ahead of the first block's gather on the
      same stream): ``step_sync_exposed`` prices it exposed.
    - after the backward (``syncs_after_backward``): all of them with the blocks, whole."""
    if not (cm.ctx.runtime == "torch" and cm.ctx.fsdp_impl != "meta" and plan_dp_mode(s, cm.dtype) == "zero1"):
        return 0.0, 0.0
    ends = zero1_ends(cm, s, embedding is not None, output is not None)
    emb = embedding.params_dense * gbytes if ends.table_last else 0.0
    out = output.params_dense * gbytes if output else 0.0
    tied = tied_copy_params(cm.output, s.pp, s.tp) * gbytes if ends.tied_last else 0.0
    if exposed_sync(cm, s):
        return emb + out + tied, 0.0
    return out, max(emb, tied)


class Zero1Ends(NamedTuple):
    """Which vocab tables of a rank sit at the ends of autopar's ZeRO-1 dense bucket (``runtime_zero1.Bucket``:
    spans in reverse parameter order, ``zero1_ends``)."""

    head_first: bool   # an untied output head: its gradient completes first in the backward, the first span
    table_last: bool   # the input embedding (or a tied table): first in ``model.parameters()``, the last span
    tied_last: bool    # a pipeline's tied copy on the last stage: a late span (``runtime_parallel._apply_zero1``)


def zero1_ends(cm, s, embedding: bool, output: bool) -> Zero1Ends:
    """The one rule of ZeRO-1's end order for a rank of strategy ``s`` holding the input ``embedding`` and / or the
    ``output`` layer (``cm``: the ``CostModel``): the first span reduced (and the last gathered) is an untied head's;
    the last reduced (and the first gathered) the embedding's and a tied copy's, reduced after ``sync_grads`` summed
    it over the stage pair. Read by ``end_sync_bytes`` (their sync time) and ``runtime_memory.zero1_bucket_bytes``
    (their flat copies)."""
    head = output and cm.output is not None
    return Zero1Ends(head_first=head and cm.output.params_vocab > 0,
                     table_last=embedding and cm.embedding is not None,
                     tied_last=head and tied_copy_params(cm.output, s.pp, s.tp) > 0)


def last_bucket_bytes(s, dtype: str) -> int:
    """Bytes of the gradient bucket a rank of strategy ``s`` syncs last, beside nothing, below FSDP: ZeRO-1's span
    (``ZERO1_BUCKET_BYTES``, ``codegen.runtime_zero1``) where the program runs ``zero1``, else DDP's bucket."""
    return ZERO1_BUCKET_BYTES if plan_dp_mode(s, dtype) == "zero1" else DDP_BUCKET_BYTES


def deferred(cm, s) -> bool:
    """``syncs_once_per_step`` of a ``CostModel``'s runtime for strategy ``s``."""
    return syncs_once_per_step(cm.ctx.runtime, s.pp, s.schedule)


def unit_syncs_per_step(cm, s) -> int:
    """How many times per step each FSDP unit's traffic runs for a ``CostModel``'s runtime and
    strategy ``s``: once under ``syncs_once_per_step``, else once per micro-batch."""
    return 1 if deferred(cm, s) else s.num_micro_batches


def regathers(cm, s) -> bool:
    """Whether each unit's parameters are all-gathered again in the backward: ZeRO-3 resharded after
    forward, except in a stage that syncs once per step (``syncs_once_per_step``: torchtitan's
    pipeline keeps them gathered to the stage's last backward)."""
    return s.zero_stage >= 3 and not deferred(cm, s)


def reduce_bytes(runtime: str, grad_bytes: int, impl: str = "fsdp2") -> int:
    """Bytes per gradient element of FSDP's reduce-scatter. torchtitan reduces in fp32
    (``training.mixed_precision_reduce = "float32"``, its ``MixedPrecisionPolicy(reduce_dtype=...)``), and so
    does llm-foundry's FSDP1 under Composer's ``mixed_precision: DEFAULT`` (``impl`` ``fsdp1_fp32_params``:
    mosaicml 0.17 ``mosaic_fsdp_utils.get_mixed_precision`` sets ``reduce_dtype=torch.float32``;
    ``benchmarks/published_foundry_rows.py``); autopar's programs in the gradient dtype
    (``codegen.runtime_parallel.mp_policy``: bf16)."""
    fp32 = runtime == "torchtitan" or impl == "fsdp1_fp32_params"
    return 4 if fp32 and grad_bytes < 4 else grad_bytes
