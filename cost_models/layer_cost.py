"""Price one layer of one pipeline rank for one strategy (per micro-batch).

Communication per technique and what hides behind compute (stated once, here):

- TP (Megatron-LM, Shoeybi et al. 2019, Sec. 3): per block, one all-reduce of the
  ``b·s·h`` activations after the attention and one after the MLP in forward, and the
  same two in backward (column-parallel input gradients). With sequence parallelism
  each all-reduce becomes an all-gather plus a reduce-scatter of the same total volume
  (Korthikanti et al. 2022, Sec. 4.2.2). Not overlapped (Megatron 2022 semantics).
  Full recompute repeats the forward collectives in backward.
- CP (``cp_cost.cp_exposed``): autopar's programs all-gather K/V and reduce-scatter their
  gradients, blocking; the other runtimes run the ring (Liu et al. 2023; Megatron-Core CP),
  ``cp - 1`` steps each overlapping one chunk of attention, only the excess exposed.
- EP (GShard / Megatron-Core MoE): two all-to-alls per MoE layer in forward (dispatch,
  combine) and two in backward, each moving the local routed tokens ``k·b·s·h``; not
  overlapped. Expert tensor parallel ``etp > 1`` adds, per direction, an all-gather of the
  received tokens over the etp group and a reduce-scatter of the expert outputs
  (``moe_cost.etp_gathered_bytes``).
- DP, ZeRO and PP are priced per step in ``estimate``.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

from autopar.core.cluster import ClusterSpec
from autopar.core.gpu import program_of
from autopar.core.strategy import Strategy
from autopar.cost_models import host_bound
from autopar.cost_models.comm import CommFit, collective_time
from autopar.cost_models.compute import OpTimer, causal_block_fraction, cpu_contention, layer_dtype
from autopar.cost_models.cp_cost import cp_exposed, cp_kept_bytes, cp_rerun_s
from autopar.cost_models.fp8_cost import Fp8Cast, fp8_casts
from autopar.cost_models.fsdp import FsdpImpl
from autopar.cost_models.layer_model import (
    LayerTemplate,
    OpTerm,
    Shards,
    expert_gate_gemm,
    saved_bytes,
    terms_bytes,
    working_bytes,
)
from autopar.cost_models.loss_memory import gathered_loss_bytes, logits_bytes
from autopar.cost_models.megatron_ops import (
    expert_passes_s,
    megatron_block_tp,
    megatron_linears,
    megatron_loss,
    megatron_rope,
)
from autopar.cost_models.memory import expert_rank_excess
from autopar.cost_models.moe_cost import (
    capped_load,
    ep_exposed,
    etp_gathered_bytes,
    expert_grad_stack_bytes,
    expert_loop_bytes,
    grouped_expert_time,
)
from autopar.cost_models.recompute_cost import recompute_times, rerun_tail, selective_bytes, tp_rerun
from autopar.cost_models.tp_collectives import program_tp_time, routes_local_tokens
from autopar.techniques.moe_program import moe_tokens_local

RECOMPUTE_MODES = ("none", "selective", "op", "full")


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

    recompute_comm_op_s: float = 0.0     # forward collectives per-op checkpointing repeats (not saved)
    host_floor_s: dict[str, float] = field(default_factory=dict)  # per recompute mode: what layer_floor adds

    def recompute_comm(self, recompute: str) -> float:
        """Forward collectives re-run in backward: all of them under full recompute; under ``op``
        those whose outputs the policy does not keep (all-gathers, all-reduces, all-to-alls)."""
        return {"full": self.recompute_comm_s, "op": self.recompute_comm_op_s}.get(recompute, 0.0)

    def time(self, recompute: str) -> float:
        extra = self.recompute_comm(recompute)
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
    kv_bytes_per_token: float = 0.0      # K+V bytes per token context parallel moves (cp_cost)
    sdpa_kv_bytes_per_token: float = 0.0  # K+V bytes per token as attention receives them (GQA repeated)
    expert_load_ratio: float = 1.0       # straggler load over mean (routing trace / placement)
    ep_cross_fraction: float | None = None  # measured share of routed tokens leaving the rank
    moe_capacity_factor: float | None = None  # token-drop capacity (1: forced balance); None: dropless
    a2a_overlap: bool = True             # False: the run blocks on its all-to-alls (stack's ep_overlap unused)
    fits: list[CommFit] | None = None
    stack_name: str = "torch"            # the software stack (core.gpu.Runtime): its kernels; its program: runtime
    runtime = property(lambda self: program_of(self.stack_name), doc="The program family (core.gpu.program_of).")
    compile: str = "none"                # torch.compile of the blocks ("model") and of the loss ("model+loss")
    loss_parallel: bool = False          # torch runtime: cross-entropy on vocabulary-sharded logits (torchtitan)
    sliding_window: int = 0              # tokens a sliding-window layer attends back (ModelSpec.sliding_window)
    sliding_layers: frozenset[int] = frozenset()  # block indices that attend within the window
    attn_head_dim: int = 0               # the attention kernel's head dim (q.k width); 0: the one it was measured at
    rope_attention_factor: float = 1.0   # YaRN's factor on cos / sin (ModelSpec; megatron: not 1 runs RoPE unfused)
    cross_entropy: str = "te"            # megatron: the fused loss kernel (megatron_ops.CROSS_ENTROPY_IMPLS)
    expert_bias: bool = False            # the model's experts have biases (ModelSpec.mlp_bias of an MoE)
    glu_clamp: float = 0.0               # the gated activation's input clamp (ModelSpec.glu_clamp; 0 none)
    tp_comm_overlap: bool = False        # megatron: TE userbuffers tp overlap (--tp-comm-overlap; megatron_ops)
    fsdp_impl: FsdpImpl = "fsdp2"        # torch runtime: which FSDP runs (llm-foundry's rows: FSDP1; fsdp.FsdpImpl)

    def __post_init__(self):
        """A measured hardware profile brings its own collective fits and, for CPU ranks that
        share cores, the contention factor (the timer is the CostModel's: its optimizer step
        slows the same way)."""
        gpu = self.timer.gpu
        if self.fits is None and gpu.comm_fits:
            self.fits = [CommFit.model_validate(f) for f in gpu.comm_fits]
        self.timer.contention = cpu_contention(gpu, self.cluster.gpus_per_node)
        if self.fits and self.timer.contention > 1:
            self.fits = busy_node_fits(self.fits, self.cluster.gpus_per_node)


# What the priced program runs beyond the strategy (CLI options, in the Plan): every cost model of one job prices it.
PROGRAM_OPTIONS = ("compile", "loss_parallel", "moe_capacity_factor", "a2a_overlap", "cross_entropy",
                   "tp_comm_overlap")


def same_program(dst: PricingContext, src: PricingContext) -> None:
    """Copy the program options (``PROGRAM_OPTIONS``) of ``src`` onto ``dst``."""
    for name in PROGRAM_OPTIONS:
        setattr(dst, name, getattr(src, name))


def busy_node_fits(fits: list[CommFit], ranks: int) -> list[CommFit]:
    """Ranks sharing cores: a collective of any group waits for members that the scheduler has
    swapped out for the node's other (busy) ranks, so each kind is priced from its fit measured
    with the most ranks active (up to the node's), rescaled to the group by ring steps
    (``comm.fit_time``); the fits of smaller groups were measured with the other ranks idle.
    Point-to-point keeps its own fit."""
    out = []
    for kind in {f.kind for f in fits}:
        mine = [f for f in fits if f.kind == kind]
        if kind == "p2p":
            out += mine
            continue
        top = max((f.group_size for f in mine if f.group_size <= ranks), default=None)
        out += [f for f in mine if f.group_size == top] if top else mine
    return out


def expert_load(ctx: PricingContext) -> float:
    """Busiest expert rank's tokens over the mean: a routing trace or placement's measured ratio, times
    the stack's fitted imbalance of dropless routing (``StackConstants.moe_imbalance``; GShard,
    Lepikhin et al. 2021, Sec. 2.2: the step waits for the most loaded expert), capped by the run's
    token-drop capacity factor (``moe_cost.capped_load``)."""
    return capped_load(ctx.expert_load_ratio * ctx.timer.stack.moe_imbalance, ctx.moe_capacity_factor)


def shards_for(s: Strategy, layer: LayerTemplate | None = None) -> Shards:
    """The divisors of ``layer``'s terms under ``s``; without a layer the least any layer reads (a floor's: the
    router on the shard wherever an MoE layer could route it; one rule for every runtime, ``moe_tokens_local``)."""
    # tokens is already the rank's share of the sequence (mbs / cp): expert terms divide it further
    # only by tp (the folded mapping splits a tp group's tokens before dispatch), not by cp again
    local = moe_tokens_local(s.sequence_parallel, s.ep, s.etp) if layer is None \
        else routes_local_tokens(layer, s.sequence_parallel, s.ep, s.etp)   # the program's rule, read from the layer
    return Shards(tokens=s.micro_batch / s.cp, tp=s.tp, sp=s.sequence_parallel, etp=s.etp,
                  expert_div=1 if _experts_replicated(s) else s.tp, router_div=s.tp if local else 1)


def _experts_replicated(s: Strategy) -> bool:
    """No expert parallelism (ep = etp = 1): every tensor-parallel rank runs the experts on all of
    its (tp-replicated) tokens, as the emitted programs do, instead of the folded mapping that
    splits the tokens over tp before dispatch."""
    return s.ep * s.etp == 1 and s.tp > 1


def price_layer(layer: LayerTemplate, s: Strategy, ctx: PricingContext) -> LayerCost:
    if layer_dtype(layer.kind, ctx.timer.dtype) != ctx.timer.dtype:  # fp8 runs the blocks' linears only
        ctx = copy.copy(ctx)  # a shallow copy: the fits and contention are already set up
        ctx.timer = ctx.timer.in_dtype(layer_dtype(layer.kind, ctx.timer.dtype))
    sh = shards_for(s, layer)
    before = dict(ctx.timer.hits)
    fwd = bwd = kernel_fwd = 0.0
    flops, fwds = 0.0, []
    performed = _attention_performed(layer, s, ctx)
    ops = runtime_ops(layer, ctx.runtime, ctx.dtype_bytes, ctx.cross_entropy, ctx.rope_attention_factor)
    casts = fp8_casts(ops, ctx.stack_name) if ctx.timer.dtype == "fp8" else {}  # how each linear is quantized
    for op in ops:
        f, b = _op_time(op, s, sh, ctx, performed, casts.get(op.name))
        load = expert_load(ctx) if op.shard == "expert" else 1.0
        fwd, bwd = fwd + f * load, bwd + b * load
        fwds.append(f * load)
        flops += op.fwd_flops * sh.tokens / sh.of(op.shard)
        if op.attn_core or op.kind == "attention":  # the kernels a context-parallel ring step hides behind
            kernel_fwd += f
    extra_f, extra_b = _expert_passes(layer, s, sh, ctx)
    fwd, bwd = fwd + extra_f, bwd + extra_b
    comm = _layer_comm(layer, s, ctx, kernel_fwd, fwd + bwd)
    host = _dtensor_overhead(layer, s, ctx) + len(ops) * ctx.timer.gpu.op_overhead_s * ctx.timer.contention
    fwd, bwd = fwd + host / 3, bwd + 2 * host / 3  # backward dispatches about twice the forward's ops
    rerun = recompute_times(layer, ops, fwds, ctx.runtime, fwd, host)
    gpu_s = {m: fwd + bwd + t for m, t in rerun.items()}   # the GPU's own, for host_floor_s
    fwd, bwd, rerun = host_bound.layer_floor(layer, ops, s, ctx, fwd, bwd, rerun)   # an eager host, small kernels
    cp_kv, cp_rerun = cp_kept_bytes(layer, s, ctx), cp_rerun_s(layer, s, ctx, shared_core_sync(ctx))
    tail = rerun_tail(layer, ops, ctx.runtime)
    tp_full, tp_op = tp_rerun(layer, s, ctx.runtime, comm.get("tp", 0.0), _tp_modules(layer, s.sequence_parallel),
                              [ops[i] for i in tail], ctx.topk)
    sel = {"selective": selective_bytes(layer, ops, sh, ctx.dtype_bytes)} if ctx.runtime == "torch" else {}
    return LayerCost(
        fwd_s=fwd, bwd_s=bwd,
        recompute_s=rerun,
        host_floor_s={m: fwd + bwd + rerun[m] - t for m, t in gpu_s.items()},
        comm_s=comm,
        # the forward's ep all-to-alls and etp gathers (half of each) and the cp K/V gather are re-run by
        # full and op alike (the per-op policy keeps none of them)
        recompute_comm_s=tp_full + (comm.get("ep", 0.0) + comm.get("etp", 0.0)) / 2 + cp_rerun,
        recompute_comm_op_s=tp_op + (comm.get("ep", 0.0) + comm.get("etp", 0.0)) / 2 + cp_rerun,
        act_bytes={m: saved_bytes(layer, sh, m, ctx.compile != "none") + gathered_loss_bytes(layer, s, sh, ctx)
                   + _expert_load_excess(layer, s, sh, ctx, m) + cp_kept_bytes(layer, s, ctx, m)
                   + sel.get(m, (0.0, 0.0))[0] for m in RECOMPUTE_MODES},
        work_bytes={m: working_bytes(layer, sh, m) + _expert_grad_transient(layer, s, ctx)
                    + (cp_kv if m in ("op", "full") else 0.0) + sel.get(m, (0.0, 0.0))[1] for m in RECOMPUTE_MODES},
        params_dense=(layer.params_tp + layer.params_vocab) / s.tp + layer.params_rep,
        params_expert=layer.params_expert / (s.ep * s.etp),
        temp_bytes=logits_bytes(layer, s, sh, ctx),
        flops_fwd=flops,
        sources={"compute": ctx.timer.source},
        source_counts={k: v - before.get(k, 0) for k, v in ctx.timer.hits.items()},
    )


def runtime_ops(layer: LayerTemplate, runtime: str, dtype_bytes: int, cross_entropy: str = "te",
                rope_attention_factor: float = 1.0) -> list[OpTerm]:
    """The ops the runtime runs for the captured ones. Megatron-Core rotates q and k with one fused
    kernel each in the activations' dtype (``--apply-rope-fusion``: Transformer Engine's
    ``fused_apply_rotary_pos_emb``) and its FlashAttention takes GQA's fewer K/V heads as they are
    (Dao 2023, FlashAttention-2 ``num_heads_k``), where the captured graph runs RoPE in fp32 with its
    casts and expands K/V: the elementwise ops between the last projection and the attention kernel
    become one op (``megatron_ops.megatron_rope``; unfused under YaRN's ``rope_attention_factor``); its linears
    are Megatron's fused ones
    (``megatron_ops.megatron_linears``: ``linear_qkv``, ``linear_fc1`` with the fused SwiGLU) and its
    loss the fused cross-entropy ``cross_entropy`` (``megatron_ops.megatron_loss``). Other runtimes run
    the graph's ops."""
    if runtime != "megatron":
        return layer.ops
    if layer.kind == "output":
        return megatron_loss(layer.ops, cross_entropy)
    return megatron_linears(megatron_rope(layer.ops, dtype_bytes, rope_attention_factor))


def _attention_performed(layer: LayerTemplate, s: Strategy, ctx: PricingContext) -> float:
    """Share of the score blocks the attention kernel computes: causal, per CP rank; a sliding-window layer's band
    where the kernel skips masked blocks (Megatron/TE, flex, FA2 window_size), all under the programs' masked SDPA."""
    window = ctx.sliding_window if layer.indices and layer.indices[0] in ctx.sliding_layers else 0
    return causal_block_fraction(ctx.seq_len, s.cp, window, kernel_skips_window=ctx.runtime != "torch")


def _op_time(op: OpTerm, s: Strategy, sh: Shards, ctx: PricingContext, performed: float = 1.0,
             cast: Fp8Cast | None = None) -> tuple[float, float]:
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
        if hit is None and op.shard == "expert" and t.stack.expert_grouped_gemm and calls > 1:
            return _grouped_experts(t, m, n, k, calls, ratio, cast)
        return hit or t.gemm_fb(m, n, k, calls, ratio, cast)
    scale = sh.tokens / sh.of(op.shard)
    hit = t.exact(op.sig) if scale == 1 else None
    if hit is not None:
        return _measured_attention(hit, op, performed, ctx.seq_len) if op.kind == "attention" else hit
    if op.kind == "attention":
        ratio = op.bwd_flops / op.fwd_flops if op.fwd_flops else 2.5
        return t.attention_fb(op.fwd_flops * scale, op.bytes_rw * scale, performed, ratio, ctx.stack_name,
                              ctx.seq_len, s.cp, ctx.attn_head_dim)
    f = t.membound(op.bytes_rw * scale, op.fwd_flops * scale)
    return f, 2.0 * f  # backward of an elementwise op reads the output grad and the saved input


def _measured_attention(hit: tuple[float, float], op: OpTerm, performed: float, seq: int) -> tuple[float, float]:
    """A measured attention call's (forward, backward) for a layer that performs ``performed`` of the score blocks
    (``_attention_performed``): the measured time scaled by the work, as ``OpTimer.attention_fb`` prices it. The
    profile timed the captured call (``autopar profile``: torch SDPA at the captured shape), which computed every
    block where a mask was among its inputs (a sliding window's, or transformers' causal mask: SDPA skips none) and
    the causal triangle where it ran ``is_causal``. Scaled, not looked up: capture groups window and full layers into
    one template and times its first layer's call (``attention_rate.split_by_window``), so the other kind's own call
    has no measurement; the kernel's rate at the shape stays the measured one (a band's short key rows run a little
    slower than the triangle's: ``attention_rate.keys_per_query_tile``, not applied to a measured time)."""
    done = 1.0 if len(_input_shapes(op.sig)) > 3 else causal_block_fraction(seq)
    k = performed / done
    return hit[0] * k, hit[1] * k


def _input_shapes(sig: str | None) -> list[str]:
    """The input shapes of an op signature (``core.op_signature.op_signature``: ``kind:in,...->out,...:dtype``)."""
    body = (sig or "").split(":")
    return body[1].split("->")[0].split(",") if len(body) > 2 else []


def _grouped_experts(t: OpTimer, m: float, n: float, k: float, calls: float, ratio: float,
                     cast: Fp8Cast | None = None) -> tuple[float, float]:
    """(forward, backward) of one layer's local expert GEMMs as one grouped GEMM
    (``moe_cost.grouped_expert_time``; the stack runs ``--moe-grouped-gemm``)."""
    one_f, one_b = t.gemm_fb(m, n, k, 1.0, ratio, cast)
    all_f, all_b = t.grouped_gemm_fb(m, n, k, calls, ratio, cast)
    return grouped_expert_time(one_f, calls, all_f, m), grouped_expert_time(one_b, calls, all_b, m)


def _expert_passes(layer: LayerTemplate, s: Strategy, sh: Shards, ctx: PricingContext) -> tuple[float, float]:
    """(forward, backward) seconds the runtime runs beside the expert GEMMs on a rank's received tokens (its local
    experts' GEMM rows): Megatron-Core's re-sort and expert biases (``megatron_ops.expert_passes_s``), the torch
    programs' per-expert loop (``moe_cost.expert_loop_bytes``; its weight-gradient stack moves weights: no load)."""
    w1 = expert_gate_gemm(layer)
    if not layer.is_moe or w1 is None or ctx.runtime not in ("megatron", "torch"):
        return 0.0, 0.0
    (rows, width, hidden), local, load = _local_gemm(w1, s, sh), w1.calls / s.ep, expert_load(ctx)
    if ctx.runtime == "torch":
        cat, stack = expert_loop_bytes(rows * local, hidden, layer.params_expert / (s.ep * s.etp), ctx.dtype_bytes)
        return ctx.timer.membound(cat) * load, ctx.timer.membound(stack)
    f, b = expert_passes_s(ctx.timer, rows * local, local if s.ep > 1 else 1, hidden, ctx.dtype_bytes, ctx.expert_bias,
                           width if ctx.glu_clamp else 0.0)   # w1's width: the gate half, split by etp
    return f * load, b * load


def _local_gemm(op: OpTerm, s: Strategy, sh: Shards) -> tuple[float, float, float]:
    """(m, n, k) of one GEMM call on one rank."""
    m, n, k = op.gemm
    if op.shard == "expert":
        # tokens per local expert: the stage's dp·mbs sequences, k experts each, over E experts
        # and their edp replicas; the expert width f (n of w1/w3, k of w2) is split by etp.
        m = m * s.micro_batch * s.dp / (s.dp * s.cp if _experts_replicated(s) else s.edp)
        div = s.etp
    elif op.batched:
        m = m / s.cp  # local queries against all keys (ring attention); batch handled by calls
        div = 1
    elif op.shard == "router":  # the gate's whole width on this rank's tokens
        m, div = m * sh.tokens / sh.router_div, 1
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


def shared_core_sync(ctx: PricingContext) -> float:
    """Wall time each blocking collective adds while ranks share cores (members wait to be
    scheduled together; measured, ``GpuProfile.shared_core_sync_s``); 0 otherwise."""
    return ctx.timer.gpu.shared_core_sync_s if ctx.timer.contention > 1 else 0.0


def _tp_modules(layer: LayerTemplate, sp: bool) -> tuple[int, int, int]:
    """(row-parallel, column-parallel, sequence-parallel norm) modules of one layer under the
    emitted tensor-parallel plan: every sharded linear is a module of its own (q, k, v unfused);
    the vocabulary-parallel embedding and the output projection are one module each."""
    if layer.kind != "block":
        return 0, 1, int(sp and any(o.name.endswith("norm") for o in layer.ops))
    tp_gemms = [o for o in layer.ops if o.kind == "gemm" and o.shard == "tp" and o.tp_dim in ("n", "k")]
    rows = sum(o.tp_dim == "k" for o in tp_gemms)
    norms = sum(o.shard == "rep" and o.name.endswith("norm") for o in layer.ops) if sp else 0
    return rows, len(tp_gemms) - rows, norms


def _dtensor_overhead(layer: LayerTemplate, s: Strategy, ctx: PricingContext) -> float:
    """Host CPU time of the DTensor module calls of one layer per micro-batch (forward +
    backward), slowed like every op when ranks share cores."""
    per_call = ctx.timer.gpu.dtensor_call_overhead_s
    if s.tp == 1 or not per_call:
        return 0.0
    return sum(_tp_modules(layer, s.sequence_parallel)) * per_call * ctx.timer.contention


def _layer_comm(layer: LayerTemplate, s: Strategy, ctx: PricingContext, attn_fwd: float,
                compute_s: float = 0.0) -> dict[str, float]:
    """Exposed TP / CP / EP time of one layer per micro-batch, forward + backward (``attn_fwd``: its attention
    kernels' forward seconds, the ring's window; ``compute_s``: its compute, the all-to-all's and userbuffers')."""
    if layer.kind != "block":
        return {"tp": _vocab_comm(layer, s, ctx) + (shared_core_sync(ctx) if s.tp > 1 else 0.0)}
    act = s.micro_batch * ctx.seq_len / s.cp * ctx.hidden * ctx.dtype_bytes
    out = {}
    sync = shared_core_sync(ctx)
    if s.tp > 1:
        rows, cols, _ = _tp_modules(layer, s.sequence_parallel)
        one = _tp_collective(act, s, ctx)
        if ctx.runtime == "megatron":  # exposed: fused QKV, its own overlap (megatron_ops.megatron_block_tp)
            out["tp"] = megatron_block_tp(layer, rows, one, act, s, ctx, compute_s)
        elif rows:  # the emitted program's collectives (cost_models.tp_collectives)
            out["tp"] = program_tp_time(layer, act, s, ctx, sync)
        else:  # split linears not counted by name: one all-reduce per column-parallel one (none with sp)
            out["tp"] = 0.0 if s.sequence_parallel else cols * (one + sync)
        out["tp"] *= 1.0 if ctx.runtime == "megatron" else 1.0 - ctx.timer.stack.tp_overlap  # async TP: a share
    if s.cp > 1:
        out["cp"] = cp_exposed(s, ctx, attn_fwd, sync)
    if layer.is_moe and s.ep > 1:
        routed = act * ctx.topk / s.tp  # tokens are split over tp before dispatch
        a2a = collective_time("all_to_all", routed, s.ep, s.etp, ctx.cluster, fits=ctx.fits).time_s
        if ctx.ep_cross_fraction is not None:  # a routing trace: measured share of tokens leaving the rank
            a2a *= ctx.ep_cross_fraction / ((s.ep - 1) / s.ep)
        overlap = ctx.timer.stack.ep_overlap if ctx.a2a_overlap else 0.0
        a2a = ep_exposed(4 * a2a * expert_load(ctx), compute_s, overlap)
        out["ep"] = a2a + 5 * sync  # + the token-count exchange (uneven splits)
    if layer.is_moe and s.etp > 1:  # all-gather the received tokens over etp, reduce-scatter the outputs
        gathered = etp_gathered_bytes(act * ctx.topk / s.tp, s.etp)
        out["etp"] = 2 * sum(collective_time(kind, gathered, s.etp, 1, ctx.cluster, fits=ctx.fits).time_s
                             for kind in ("all_gather", "reduce_scatter"))
    return out


def _tp_collective(size: float, s: Strategy, ctx: PricingContext) -> float:
    if s.sequence_parallel:
        ag = collective_time("all_gather", size, s.tp, 1, ctx.cluster, fits=ctx.fits).time_s
        rs = collective_time("reduce_scatter", size, s.tp, 1, ctx.cluster, fits=ctx.fits).time_s
        return ag + rs  # one all-gather + one reduce-scatter replace one all-reduce
    return collective_time("all_reduce", size, s.tp, 1, ctx.cluster, fits=ctx.fits).time_s


def _vocab_comm(layer: LayerTemplate, s: Strategy, ctx: PricingContext) -> float:
    """Vocab-parallel embedding: one all-reduce of the embedding output in forward. The output
    layer's logits are all-gathered in forward (the emitted programs run the plain cross-entropy
    on the full vocabulary, docs/codegen.md); their gradient is split locally in backward."""
    if s.tp == 1:
        return 0.0
    if layer.kind == "output":
        if ctx.runtime == "megatron":  # vocab-parallel cross-entropy reduces per-token scalars only
            return 0.0
        logits = layer.temp_bytes * s.micro_batch / s.cp
        return collective_time("all_gather", logits, s.tp, 1, ctx.cluster, fits=ctx.fits).time_s
    act = s.micro_batch * ctx.seq_len / s.cp * ctx.hidden * ctx.dtype_bytes
    return _tp_collective(act, s, ctx)


def _expert_grad_transient(layer: LayerTemplate, s: Strategy, ctx: PricingContext) -> float:
    """Bytes an MoE layer's backward briefly holds beside its local expert weights' gradients: the torch
    programs' gradient stack (``moe_cost.expert_grad_stack_bytes``); other runtimes about one more copy
    of the local expert weights (what indexing ``w1[e]`` per expert materialized; not refitted)."""
    local = layer.params_expert / (s.ep * s.etp) * ctx.dtype_bytes if layer.is_moe else 0.0
    return expert_grad_stack_bytes(local) if ctx.runtime == "torch" else local


def _expert_load_excess(layer: LayerTemplate, s: Strategy, sh: Shards, ctx: PricingContext, recompute: str) -> float:
    """The busiest expert-parallel rank's extra saved expert activations (``memory.expert_rank_excess``)."""
    if s.ep == 1 or not layer.is_moe or recompute == "full":   # ep 1: skip the sum
        return 0.0
    terms = layer.op_saved if recompute == "op" and layer.op_saved else layer.saved
    expert = terms_bytes([t for t in terms if t.shard == "expert" and not t.const], sh)
    return expert_rank_excess(expert, s, ctx)
