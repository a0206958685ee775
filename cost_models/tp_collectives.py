"""The tensor-parallel collectives one block of the emitted program runs (``--runtime torch``), per
micro-batch, forward and backward: what ``layer_cost._layer_comm`` prices and ``recompute_cost.tp_rerun``
re-runs. Counted on the program in tests/test_tp_sp_collectives.py.

A block is split into sub-layers at its row-parallel linears (``wo``; the MLP's or shared experts' ``w2``).
Each sub-layer takes its input whole: with sequence parallel (Korthikanti et al. 2022) an all-gather before
it and a reduce-scatter of its Partial output after it; without, the row-parallel output is all-reduced.
In backward the output gradient is gathered again (sp) and the column-parallel linears' Partial input
gradients, summed by autograd, are reduced once (sp: reduce-scatter; else all-reduce): torchtitan's plan,
``codegen.runtime_parallel._block_plan``. Exceptions, each what the program must run:

- MLA (DeepSeek, arXiv:2405.04434): the column-parallel ``wq_b`` / ``wkv_b`` read latents of the replicated
  ``wq_a`` / ``wkv_a``, whose weights need the latents' whole gradients: one all-reduce per latent (its
  width) and one of the decoupled RoPE key (the rest of ``wkv_a``'s output), after which the input
  gradient is whole (no reduce-scatter); a column-parallel linear reading the input itself (``wq``, no
  q_lora) all-reduces its input gradient.
- MoE with a gate on the shared experts (Qwen2-MoE) on the whole sequence: the gate's replicated weight needs
  the whole shared output, so the forward all-reduces it (the reduce-scatter's place).
- MoE without shared experts (Mixtral), experts replicated over tp (ep = etp = 1): no split linear; under sp
  its input is gathered (forward) and its output gradient gathered (backward), the output split locally.
- MoE under expert parallel (``ep * etp`` > 1: ``apply_ep`` runs) without sp: every
  tp rank holds the layer's tokens whole and dispatches 1/tp of them
  (``codegen.runtime_moe.ExpertParallelGroupedExperts.forward``: ``_SliceRows``), gathering the expert outputs
  back (``_GatherRows``): one all-gather forward; backward one of the input rows' gradients and one of the gate
  weights' (``topk`` wide). Counted with ``ep`` alone until 2026-11-27: ep = 1, etp > 1 ran them unpriced.
- MoE under sp and expert parallel (``ep * etp > 1``; ``techniques.moe_program.moe_tokens_local``): each tp
  rank routes and dispatches its own sequence shard (Megatron-Core's MoE layer under sp): no tp collective on
  the routed tokens; shared experts are a sequence-parallel sub-layer like the dense MLP (gathered in,
  reduce-scattered out; Qwen2's gate reads the shard after it, so no all-reduce); the router's replicated gate
  weight gradient, and Qwen2's shared gate's, are all-reduced over tp once per backward (``weight_grads``:
  their sizes, ``runtime_moe.SumGradColumns``).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Literal

from autopar.cost_models.comm import collective_time
from autopar.cost_models.layer_model import LayerTemplate, OpTerm
from autopar.techniques.moe_program import moe_tokens_local

Kind = Literal["all_gather", "reduce_scatter", "all_reduce"]
Collective = tuple[Kind, float]   # (kind, width as a fraction of the hidden size)


@dataclass(frozen=True)
class TpCollectives:
    forward: tuple[Collective, ...]
    backward: tuple[Collective, ...]
    last_closing: int | None = None   # index in ``forward`` of the last row-parallel linear's collective
    weight_grads: tuple[float, ...] = ()   # replicated weights' gradients, each all-reduced per backward (elements)

    def all(self) -> tuple[Collective, ...]:
        return self.forward + self.backward

    def rerun_shares(self, skip_last: bool) -> tuple[float, float]:
        """(full, op) shares of the block's tp time that recompute re-runs, by bytes on the wire (an
        all-reduce moves twice a reduce-scatter's or all-gather's: ring all-reduce = reduce-scatter +
        all-gather, Thakur et al. 2005). Both re-run the forward's collectives but the last row-parallel
        linear's when it sits in the early-stop tail (``skip_last``); op keeps reduce-scatter outputs."""
        total = sum(map(_weight, self.all()))
        if not total:
            return 0.0, 0.0
        rerun = [c for i, c in enumerate(self.forward) if not (skip_last and i == self.last_closing)]
        full = sum(map(_weight, rerun))
        op = sum(_weight(c) for c in rerun if c[0] != "reduce_scatter")
        return full / total, op / total


def _weight(c: Collective) -> float:
    return c[1] * (2.0 if c[0] == "all_reduce" else 1.0)


def _is_row(o: OpTerm) -> bool:
    return o.kind == "gemm" and o.shard == "tp" and o.tp_dim == "k"


def routes_local_tokens(layer: LayerTemplate, sp: bool, ep: int, etp: int) -> bool:
    """Whether the program's MoE layer in ``layer`` dispatches each tp rank's sequence shard
    (``techniques.moe_program.moe_tokens_local``), for a layer with a router."""
    if not layer.is_moe or not any(o.shard == "router" for o in layer.ops):
        return False
    return moe_tokens_local(sp, ep, etp)


def block_tp_collectives(layer: LayerTemplate, sp: bool, ep: int = 1, topk: int = 0, etp: int = 1) -> TpCollectives:
    """The collectives of one block under tp (module docstring); none for a block without a row-parallel
    linear counted by name (a Hugging Face model priced from its own tp plan). ``ep``, ``topk``, ``etp``: expert
    parallel, the experts per token and expert tensor parallel, for an MoE block's dispatch."""
    rows = [i for i, o in enumerate(layer.ops) if _is_row(o)]
    if layer.kind != "block" or not rows:
        return TpCollectives((), ())
    hidden = layer.ops[rows[0]].gemm[1]   # wo's output width
    fwd: list[Collective] = []
    bwd: list[Collective] = []
    start, last, moe_split = 0, None, False
    local = routes_local_tokens(layer, sp, ep, etp)
    gate = [o for o in layer.ops[rows[-1] + 1:] if o.kind == "gemm" and o.shard == "rep"]   # Qwen2's shared gate
    for end in rows:
        seg = layer.ops[start:end + 1]
        moe = any(o.shard in ("router", "expert") for o in seg)
        moe_split |= moe
        f, b = _sub_layer(seg, hidden, sp, bool(gate) and moe and not local)
        fwd += f
        last = len(fwd) - 1
        bwd += b
        start = end + 1
    if local:  # each rank's shard routed as it is: the router's (and shared gate's) weight gradient summed
        router = next(o for o in layer.ops if o.shard == "router")
        return TpCollectives(tuple(fwd), tuple(bwd), last, tuple(o.gemm[1] * o.gemm[2] for o in [router, *gate]))
    # a sub-layer of replicated linears only (MoE without shared experts: routed experts, their router)
    if sp and not moe_split and any(o.kind == "gemm" for o in layer.ops[start:]):
        fwd.append(("all_gather", 1.0))
        bwd.append(("all_gather", 1.0))
    if ep * etp > 1 and layer.is_moe:  # the expert-parallel dispatch's tp split and gather
        fwd.append(("all_gather", 1.0))
        bwd += [("all_gather", 1.0), ("all_gather", topk / hidden)]
    return TpCollectives(tuple(fwd), tuple(bwd), last)


def program_tp_time(layer: LayerTemplate, act: float, s, ctx, sync: float) -> float:
    """Seconds of a block's tp collectives under strategy ``s`` (``act``: the sub-layer input's bytes; each
    collective a fraction of it) plus the shared-core wait ``sync`` of each. ``ctx``: the pricing context
    (``layer_cost.PricingContext``, not imported: layer_cost imports this module)."""
    colls = block_tp_collectives(layer, s.sequence_parallel, s.ep, ctx.topk, s.etp)
    counts = Counter(colls.all())
    for elems in colls.weight_grads:  # the gradient in the compute dtype (the weight's copy the forward read)
        counts[("all_reduce", elems * ctx.dtype_bytes / act)] += 1
    return sum(n * collective_time(kind, act * w, s.tp, 1, ctx.cluster, fits=ctx.fits).time_s
               for (kind, w), n in counts.items()) + sum(counts.values()) * sync


def _sub_layer(seg: list[OpTerm], hidden: float, sp: bool, gated: bool) -> tuple[list, list]:
    """(forward, backward) collectives of the sub-layer ``seg`` (ending with its row-parallel linear)."""
    cols = [o for o in seg if o.kind == "gemm" and o.shard == "tp" and o.tp_dim == "n"]
    latents = [o.gemm[2] / hidden for o in cols if o.gemm[2] != hidden]   # MLA: wq_b's, wkv_b's input width
    direct = any(o.gemm[2] == hidden for o in cols)
    closing: Kind = "all_reduce" if gated or not sp else "reduce_scatter"
    fwd: list[Collective] = [("all_gather", 1.0)] if sp else []
    fwd.append((closing, 1.0))
    bwd: list[Collective] = [("all_gather", 1.0)] if sp else []
    if latents:
        rope = sum(o.gemm[1] for o in seg if o.kind == "gemm" and o.shard == "rep") / hidden - sum(latents)
        bwd += [("all_reduce", w) for w in latents + ([rope] if rope > 0 else [])]
        if direct:
            bwd.append(("all_reduce", 1.0))
    elif direct:
        bwd.append(("reduce_scatter" if sp else "all_reduce", 1.0))
    return fwd, bwd
