"""``CostModel``: step time and per-GPU memory of one strategy, stage by stage.

Per step (one optimizer update of ``global_batch`` sequences):

1. each layer is priced per micro-batch on its pipeline rank (``layer_cost``);
2. ranks' forward/backward totals go through the pipeline schedule (``pipeline``),
   which adds the bubble and the exposed point-to-point time;
3. data-parallel gradient reduction follows: overlapped with the last micro-batch's
   backward except the last bucket (PyTorch DDP / Megatron bucketing); ZeRO-1/2 swap
   the all-reduce for a reduce-scatter plus a parameter all-gather of the same volume
   (ZeRO paper Sec. 7); ZeRO-3 gathers parameters in every micro-batch's forward and
   backward and reduce-scatters gradients, prefetched one layer ahead, so only the
   excess over each layer's compute is exposed;
4. the optimizer step is memory bound over the rank's optimizer states.

Memory per pipeline rank: ``stage_memory.RankMemoryTerms`` (``rank_memory``, a part of ``CostModel``).
"""

from __future__ import annotations

import copy
import math
from dataclasses import replace
from functools import partial

from autopar import techniques
from autopar.core.cluster import ClusterSpec
from autopar.core.gpu import GpuProfile
from autopar.core.model_spec import ModelSpec
from autopar.core.strategy import Strategy
from autopar.cost_models import fp8_cost, fsdp, fsdp_copy, overlap
from autopar.cost_models.attention_rate import window_blocks
from autopar.cost_models.comm import CommFit, collective_time
from autopar.cost_models.compute import OpTimer, mfu_peak
from autopar.cost_models.estimate_types import Estimate, RankMemory, RankReport, time_breakdown  # noqa: F401
from autopar.cost_models.fsdp_copy import offload_copies, offload_step_time  # noqa: F401 (planner, tests)
from autopar.cost_models.layer_cost import LayerCost, PricingContext, price_layer, shared_core_sync
from autopar.cost_models.layer_model import LayerTemplate
from autopar.cost_models.memory import bytes_per_param, expert_shard_group, kv_bytes_per_token, sdpa_kv_bytes_per_token
from autopar.cost_models.moe_load import LoadFn
from autopar.cost_models.overlap import contention_time, exposed_behind, inter_node_factor, rate_capped, zero3_edges
from autopar.cost_models.pipeline import (
    end_ranks,
    in_flight_microbatches,
    shared_makespan,
    step_time,
    weight_grad_fraction,
)
from autopar.cost_models.runtime_memory import fused_saved, torchtitan_stages
from autopar.cost_models.stage_memory import RankMemoryTerms
from autopar.errors import InputError
from autopar.memo import MISS, IdentityMemo
from autopar.techniques import offload
from autopar.techniques.pipeline import ZERO_BUBBLE, rank_stages

DDP_BUCKET_BYTES = fsdp.DDP_BUCKET_BYTES   # planner.partition, planner.bounds, tests read it here
OPTIMIZER_BYTES_PER_PARAM = 36  # Adam step traffic: read fp32 p, m, v (12) + 16-bit grad (2), its fp32 upcast
#                                written and read back (8), write fp32 p, m, v (12) + the 16-bit copy (2)


class CostModel(RankMemoryTerms):
    """Prices strategies for one (model, cluster, sequence length, dtype)."""

    def __init__(self, spec: ModelSpec, cluster: ClusterSpec, seq_len: int, templates: list[LayerTemplate],
                 gpu: GpuProfile, dtype: str = "bf16", timer: OpTimer | None = None,
                 comm_fits: list[CommFit] | None = None, moe_load: LoadFn | None = None,
                 runtime: str = "torch", fsdp_impl: fsdp.FsdpImpl = "fsdp2"):
        self.spec, self.cluster, self.seq_len, self.dtype, self.gpu = spec, cluster, seq_len, dtype, gpu
        self.templates, self.blocks, sliding = window_blocks(templates, spec.is_sliding_layer)  # window / full apart
        self.embedding = next((t for t in templates if t.kind == "embedding"), None)
        self.output = next((t for t in templates if t.kind == "output"), None)
        self.timer = timer or OpTimer(gpu, dtype)
        # ``runtime``: the software stack (core.gpu.Runtime, what the Plan records); its fitted constants
        # (cost_models/overlap.py) are its own, its program rules its family's (ctx.runtime, core.gpu.STACK_PROGRAM)
        self.stack = gpu.stack(runtime)
        self.timer.stack = self.stack
        dbytes = 4 if dtype == "fp32" else 2
        self.ctx = PricingContext(
            cluster=cluster, timer=self.timer, dtype_bytes=dbytes, hidden=spec.hidden or 1, seq_len=seq_len,
            topk=spec.topk, num_experts=spec.num_experts, kv_bytes_per_token=kv_bytes_per_token(spec, dbytes),
            sdpa_kv_bytes_per_token=sdpa_kv_bytes_per_token(spec, dbytes),
            fits=comm_fits, stack_name=runtime, sliding_window=spec.sliding_window,
            sliding_layers=sliding,
            attn_head_dim=spec.attention_head_dim, expert_bias=bool(spec.num_experts and spec.mlp_bias),
            fsdp_impl=fsdp_impl, rope_attention_factor=spec.rope_attention_factor, glu_clamp=spec.glu_clamp)
        self.moe_load = moe_load
        self._cache: dict[tuple, dict] = {}
        self._z3 = IdentityMemo(4096)   # _zero3_layer by what it reads (most layers share one price)

    def __setstate__(self, state: dict) -> None:
        """Row caches pickled before ``ctx.attn_head_dim`` / ``ctx.fsdp_impl`` / ``stack_name`` get the head dim, keep
        their FSDP and name the stack their program's (a stack was its program then)."""
        self.__dict__.update(state)
        self.templates, self.blocks, _ = window_blocks(self.templates, self.ctx.sliding_layers.__contains__)
        if "stack_name" not in self.ctx.__dict__:   # ctx.runtime is stack_name's program now: read the pickled one
            self.ctx.stack_name = self.ctx.__dict__["runtime"]
        if "fsdp_impl" in self.__dict__:
            self.ctx.fsdp_impl = self.__dict__.pop("fsdp_impl")
        if "attn_head_dim" not in self.ctx.__dict__:
            self.ctx.attn_head_dim = self.spec.attention_head_dim

    @property
    def stack_name(self) -> str:
        """The software stack priced (``--runtime`` as given, what the Plan records; ``ctx.runtime`` its program)."""
        return self.ctx.stack_name

    @property
    def usable_mem_bytes(self) -> int:
        """Bytes live tensors may use on one GPU under this stack's allocator reserve (``GpuProfile.usable_bytes``):
        what ``Estimate.feasible``, the partition's budgets and the search's memory floor check."""
        return self.gpu.usable_bytes(self.stack)

    @property
    def num_layers(self) -> int:
        return len(self.blocks)

    # ----- rules that need the model ---------------------------------------------------
    def check(self, s: Strategy) -> None:
        """Raise a one-line InputError naming the rule a resolved strategy breaks, or what the stack does not run."""
        for msg in strategy_violations(self.spec.model_copy(update={"layers": self.spec.layers or self.num_layers}),
                                       self.seq_len, s, self.stack_name):  # custom specs: layers=0, count blocks
            raise InputError(f"strategy: {msg}")
        for msg in offload.gpu_violations(s, self.gpu):
            raise InputError(f"strategy: {msg}")

    # ----- per-layer prices (cached per sharding) ----------------------------------
    def layer_costs(self, s: Strategy) -> dict:
        """{"embedding": LayerCost, "output": LayerCost, i: LayerCost} for the strategy's
        intra-stage sharding; identical layers are priced once."""
        key = (s.tp, s.cp, s.ep, s.etp, s.dp, s.micro_batch, s.sequence_parallel)
        if key not in self._cache:
            cm = self.routed(s)
            by_template = {id(t): fused_saved(price_layer(t, s, cm.ctx), t, s, cm) for t in self.templates}
            costs = {i: by_template[id(t)] for i, t in self.blocks.items()}
            costs["embedding"] = by_template[id(self.embedding)] if self.embedding else None
            costs["output"] = by_template[id(self.output)] if self.output else None
            self._cache[key] = costs
        return self._cache[key]

    def routed(self, s: Strategy) -> CostModel:
        """This model as it prices ``s``: under a routing trace or placement (``moe_load``) a view of it whose
        pricing context is a copy carrying the busiest expert rank's load and the measured share of routed tokens
        leaving the rank at ``s.ep``; else itself. Pricing leaves the shared ``self.ctx`` as built (set there, the
        last strategy's load would reach every later reader). ``copy.copy``, not ``dataclasses.replace``:
        ``PricingContext.__post_init__`` would adjust the already adjusted collective fits again."""
        if self.moe_load is None or not self.spec.is_moe:
            return self
        ratio, cross = self.moe_load(s.ep)
        ctx = copy.copy(self.ctx)
        ctx.expert_load_ratio, ctx.ep_cross_fraction = ratio, (cross if s.ep > 1 else None)
        view = object.__new__(CostModel)   # not copy.copy(self): that runs __setstate__ (a pickle's upgrade)
        view.__dict__.update(self.__dict__, ctx=ctx)
        return view

    # ----- one full estimate ----------------------------------------------------------
    def estimate(self, s: Strategy, stages: list[tuple[int, int]] | None = None,
                 layer_recompute: list[str] | None = None) -> Estimate:
        costs = self.layer_costs(s)
        stages = stages or default_stages(self.ctx.runtime, self.num_layers, s.pp, s.vpp)
        recompute = layer_recompute or [s.recompute] * self.num_layers
        m = s.num_micro_batches
        ranks = [self._rank(r, s, stages, recompute, costs, m) for r in range(s.pp)]
        p2p = self.p2p_time(s)
        w = [self.weight_grad_time(s, r) for r in ranks] if s.schedule in ZERO_BUBBLE else None
        pipe = step_time([r.fwd_s for r in ranks], [r.bwd_s for r in ranks], m, s.schedule, s.vpp, p2p, w)
        pipe = self._shared_cores(pipe, ranks, m)
        dp = [self.dp_time(s, r, costs, m) for r in ranks]
        dp_exposed = max(dp)
        worst = max(ranks, key=lambda r: self.optimizer_time(s, r, costs))
        opt = self.optimizer_time(s, worst, costs)  # with FSDP2's copies
        copies = fsdp_copy.copy_time(self, s, worst, costs)
        slowed = max(self.overlap_contention(s, r, costs, m, e) for r, e in zip(ranks, dp))
        total = pipe.step_time_s + dp_exposed + opt + slowed + self.stack.step_overhead_s
        time = time_breakdown(ranks, pipe, dp_exposed, opt - copies, m)
        time.update({"comm_contention": slowed, "fsdp_copy": copies, "step_overhead": self.stack.step_overhead_s})
        return self._report(s, total, time, ranks, recompute)

    def _shared_cores(self, pipe, ranks: list[RankReport], m: int):
        """Ranks sharing CPU cores (contention k > 1, every op priced k x slower): the scheduler
        shares the cores fairly among the ranks that have work, so a light pipeline stage that
        waits gives its share to the heavy ones. Per micro-batch the stages' work is done in the
        processor-sharing makespan of the node's ranks (``shared_makespan``), at most the
        contended time of the slowest stage; the schedule (bubble included) shrinks by that ratio."""
        k, cores = self.timer.contention, self.gpu.cores
        if k <= 1 or len(ranks) == 1 or not cores:
            return pipe
        per_stage = [(r.fwd_s + r.bwd_s) / k for r in ranks]            # alone on a core
        copies = max(1, self.cluster.gpus_per_node // len(ranks))       # dp*tp*cp ranks per stage
        span = shared_makespan(per_stage * copies, cores, self.gpu.threads_per_rank)
        ratio = span / max(r.fwd_s + r.bwd_s for r in ranks)
        if ratio >= 1:
            return pipe
        return replace(pipe, step_time_s=pipe.step_time_s * ratio, busy_s=pipe.busy_s * ratio,
                       bubble_s=pipe.bubble_s * ratio, p2p_s=pipe.p2p_s * ratio)

    def _rank(self, rank: int, s: Strategy, stages, recompute, costs, m) -> RankReport:
        mine = rank_stages(rank, s.pp, len(stages) // s.pp, s.schedule)   # techniques/pipeline.py placement
        layers = [i for j in mine for i in range(*stages[j])]
        parts = [costs[i] for i in layers]
        modes = [recompute[i] for i in layers]
        embedding, head = end_ranks(s.pp, len(stages) // s.pp, s.schedule)   # V-shaped: both on rank 0
        first, last = rank == embedding, rank == head
        extra = ([costs["embedding"]] if first and costs["embedding"] else []) + \
                ([costs["output"]] if last and costs["output"] else [])
        fwd = sum(c.fwd_s for c in parts + extra)
        rc = sum(c.recompute_s[mo] + c.recompute_comm(mo) for c, mo in zip(parts, modes))
        comm: dict[str, float] = {}
        for c in parts + extra:
            for k, v in c.comm_s.items():
                comm[k] = comm.get(k, 0.0) + v
        bwd = sum(c.bwd_s for c in parts + extra) + rc + sum(comm.values())
        in_flight = in_flight_microbatches(rank, s.pp, m, s.schedule, s.vpp)
        memory, host, pooled = self.rank_memory(s, parts, modes, extra, in_flight, first, last)
        floor = sum(c.host_floor_s.get(mo, 0.0) for c, mo in zip(parts + extra, modes + ["none"] * len(extra)))
        return RankReport(rank, layers, fwd, bwd, rc, comm, memory, in_flight, host, pooled, floor)

    # ----- per-step terms ------------------------------------------------------------
    def weight_grad_time(self, s: Strategy, r: RankReport) -> float:
        """Weight-gradient (W) part of one rank's backward per micro-batch: each block's backward
        times its template's ``pipeline.weight_grad_fraction`` (zero-bubble schedules defer it)."""
        costs = self.layer_costs(s)
        return sum(costs[i].bwd_s * weight_grad_fraction(self.blocks[i].ops) for i in r.layers)

    def p2p_time(self, s: Strategy) -> float:
        """Seconds of one stage-to-stage activation send (per micro-batch and direction)."""
        if s.pp == 1:
            return 0.0
        act = s.micro_batch * self.seq_len / s.cp * self.spec.hidden * self.ctx.dtype_bytes
        if s.sequence_parallel:
            act /= s.tp  # Megatron's scatter/gather optimisation sends 1/t of the activation
        stride = s.world // s.pp
        sync = shared_core_sync(self.ctx)
        return collective_time("p2p", act, s.pp, stride, self.cluster, fits=self.ctx.fits).time_s + sync

    def dp_time(self, s: Strategy, r: RankReport, costs, m: int) -> float:
        """Exposed data-parallel gradient/parameter traffic of one rank per step (seconds)."""
        if fsdp.per_unit(self, s):  # FSDP: ZeRO-3, and ZeRO-2 under the FSDP runtimes
            return self._zero3_exposed(s, r, costs, m)
        dense, expert, edge = fsdp.rank_sync_bytes(self, s, r, costs, bytes_per_param(self.dtype)[1])
        hide = bool(m) and not self._cores_saturated  # r.bwd_s / r.fwd_s: one micro-batch's backward / forward
        sync = partial(self.grad_sync_time, s=s)
        return fsdp.step_sync_exposed(self, s, sync, dense, expert, r.bwd_s * hide, r.fwd_s * hide, edge)

    def grad_sync_time(self, size: float, n: int, stride: int, s: Strategy) -> float:
        """One gradient synchronisation of ``size`` bytes over ``n`` ranks (all-reduce, or
        reduce-scatter + all-gather under ZeRO-1/2), in seconds."""
        if n <= 1 or size <= 0:
            return 0.0
        kinds = ("reduce_scatter", "all_gather") if s.zero_stage in (1, 2) else ("all_reduce",)
        return sum(self.dp_collective(k, size, n, stride) for k in kinds)

    def dp_collective(self, kind: str, size: float, n: int, stride: int) -> float:
        """Seconds of one data-parallel collective ``kind`` of ``size`` bytes over ``n`` ranks ``stride`` apart, at
        the bus bandwidth the group keeps across nodes (``_dp_scale``)."""
        t = collective_time(kind, size, n, stride, self.cluster, fits=self.ctx.fits).time_s
        return t * self._dp_scale(n, stride)

    def _dp_scale(self, n: int, stride: int) -> float:
        """Bus bandwidth lost as the data-parallel group spans more nodes (``overlap.inter_node_factor``)."""
        nodes = math.ceil(n * stride / self.cluster.gpus_per_node) if n * stride > self.cluster.gpus_per_node else 1
        return inter_node_factor(min(nodes, self.cluster.nodes), self.stack.inter_node_decay)

    def overlap_contention(self, s: Strategy, r: RankReport, costs, m: int, exposed: float) -> float:
        """Compute slowed by the data-parallel collectives it hid (``overlap.contention_time``)."""
        if not self.stack.overlap_slowdown or self._cores_saturated:
            return 0.0
        return contention_time(self.dp_comm_total(s, r, costs, m) - exposed, self.stack.overlap_slowdown)

    def dp_comm_total(self, s: Strategy, r: RankReport, costs, m: int) -> float:
        """All data-parallel collective seconds of one rank per step, hidden or not."""
        gb = bytes_per_param(self.dtype)[1]
        if fsdp.per_unit(self, s):
            return sum(sum(self._zero3_layer(s, costs[i], gb)) for i in r.layers) * fsdp.unit_syncs_per_step(self, s)
        dense, expert, edge = fsdp.rank_sync_bytes(self, s, r, costs, gb)   # the edge's sync is one of them
        return (self.grad_sync_time(dense + edge, s.dp * s.cp, s.tp, s)
                + self.grad_sync_time(expert, s.edp, s.ep * s.etp, s) + fsdp.step_broadcast_s(self, s, dense + expert))

    def _zero3_layer(self, s: Strategy, c: LayerCost, grad_bytes: int) -> tuple[float, float, float]:
        """(forward all-gather, backward all-gather (``fsdp.regathers``), reduce-scatter) seconds of one layer."""
        objs, size = (self.cluster, self.ctx.fits, self.stack), c.params_dense + c.params_expert
        key, hit = self._z3.lookup((s.dp * s.cp, s.tp, fsdp.regathers(self, s), size, grad_bytes, self.dtype,
                                    self.ctx.fsdp_impl), objs)
        return hit if hit is not MISS else self._z3.put(key, objs, self._zero3_priced(s, c, grad_bytes))

    def _zero3_priced(self, s: Strategy, c: LayerCost, grad_bytes: int) -> tuple[float, float, float]:
        n, pbytes = s.dp * s.cp, bytes_per_param(self.dtype)[0]
        full = (c.params_dense + c.params_expert) * pbytes
        rbytes = fsdp.reduce_bytes(self.ctx.runtime, grad_bytes, self.ctx.fsdp_impl)
        scale, grads = self._dp_scale(n, s.tp), full / pbytes * rbytes
        ag = collective_time("all_gather", full, n, s.tp, self.cluster, fits=self.ctx.fits).time_s * scale
        rs = collective_time("reduce_scatter", grads, n, s.tp, self.cluster, fits=self.ctx.fits).time_s * scale
        if n * s.tp > self.cluster.gpus_per_node:  # across nodes the stack may not reach the ring's rate
            rate, share = self.stack.zero3_gather_gbps, (n - 1) / n  # each GPU receives / sends (n-1)/n
            ag, rs = rate_capped(ag, full * share, rate), rate_capped(rs, grads * share, rate)
        return ag, ag if fsdp.regathers(self, s) else 0.0, rs

    def _zero3_exposed(self, s: Strategy, r: RankReport, costs, m: int) -> float:
        """FSDP: per layer and micro-batch, all-gather (fwd), all-gather + reduce-scatter (bwd),
        prefetched beside that layer's compute (``zero3_layer_exposed``); the first gather and the last
        reduce-scatter of the step stay exposed once per rank (``zero3_edge_time``)."""
        if s.dp * s.cp <= 1 or not r.layers:
            return 0.0
        exposed = sum(self.zero3_layer_exposed(s, costs[i]) for i in r.layers) * fsdp.unit_syncs_per_step(self, s)
        return exposed + self.zero3_edge_time(s, costs[r.layers[0]], costs[r.layers[-1]])

    def zero3_layer_exposed(self, s: Strategy, c: LayerCost) -> float:
        """One layer's exposed FSDP seconds per micro-batch (per step: ``fsdp.syncs_once_per_step``): the stack's
        ``zero3_overlap`` share hides where the compute is longer. Saturated CPU cores hide nothing."""
        ag, ag_b, rs = self._zero3_layer(s, c, bytes_per_param(self.dtype)[1])
        once, ov = fsdp.deferred(self, s), self.stack.zero3_overlap
        if self._cores_saturated:
            return ag + ag_b + rs + (3 if fsdp.regathers(self, s) else 2) * shared_core_sync(self.ctx)
        if once:
            return overlap.once_per_step_exposed(ag, rs, c.fwd_s, ov)
        return exposed_behind(ag, c.fwd_s, ov) + exposed_behind(ag_b + rs, c.bwd_s, ov)

    def zero3_edge_time(self, s: Strategy, first: LayerCost, last: LayerCost) -> float:
        """The step's first all-gather and last reduce-scatter, exposed (``overlap.zero3_edges``; a stage syncing
        once per step has all its reduce-scatters in ``zero3_layer_exposed``); unfitted profile, saturated cores: 0."""
        if self._cores_saturated or not self.gpu.fitted:
            return 0.0
        g, once = bytes_per_param(self.dtype)[1], fsdp.deferred(self, s)
        return zero3_edges(self._zero3_layer(s, first, g)[0], 0.0 if once else self._zero3_layer(s, last, g)[2])

    @property
    def _cores_saturated(self) -> bool:
        """Ranks sharing CPU cores keep every core busy with compute, so data-parallel collectives
        (their copies, reductions and socket work need a core too) do not overlap with it."""
        return self.timer.contention > 1

    def optimizer_time(self, s: Strategy, r: RankReport, costs) -> float:
        """A rank's per-step work outside the schedule (read by the planner too): its optimizer step and
        FSDP2's casts and copies of its units (``fsdp_copy.copy_time``)."""
        return self.optimizer_step_time(s, r, costs) + fsdp_copy.copy_time(self, s, r, costs)

    def optimizer_step_time(self, s: Strategy, r: RankReport, costs) -> float:
        """Optimizer step of one rank's local parameters (GPU or ZeRO-Offload's host step) + fp8 weight casts."""
        dense = sum(costs[i].params_dense for i in r.layers)
        expert = sum(costs[i].params_expert for i in r.layers)
        edp = expert_shard_group(s, self.ctx.runtime)  # the group the memory prices the expert shards over
        local = dense / (s.dp * s.cp if s.zero_stage >= 1 else 1) + expert / (edp if s.zero_stage >= 1 else 1)
        if s.offload_optimizer:  # CPUOffloadPolicy shards at any zero stage; ZeRO-3 gathers twice per micro-batch
            return offload_step_time(dense / (s.dp * s.cp) + expert / edp, self.dtype, self.gpu,
                                     *offload_copies(s.zero_stage, fsdp.unit_syncs_per_step(self, s)))
        return self.timer.membound(local * OPTIMIZER_BYTES_PER_PARAM + fp8_cost.step_cast_bytes(self, r.layers, costs))

    def _report(self, s: Strategy, total: float, time: dict, ranks: list[RankReport], recompute) -> Estimate:
        fwd = sum(f for t in self.templates for f in [sum(o.fwd_flops for o in t.ops) * len(t.indices or [0])])
        bwd = sum(b for t in self.templates for b in [sum(o.bwd_flops for o in t.ops) * len(t.indices or [0])])
        full_rc = sum(sum(o.fwd_flops for o in self.blocks[i].ops) for i in self.blocks if recompute[i] == "full")
        model = (fwd + bwd) * s.global_batch
        worst = max(ranks, key=lambda r: r.mem_bytes)
        return Estimate(
            strategy=s, step_time_s=total, time=time, ranks=ranks, peak_bytes=worst.mem_bytes,
            capacity_bytes=float(self.gpu.mem_capacity_bytes), usable_bytes=float(self.usable_mem_bytes),
            model_flops=model, hardware_flops=model + full_rc * s.global_batch, world=s.world,
            peak_flops=mfu_peak(self.gpu, self.timer), tokens=s.global_batch * self.seq_len,
            sources={"compute": self.timer.source,
                     "communication": "measurement" if self.ctx.fits else "datasheet"},
            allocator_reserve_fraction=self.gpu.reserve_fraction(self.stack),
            host_usable_bytes=self.gpu.host_mem_bytes * self.gpu.host_usable_fraction if self.gpu.host_mem_bytes
            else None)


def strategy_violations(spec: ModelSpec, seq_len: int, s: Strategy, stack: str | None = None) -> list[str]:
    """Every technique rule the strategy breaks and what ``stack`` does not run, as fix-naming messages."""
    return techniques.violations(s, spec, s.world, seq_len, stack=stack)


def even_stages(layers: int, n: int) -> list[tuple[int, int]]:
    """Split ``layers`` into ``n`` consecutive ranges, the first ones one layer longer."""
    base, rest = divmod(layers, n)
    out, start = [], 0
    for j in range(n):
        end = start + base + (1 if j < rest else 0)
        out.append((start, end))
        start = end
    return out


def default_stages(runtime: str, layers: int, pp: int, vpp: int) -> list[tuple[int, int]]:
    """The stages ``estimate`` prices for a strategy without a split: torchtitan its own
    (``runtime_memory.torchtitan_stages``), Megatron one its layer flags run (``megatron_stages``), the others
    ``even_stages`` (DeepSpeed: equal stages only, ``planner.stack_split.no_split`` refuses the rest)."""
    if runtime == "torchtitan":
        return torchtitan_stages(layers, pp * vpp)
    if runtime == "megatron" and vpp == 1:
        return megatron_stages(layers, pp)
    if runtime == "megatron" and layers % (pp * vpp):
        return megatron_accounted_stages(layers, pp * vpp) or even_stages(layers, pp * vpp)
    return even_stages(layers, pp * vpp)


# Megatron-Core's ``--account-for-embedding-in-pipeline-split`` / ``--account-for-loss-in-pipeline-split``
# (TransformerConfig fields since megatron-core 0.11: transformer_block.get_num_layers_to_build counts the
# embedding / the loss as one layer each, then divides evenly over pp and each rank's vpp chunks).
MEGATRON_ACCOUNT = {(1, 1): "--account-for-embedding-in-pipeline-split --account-for-loss-in-pipeline-split",
                    (1, 0): "--account-for-embedding-in-pipeline-split",
                    (0, 1): "--account-for-loss-in-pipeline-split"}


def megatron_accounted_stages(layers: int, n: int) -> list[tuple[int, int]] | None:
    """The ``n`` virtual stages Megatron-Core builds with the account-for flags (``MEGATRON_ACCOUNT``): every
    chunk ``(layers + e + l) / n`` layers, the first one ``e`` less (the embedding), the last one ``l`` less (the
    loss); None where no flag pair divides (Megatron-Core asserts it does)."""
    for e, l in MEGATRON_ACCOUNT:
        sizes = megatron_accounted_sizes(layers, n, e, l)
        if sizes:
            bounds = [sum(sizes[:j]) for j in range(n + 1)]
            return list(zip(bounds, bounds[1:]))
    return None


def megatron_accounted_sizes(layers: int, n: int, e: int, l: int) -> list[int] | None:
    """Layers per chunk Megatron-Core builds with the embedding (``e``) and the loss (``l``) counted as a layer
    (``MEGATRON_ACCOUNT``); None where ``layers + e + l`` does not divide into ``n`` chunks of at least two."""
    c, rest = divmod(layers + e + l, n)
    if rest or c <= max(e, l) or n < 2:
        return None
    return [c - e] + [c] * (n - 2) + [c - l]


def megatron_stages(layers: int, pp: int) -> list[tuple[int, int]]:
    """A split Megatron-Core runs (``--decoder-first/last-pipeline-num-layers``: the first and the last stage any
    count, the others ``layers`` less those, evenly; ``techniques.pipeline.SPLITS``): ``even_stages`` where its
    middle stages are one count, else the middle ones ``ceil(layers / pp)`` each and the first and the last stage
    the rest, the last (it holds the output layer) the smaller half; the middle ones ``layers // pp`` where that
    leaves the last none. Without the flags Megatron-Core asserts pp divides the layers."""
    even = even_stages(layers, pp)
    if len({b - a for a, b in even[1:-1]}) <= 1:
        return even
    middle = -(-layers // pp)
    if layers - middle * (pp - 2) < 2:
        middle = layers // pp
    rest = layers - middle * (pp - 2)
    sizes = [rest - rest // 2] + [middle] * (pp - 2) + [rest // 2]
    bounds = [sum(sizes[:j]) for j in range(pp + 1)]
    return list(zip(bounds, bounds[1:]))
