"""Price one layer of one pipeline rank for one strategy (per micro-batch).

Communication per technique and what hides behind compute (stated once, here):

- TP (Megatron-LM, Shoeybi et al. 2019, Sec. 3): per block, one all-reduce of the
  ``b·s·h`` activations after the attention and one after the MLP in forward, and the
  same two in backward (column-parallel input gradients). With sequence parallelism
  each all-reduce becomes an all-gather plus a reduce-scatter of the same total volume
  (Korthikanti et al. 2022, Sec. 4.2.2). Not overlapped (Megatron 2022 semantics).
  Full recompute repeats the forward collectives in backward.
- CP (ring attention, Liu et al. 2023; Megatron-Core CP): ``cp - 1`` ring steps pass the
  local K and V chunk in forward and K, V, dK, dV in backward; each step overlaps with
  one chunk of attention compute, so only the excess is exposed.
- EP (GShard / Megatron-Core MoE): two all-to-alls per MoE layer in forward (dispatch,
  combine) and two in backward, each moving the local routed tokens ``k·b·s·h``; not
  overlapped. Expert tensor parallel ``etp > 1`` adds an all-reduce of the expert
  output over the etp group per direction.
- DP, ZeRO and PP are priced per step in ``estimate``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from autopar.cost_models.comm import CommFit, collective_time
from autopar.cost_models.compute import OpTimer, cpu_contention
from autopar.cost_models.layer_model import LayerTemplate, OpTerm, Shards, saved_bytes, working_bytes
from autopar.cost_models.strategy import Strategy
from autopar.profiles.cluster import ClusterSpec

RECOMPUTE_MODES = ("none", "selective", "full")


@dataclass
class LayerCost:
    """One layer on one rank, per micro-batch (times in s, memory in bytes)."""

    fwd_s: float
    bwd_s: float
    recompute_s: dict[str, float]        # extra backward time per recompute mode
    comm_s: dict[str, float]             # exposed tp/cp/ep time (fwd + bwd), by technique
    recompute_comm_s: float              # forward collectives repeated under full recompute
    act_bytes: dict[str, float]          # saved per micro-batch, per recompute mode
    work_bytes: dict[str, float]         # transient peak while this layer runs backward
    params_dense: float                  # parameters on this rank sharded over dp for ZeRO
    params_expert: float                 # expert parameters on this rank (sharded over edp for ZeRO)
    temp_bytes: float = 0.0
    flops_fwd: float = 0.0               # model FLOPs of this layer on this rank (fwd)
    sources: dict[str, str] = field(default_factory=dict)
    source_counts: dict[str, int] = field(default_factory=dict)  # ops priced per source (measurement/fit/...)

    def time(self, recompute: str) -> float:
        extra = self.recompute_comm_s if recompute == "full" else 0.0
        return self.fwd_s + self.bwd_s + self.recompute_s[recompute] + sum(self.comm_s.values()) + extra


@dataclass
class PricingContext:
    cluster: ClusterSpec
    timer: OpTimer
    dtype_bytes: int
    hidden: int
    seq_len: int
    topk: int = 0
    num_experts: int = 0
    kv_bytes_per_token: float = 0.0      # K+V bytes per token for CP ring exchange
    expert_load_ratio: float = 1.0       # straggler load over mean (routing trace / placement)
    ep_cross_fraction: float | None = None  # measured share of routed tokens leaving the rank
    fits: list[CommFit] | None = None

    def __post_init__(self):
        """A measured hardware profile brings its own collective fits and, for CPU ranks that
        share cores, the contention factor (the timer is the CostModel's: its optimizer step
        slows the same way)."""
        gpu = self.timer.gpu
        if self.fits is None and gpu.comm_fits:
            self.fits = [CommFit.model_validate(f) for f in gpu.comm_fits]
        self.timer.contention = cpu_contention(gpu, self.cluster.gpus_per_node)


def shards_for(s: Strategy) -> Shards:
    return Shards(tokens=s.micro_batch / s.cp, tp=s.tp, sp=s.sequence_parallel, expert_div=s.tp * s.cp)


def price_layer(layer: LayerTemplate, s: Strategy, ctx: PricingContext) -> LayerCost:
    sh = shards_for(s)
    before = dict(ctx.timer.hits)
    fwd = bwd = attn_fwd = 0.0
    flops = 0.0
    for op in layer.ops:
        f, b = _op_time(op, s, sh, ctx)
        load = ctx.expert_load_ratio if op.shard == "expert" else 1.0
        fwd, bwd = fwd + f * load, bwd + b * load
        flops += op.fwd_flops * sh.tokens / sh.of(op.shard)
        if op.attn_core:
            attn_fwd += f
    comm = _layer_comm(layer, s, ctx, attn_fwd)
    return LayerCost(
        fwd_s=fwd, bwd_s=bwd,
        recompute_s={"none": 0.0, "selective": attn_fwd, "full": fwd},
        comm_s=comm,
        recompute_comm_s=comm.get("tp", 0.0) / 2 + comm.get("ep", 0.0) / 2,
        act_bytes={m: saved_bytes(layer, sh, m) for m in RECOMPUTE_MODES},
        work_bytes={m: working_bytes(layer, sh, m) for m in RECOMPUTE_MODES},
        params_dense=(layer.params_tp + layer.params_vocab) / s.tp + layer.params_rep,
        params_expert=layer.params_expert / (s.ep * s.etp),
        temp_bytes=layer.temp_bytes * sh.tokens / (s.tp if layer.kind == "output" else 1),
        flops_fwd=flops,
        sources={"compute": ctx.timer.source},
        source_counts={k: v - before.get(k, 0) for k, v in ctx.timer.hits.items()},
    )


def _op_time(op: OpTerm, s: Strategy, sh: Shards, ctx: PricingContext) -> tuple[float, float]:
    """Forward and backward time of one op on one rank: the measured op when the strategy
    leaves its captured shape unchanged, else the curves."""
    t = ctx.timer
    if op.kind == "gemm" and op.gemm is not None:
        m, n, k = _local_gemm(op, s, sh)
        calls = op.calls / s.ep if op.shard == "expert" else op.calls
        if op.batched:
            calls = calls * s.micro_batch / (sh.of(op.shard) if op.tp_dim == "calls" else 1)
        hit = t.exact(op.sig) if (m, n, k) == op.gemm and calls == op.calls else None
        ratio = op.bwd_flops / op.fwd_flops if op.fwd_flops else 2.0
        return hit or t.gemm_fb(m, n, k, calls, ratio)
    scale = sh.tokens / sh.of(op.shard)
    hit = t.exact(op.sig) if scale == 1 else None
    if hit is not None:
        return hit
    if op.kind == "attention":
        f = t.attention(op.fwd_flops * scale, op.bytes_rw * scale)
        return f, f * (op.bwd_flops / op.fwd_flops if op.fwd_flops else 2.5)
    f = t.membound(op.bytes_rw * scale, op.fwd_flops * scale)
    return f, 2.0 * f  # backward of an elementwise op reads the output grad and the saved input


def _local_gemm(op: OpTerm, s: Strategy, sh: Shards) -> tuple[float, float, float]:
    """(m, n, k) of one GEMM call on one rank."""
    m, n, k = op.gemm
    if op.shard == "expert":
        # tokens per local expert: the stage's dp·mbs sequences, k experts each, over E experts
        # and their edp replicas; the expert width f (n of w1/w3, k of w2) is split by etp.
        m = m * s.micro_batch * s.dp / s.edp
        div = s.etp
    elif op.batched:
        m = m / s.cp  # local queries against all keys (ring attention); batch handled by calls
        div = 1
    else:
        m = m * sh.tokens
        div = sh.of(op.shard) if op.shard != "rep" else 1
        if op.shard == "rep" and s.sequence_parallel:
            m = m / s.tp
    if op.tp_dim == "k":
        return m, n, k / div
    if op.tp_dim == "n":
        return m, n / div, k
    return m, n, k


def _layer_comm(layer: LayerTemplate, s: Strategy, ctx: PricingContext, attn_fwd: float) -> dict[str, float]:
    """Exposed TP / CP / EP time of one layer per micro-batch, forward + backward."""
    if layer.kind != "block":
        return {"tp": _vocab_comm(layer, s, ctx)}
    act = s.micro_batch * ctx.seq_len / s.cp * ctx.hidden * ctx.dtype_bytes
    out = {}
    if s.tp > 1:
        n_coll = 1 if layer.is_moe else 2
        one = _tp_collective(act, s, ctx)
        out["tp"] = 2 * n_coll * one
    if s.cp > 1:
        kv = s.micro_batch * ctx.seq_len / s.cp * ctx.kv_bytes_per_token / s.tp
        step = collective_time("p2p", kv, s.cp, s.tp, ctx.cluster, fits=ctx.fits).time_s
        per_step_compute = attn_fwd / s.cp
        out["cp"] = (s.cp - 1) * (max(0.0, step - per_step_compute) + max(0.0, 2 * step - 2.5 * per_step_compute))
    if layer.is_moe and s.ep > 1:
        routed = act * ctx.topk / s.tp  # tokens are split over tp before dispatch
        a2a = collective_time("all_to_all", routed, s.ep, s.etp, ctx.cluster, fits=ctx.fits).time_s
        if ctx.ep_cross_fraction is not None:  # a routing trace: measured share of tokens leaving the rank
            a2a *= ctx.ep_cross_fraction / ((s.ep - 1) / s.ep)
        out["ep"] = 4 * a2a * ctx.expert_load_ratio
    if layer.is_moe and s.etp > 1:
        routed = act * ctx.topk / s.tp
        out["etp"] = 2 * collective_time("all_reduce", routed, s.etp, 1, ctx.cluster, fits=ctx.fits).time_s
    return out


def _tp_collective(size: float, s: Strategy, ctx: PricingContext) -> float:
    if s.sequence_parallel:
        ag = collective_time("all_gather", size, s.tp, 1, ctx.cluster, fits=ctx.fits).time_s
        rs = collective_time("reduce_scatter", size, s.tp, 1, ctx.cluster, fits=ctx.fits).time_s
        return ag + rs  # one all-gather + one reduce-scatter replace one all-reduce
    return collective_time("all_reduce", size, s.tp, 1, ctx.cluster, fits=ctx.fits).time_s


def _vocab_comm(layer: LayerTemplate, s: Strategy, ctx: PricingContext) -> float:
    """Vocab-parallel embedding: one all-reduce of the embedding output in forward;
    the output layer's cross-entropy reduces only per-token scalars (Megatron)."""
    if s.tp == 1 or layer.kind != "embedding":
        return 0.0
    act = s.micro_batch * ctx.seq_len / s.cp * ctx.hidden * ctx.dtype_bytes
    return _tp_collective(act, s, ctx)
