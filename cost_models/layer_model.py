"""Per-layer cost templates: what one layer costs before any parallelism.

A ``LayerTemplate`` is built once per distinct layer (from the captured graph, see
``from_stats``) at micro-batch 1 and the full sequence, and then scaled for each
strategy by arithmetic only, which is what keeps the search fast:

- every term scales with the local tokens ``mbs · s / cp``;
- ``tp``-tagged ops and saved tensors (between a column- and a row-parallel linear) are
  divided by ``tp``; ``rep``-tagged ones (norms, residual stream, dropout after the row
  linear) are divided by ``tp`` only under sequence parallelism (Korthikanti et al.
  2022, Sec. 4.2.2);
- ``expert`` work is spread evenly over the ``dp·tp·cp`` ranks of a stage (MoE Parallel
  Folding: ``edp·ep·etp = dp·tp·cp``), so per rank it is divided by ``tp·cp``; a routing
  trace or placement multiplies it by the straggler's load ratio. The rows the first expert
  linear reads (``etp_gathered``) are all-gathered over the ``etp`` ranks that split the
  experts' ffn width before it, so each rank keeps ``etp`` times its share of them;
- ``attn_core`` terms are dropped from the saved set by selective recompute and re-run
  in backward; full recompute keeps only the layer input and re-runs the whole forward;
  per-op checkpointing (``op``) keeps its own set ``op_saved`` (``layer_stats.op_policy``) and
  re-runs every op not marked ``op_kept``. Its ``partial`` terms (a row-parallel matmul's
  partial sums) are full size on every tp rank; ``sp_only`` terms (reduce-scatter outputs)
  exist only under tensor + sequence parallelism.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

Shard = Literal["tp", "rep", "expert", "router", "vocab", "partial"]


@dataclass(frozen=True)
class OpTerm:
    name: str
    kind: Literal["gemm", "attention", "membound"]
    shard: Shard
    fwd_flops: float
    bwd_flops: float
    bytes_rw: float                       # forward bytes read + written
    gemm: tuple[float, float, float] | None = None   # (m, n, k) of one call at mbs=1, no parallelism
    calls: float = 1.0
    attn_core: bool = False
    tp_dim: Literal["n", "k", "calls"] = "n"  # what tensor parallel splits: n (column linear),
    #                                         k (row linear) or the batch of heads (attention bmm)
    batched: bool = False                 # batched matmul: calls scale with the micro-batch, m with 1/cp
    sig: str | None = None                # op signature at the captured shape (measured-profile key)
    op_kept: bool = False                 # per-op checkpointing keeps its output: not re-run in backward


@dataclass(frozen=True)
class SavedTerm:
    name: str
    bytes: float
    shard: Shard
    attn_core: bool = False
    const: bool = False                   # does not scale with the batch (e.g. causal mask)
    sp_only: bool = False                 # exists only under tp > 1 with sequence parallelism
    compile_drops: bool = False           # only residual adds use it: a compiled block does not keep it
    etp_gathered: bool = False            # the first expert linear's input: gathered over etp (Shards.div)


@dataclass
class LayerTemplate:
    name: str
    kind: Literal["embedding", "block", "output"]
    indices: list[int]
    is_moe: bool = False
    params_tp: float = 0.0
    params_rep: float = 0.0
    params_expert: float = 0.0
    params_vocab: float = 0.0
    params_tied: float = 0.0              # output weight tied to the embedding (held twice when pp > 1)
    ops: list[OpTerm] = field(default_factory=list)
    saved: list[SavedTerm] = field(default_factory=list)
    input_bytes: float = 0.0              # the block input kept by full recompute (mbs=1, full s)
    temp_bytes: float = 0.0               # transient peak beyond saved tensors (e.g. fp32 logits)
    op_saved: list[SavedTerm] = field(default_factory=list)  # kept under per-op checkpointing

    @property
    def params(self) -> float:
        return self.params_tp + self.params_rep + self.params_expert + self.params_vocab


@dataclass(frozen=True)
class Shards:
    """The divisors one strategy applies to a layer's terms."""

    tokens: float      # mbs / cp
    tp: int
    sp: bool
    expert_div: float  # tp (a tp group's tokens split before expert dispatch), 1 when experts are replicated
    router_div: float = 1  # tp when each tp rank routes its own sequence shard (tp_collectives.routes_local_tokens)
    etp: int = 1           # expert tensor parallel: ranks that gather each other's dispatched rows

    def div(self, t: SavedTerm) -> float:
        """The divisor of saved term ``t``: its shard's, times ``1/etp`` for the rows the first expert linear
        reads, which both programs gather over the expert tensor-parallel group before it, each rank
        running its ffn shard on all of them. autopar's (``codegen.runtime_moe``, ``_run_etp``: ``_GatherRows``
        before ``_run_local``; measured, tests/test_etp_memory.py) and Megatron-Core's
        (``MoEAlltoAllTokenDispatcher.dispatch_postprocess``: ``gather_from_sequence_parallel_region`` over
        ``expt_tp`` before ``TEGroupedMLP.linear_fc1``, which saves that input for its weight gradient). The
        ffn-wide tensors after it are ``etp`` times the rows at ``1/etp`` of the width: unchanged."""
        return self.of(t.shard) / self.etp if t.etp_gathered else self.of(t.shard)

    def of(self, shard: Shard) -> float:
        if shard == "tp" or shard == "vocab":
            return self.tp
        if shard == "rep":
            return self.tp if self.sp else 1
        if shard == "expert":
            return self.expert_div
        if shard == "router":  # replicated on every rank that holds the tokens (all of them, or its shard)
            return self.router_div
        return 1  # partial: full-size partial sums


def tied_copy_params(output: LayerTemplate | None, pp: int, tp: int) -> float:
    """Parameters of ``output`` (the model's output layer, None without one) that a pipeline's last stage holds
    beyond its own: an output weight tied to the input embedding (``params_tied``) is a second copy there when
    pp > 1 (the first stage holds the embedding), tensor-parallel like the table (``/ tp``); 0 without a pipeline.
    Read by every price of that stage's parameters, gradients and ZeRO-1 spans."""
    return output.params_tied / tp if pp > 1 and output is not None else 0.0


def saved_bytes(layer: LayerTemplate, sh: Shards, recompute: str, compiled: bool = False) -> float:
    """Activation bytes one micro-batch leaves saved for backward in this layer. ``compiled``: the
    block runs under ``torch.compile``, whose partitioner keeps of the per-op policy's outputs only
    those the backward reads (eager checkpointing stores every one the policy names)."""
    if recompute == "full":
        return layer.input_bytes * sh.tokens / (sh.tp if sh.sp else 1)
    if recompute == "op" and layer.op_saved:
        # sp_only terms (reduce-scatter outputs) exist only under tensor + sequence parallelism
        return terms_bytes([t for t in layer.op_saved if not (compiled and t.compile_drops)
                            and (not t.sp_only or (sh.sp and sh.tp > 1))], sh)
    return terms_bytes([t for t in layer.saved if not (recompute == "selective" and t.attn_core)], sh)


def working_bytes(layer: LayerTemplate, sh: Shards, recompute: str) -> float:
    """Transient bytes while one layer runs backward: with recompute, its re-built
    activations (all of them for full, the attention core for selective, all but the kept
    ones for op)."""
    if recompute == "none":
        return 0.0
    keep = saved_bytes(layer, sh, "none")
    if recompute == "full":
        return keep
    return max(0.0, keep - saved_bytes(layer, sh, recompute))


def terms_bytes(terms: list[SavedTerm], sh: Shards) -> float:
    """Bytes one micro-batch keeps of saved ``terms`` under ``sh``: each scaled to the local tokens and divided by
    its shard's divisor (``Shards.div``); a batch-independent term (the causal mask) neither scales nor shards."""
    return sum((t.bytes if t.const else t.bytes * sh.tokens / sh.div(t) for t in terms), 0.0)


def expert_gate_gemm(layer: LayerTemplate) -> OpTerm | None:
    """An MoE layer's expert GEMM split on its output width whose width is the gated activation's gate half (w1;
    None without experts)."""
    return next((o for o in layer.ops if o.shard == "expert" and o.kind == "gemm" and o.gemm and o.tp_dim == "n"), None)
