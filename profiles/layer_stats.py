"""Per-layer-type summaries of a captured graph: what the cost model prices strategies from.

``summarize(capture(spec, seq_len, micro_batch, dtype))`` groups the transformer blocks by a
structural signature (op kinds, module paths, shapes, parameters, saved tensors), so 80
identical decoder layers become one ``LayerGroup`` with ``count=80``; DeepSeek's dense first
layers form their own group. Everything in a group (``ops``, ``saved``, FLOPs, bytes) is for
ONE instance at the captured (micro_batch, seq_len); multiply by ``count`` for the model.

Tags (on ops and on saved tensors), for the cost model:

- sharding, exactly one of ``tp`` (sharded by tensor parallelism: after a column-parallel
  linear wq/wk/wv/w1/w3/wq_b/wkv_b and up to the input of the row-parallel wo/w2; the ops of
  the row linears themselves), ``replicated`` (norm inputs, the residual stream, dropout after
  wo/w2, inputs of column linears; sharded by tp only under sequence parallelism) and
  ``expert`` (inside GroupedExperts: sharded by ep*etp).
- ``attn_core``: eager attention between QK^T and probs x V (scores, softmax output, dropout
  mask and output): what selective recompute drops (Korthikanti et al. 2022, Sec. 5).
- ``quadratic``: grows with s^2; ``const``: does not scale with the batch (the causal mask);
  ``stat``: tiny per-token statistics (norm mean/rstd, logsumexp); ``router``; ``input``.

Per-op selective checkpointing (``recompute=op``, ``codegen.runtime_ac.op_policy``) keeps a different
set per block, ``LayerGroup.op_saved`` (see ``op_policy``): tagged like the rest, plus ``partial``
(a row-parallel matmul's full-size partial sum, not split by tp), ``sp_collective`` (a
reduce-scatter output, present only under tensor + sequence parallelism) and ``residual_only``
(consumed only by residual adds, whose backward needs no input: a compiled block's partitioner
does not keep it, eager checkpointing does).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from autopar.core.model_spec import ModelSpec
from autopar.profiles.depth import DepthMismatch, layer_plan
from autopar.profiles.graph import ModelGraph, SavedTensor, capture

__all__ = ["LayerGroup", "ModelStats", "OpCost", "SavedTensor", "capture_stats", "summarize"]


class OpCost(BaseModel):
    """One op of a layer. ``gemm_mnk`` = (m, n, k) of C[m,n] = A[m,k] B[k,n], repeated
    ``gemm_batch`` times (batched matmul; E experts for grouped expert GEMMs)."""

    model_config = ConfigDict(extra="forbid")

    name: str
    kind: str
    module: str = ""
    fwd_flops: int
    bwd_flops: int
    bytes_rw: int = Field(..., description="bytes read + written by the forward op")
    gemm_mnk: tuple[int, int, int] | None = None
    gemm_batch: int = 1
    in_shapes: list[list[int]] = Field(default_factory=list)
    out_shapes: list[list[int]] = Field(default_factory=list)
    dtype: str = ""
    tags: list[str] = Field(default_factory=list)


class LayerGroup(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    kind: Literal["embedding", "block", "output"]
    indices: list[int] = Field(default_factory=list, description="block indices (empty outside blocks)")
    count: int = 1
    is_moe: bool = False
    params: int = Field(0, description="parameters of one instance (a tied weight counts in its first group)")
    params_tp: int = 0
    params_replicated: int = Field(0, description="norms, row-linear biases, router, MLA down-projections")
    params_expert: int = Field(0, description="routed experts, sharded by ep*etp")
    params_embedding: int = Field(0, description="vocab-parallel tables: tok_embeddings, untied output")
    params_tied: int = Field(0, description="parameters used here but counted in an earlier group")
    fwd_flops: int = 0
    bwd_flops: int = 0
    saved_bytes: int = Field(0, description="activation bytes kept for backward (sum of saved)")
    ops: list[OpCost] = Field(default_factory=list)
    saved: list[SavedTensor] = Field(default_factory=list)
    temporaries: list[SavedTensor] = Field(default_factory=list,
                                           description="transient forward tensors (logits, their fp32 upcast)")
    op_saved: list[SavedTensor] = Field(default_factory=list,
                                        description="kept under per-op selective checkpointing (op_policy)")
    op_kept: list[str] = Field(default_factory=list, description="ops whose outputs op_policy keeps (not re-run)")

    def saved_where(self, *tags: str, exclude: tuple[str, ...] = ()) -> int:
        """Bytes of saved tensors carrying all ``tags`` and none of ``exclude``."""
        return sum(t.bytes for t in self.saved if set(tags) <= set(t.tags) and not set(exclude) & set(t.tags))


class ModelStats(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str
    family: str
    seq_len: int
    micro_batch: int
    dtype: str
    tokens: int = Field(..., description="micro_batch * seq_len: what the per-group figures are for")
    groups: list[LayerGroup]
    params: int
    params_active: int = Field(..., description="parameters one token uses (routed experts: topk of E)")
    fwd_flops_per_token: float
    train_flops_per_token: float = Field(..., description="forward + backward from the graph, no recompute")
    train_flops_6n_per_token: float = Field(..., description="6 * active params without the embedding lookups")
    saved_bytes_per_token: float
    capture_time_s: float = 0.0

    def group(self, name: str) -> LayerGroup:
        return next(g for g in self.groups if g.name == name)

    @property
    def blocks(self) -> list[LayerGroup]:
        return [g for g in self.groups if g.kind == "block"]


# ----- summarising -------------------------------------------------------------------------
def capture_stats(spec: ModelSpec, seq_len: int, micro_batch: int = 1, dtype: str = "bf16") -> ModelStats:
    """``summarize(capture(...))`` from the fewest layers that show every distinct block
    (``profiles.depth``): the same statistics, field by field, as a full-depth capture
    (tests/test_capture_depth.py). Full depth where the reduction cannot see the layer kinds
    or its checks fail."""
    plan = layer_plan(spec)
    if plan is not None:
        try:
            return summarize(capture(spec, seq_len, micro_batch, dtype, plan))
        except DepthMismatch:
            pass
    return summarize(capture(spec, seq_len, micro_batch, dtype))


def summarize(mg: ModelGraph) -> ModelStats:
    g = mg.graph
    sections: dict[tuple, list[str]] = {}
    for name in mg.order:
        attrs = g.nodes[name]
        key = ("block", attrs["layer"]) if attrs["section"] == "block" else (attrs["section"], None)
        sections.setdefault(key, []).append(name)
    saved: dict[tuple, list[SavedTensor]] = {}
    for t, layer, section in zip(mg.saved, mg.saved_layer, mg.saved_section):
        key = ("block", layer) if section == "block" else (section, None)
        saved.setdefault(key, []).append(t)
    groups = []
    if ("embedding", None) in sections:
        groups.append(_group(mg, "embedding", "embedding", [], sections[("embedding", None)],
                             saved.get(("embedding", None), [])))
    groups += _block_groups(mg, sections, saved)
    if ("output", None) in sections:
        out = _group(mg, "output", "output", [], sections[("output", None)], saved.get(("output", None), []))
        out.temporaries = _logit_temporaries(mg, sections[("output", None)])
        groups.append(out)
    return _totals(mg, groups)


def _block_groups(mg: ModelGraph, sections, saved) -> list[LayerGroup]:
    by_sig: dict[tuple, list[int]] = {}
    layers = sorted(k[1] for k in sections if k[0] == "block" and k[1] is not None)
    for layer in layers:
        sig = _signature(mg, sections[("block", layer)], saved.get(("block", layer), []))
        by_sig.setdefault(sig, []).append(layer)
    if mg.depth is not None:  # a reduced-depth capture: each group's layers at full depth
        by_sig = {sig: mg.depth.expand(kept) for sig, kept in by_sig.items()}
    if ("block", None) in sections:  # a custom model without a block list: one group
        by_sig[("model",)] = []
    any_moe = any(mg.graph.nodes[n]["kind"] == "moe_experts" for n in mg.order)
    out, used = [], {}
    for indices in by_sig.values():
        key = ("block", indices[0] if indices else None)
        nodes = sections[key]
        is_moe = any(mg.graph.nodes[n]["kind"] == "moe_experts" for n in nodes)
        base = "model" if not indices else "moe_block" if is_moe else "dense_block" if any_moe else "block"
        used[base] = used.get(base, 0) + 1
        name = base if used[base] == 1 else f"{base}_{used[base]}"
        grp = _group(mg, name, "block", indices, nodes, saved.get(key, []))
        grp.count, grp.is_moe = max(1, len(indices)), is_moe
        if indices:
            grp.op_saved, grp.op_kept = op_policy(mg, nodes, grp.saved)
        out.append(grp)
    return out


def _signature(mg: ModelGraph, nodes: list[str], saved: list[SavedTensor]) -> tuple:
    """What makes two blocks interchangeable for costing: the same ops on the same shapes
    with the same parameters, and the same saved tensors."""
    ops = []
    for name in nodes:
        a = mg.graph.nodes[name]
        module = a["module"]
        if a["layer"] is not None and mg.block_path:  # drop "layers.<key>"
            module = module[len(mg.block_path) + 1:].partition(".")[2]
        ops.append((a["kind"], module, a["target"], str(a["out_shapes"]), str(a["out_dtypes"]), a["params"],
                    a["fwd_flops"], tuple(a["tags"])))
    return tuple(ops), tuple((t.bytes, tuple(t.tags)) for t in saved)


def _group(mg: ModelGraph, name: str, kind: str, indices: list[int], nodes: list[str],
           saved: list[SavedTensor]) -> LayerGroup:
    grp = LayerGroup(name=name, kind=kind, indices=indices, count=1, saved=saved,
                     saved_bytes=sum(t.bytes for t in saved))
    for node in nodes:
        a = mg.graph.nodes[node]
        grp.params += a["params"]
        grp.params_tied += a["tied_params"]
        for cls, n in a["params_by_class"].items():
            setattr(grp, f"params_{cls}", getattr(grp, f"params_{cls}") + n)
        grp.fwd_flops += a["fwd_flops"]
        grp.bwd_flops += a["bwd_flops"]
        grp.ops += _op_costs(node, a)
    return grp


def _op_costs(node: str, a: dict) -> list[OpCost]:
    if a["kind"] in ("view", "input", "attr") or (a["fwd_flops"] == 0 and a["bytes_read"] == 0):
        return []
    dtype = a["out_dtypes"][0] if a["out_dtypes"] else ""
    if a["sub_ops"]:
        return [OpCost(name=f"{node}.{s['name']}", kind=s["kind"], module=a["module"], fwd_flops=s["fwd_flops"],
                       bwd_flops=s["bwd_flops"], bytes_rw=s["bytes_read"] + s["bytes_written"],
                       gemm_mnk=s["gemm"], gemm_batch=s["gemm_batch"], dtype=dtype, tags=a["tags"])
                for s in a["sub_ops"]]
    return [OpCost(name=node, kind=a["kind"], module=a["module"], fwd_flops=a["fwd_flops"], bwd_flops=a["bwd_flops"],
                   bytes_rw=a["bytes_read"] + a["bytes_written"], gemm_mnk=a["gemm"], gemm_batch=a["gemm_batch"],
                   in_shapes=a["in_shapes"], out_shapes=a["out_shapes"], dtype=dtype, tags=a["tags"])]


def op_policy(mg: ModelGraph, nodes: list[str], saved: list[SavedTensor]) -> tuple[list[SavedTensor], list[str]]:
    """What a block keeps under torchtitan's per-op policy (``codegen.runtime_ac.op_policy``) and
    which ops it does not re-run: the block input (the checkpoint's input), the output of every
    odd-numbered matmul (each linear is one ``mm`` / ``addmm``; the router's gate counts), the
    attention kernel's output and logsumexp, and under tp + sequence parallelism the
    reduce-scatter output after each row-parallel linear. Routed experts run three matmuls per
    expert in turn, so half of their matmul outputs are kept (exact for an even number of local
    experts). Everything else is recomputed in backward."""
    g = mg.graph
    first = g.nodes[nodes[0]]
    es = _elsize(first["in_dtypes"][0]) if first["in_dtypes"] else 2
    shape = first["in_shapes"][0] if first["in_shapes"] else []
    out = [SavedTensor(name="block_input", bytes=_numel(shape) * es, tags=["input", "replicated"], shape=shape,
                       dtype=first["in_dtypes"][0] if first["in_dtypes"] else "", saved_by=["checkpoint"])]
    kept, matmuls = [], 0
    for n in nodes:
        a = g.nodes[n]
        if a["kind"] == "moe_router":  # its gate matmul: [tokens, experts] logits in the input dtype
            matmuls += 1
            if matmuls % 2:
                rows = a["in_shapes"][0][0]
                out.append(SavedTensor(name=f"{n}:gate", bytes=rows * mg.spec.num_experts * es, tags=["router"],
                                       shape=[rows, mg.spec.num_experts], dtype=a["in_dtypes"][0],
                                       saved_by=["checkpoint"]))
        elif a["kind"] == "linear":
            matmuls += 1
            row = "row_parallel" in a["tags"]
            residual = ["residual_only"] if _feeds_only_adds(mg, n) else []
            if matmuls % 2:
                kept.append(n)
                out.append(_output(n, a, (["partial"] if row else a["out_tags"]) + residual))
            if row:  # the reduce-scatter of its partial sums, saved whatever the count says
                out.append(_output(n, a, ["replicated", "sp_collective"] + residual, ":reduce_scatter"))
        elif a["kind"] == "sdpa":
            kept.append(n)
            out.append(_output(n, a, a["out_tags"]))
            out += [t for t in saved if t.name == f"{n}:logsumexp"]
        elif a["kind"] == "moe_experts":
            out += [t.model_copy(update={"bytes": t.bytes // 2}) for t in saved
                    if t.name.startswith(f"{n}:") and t.name.split(":")[-1] in ("w1_out", "w3_out", "w2_out")]
    return out, kept


def _feeds_only_adds(mg: ModelGraph, node: str) -> bool:
    """Every consumer (through views) is an add: the value itself is not needed in backward."""
    users = list(mg.graph.successors(node))
    return bool(users) and all(mg.graph.nodes[u]["kind"] == "add" or
                               (mg.graph.nodes[u]["kind"] == "view" and _feeds_only_adds(mg, u)) for u in users)


def _output(node: str, a: dict, tags: list[str], suffix: str = "") -> SavedTensor:
    return SavedTensor(name=node + suffix, bytes=a["bytes_written"], tags=sorted(tags), shape=a["out_shapes"][0],
                       dtype=a["out_dtypes"][0], saved_by=["checkpoint"])


def _numel(shape: list[int]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _elsize(dtype: str) -> int:
    return {"float32": 4, "float64": 8, "int64": 8, "bool": 1, "int8": 1, "float8_e4m3fn": 1}.get(dtype, 2)


def _logit_temporaries(mg: ModelGraph, nodes: list[str]) -> list[SavedTensor]:
    """The logits and their fp32 upcast for the loss: not kept for backward, but both are
    alive at once at the end of the forward (a real peak on the last pipeline stage)."""
    vocab = mg.spec.vocab
    out = []
    for node in nodes:
        a = mg.graph.nodes[node]
        if vocab and a["kind"] != "view" and a["out_shapes"] and a["out_shapes"][0][-1:] == [vocab]:
            shape, dtype = a["out_shapes"][0], a["out_dtypes"][0]
            out.append(SavedTensor(name=node, bytes=a["bytes_written"], tags=sorted({*a["out_tags"], "temporary"}),
                                   shape=shape, dtype=dtype, saved_by=[]))
    return out


def _totals(mg: ModelGraph, groups: list[LayerGroup]) -> ModelStats:
    spec, tokens = mg.spec, mg.tokens
    params = sum(g.params * g.count for g in groups)
    routed = sum(g.params_expert * g.count for g in groups)
    frac = spec.topk / spec.num_experts if spec.is_moe else 1.0
    active = params - routed + int(routed * frac)
    lookups = sum(mg.graph.nodes[n]["params"] for n in mg.order
                  if mg.graph.nodes[n]["kind"] == "embedding" and mg.graph.nodes[n]["section"] == "embedding")
    tied = sum(g.params_tied * g.count for g in groups)
    fwd = sum(g.fwd_flops * g.count for g in groups)
    bwd = sum(g.bwd_flops * g.count for g in groups)
    return ModelStats(model=spec.name, family=spec.family, seq_len=mg.seq_len, micro_batch=mg.micro_batch,
                      dtype=mg.dtype, tokens=tokens, groups=groups, params=params, params_active=active,
                      fwd_flops_per_token=fwd / tokens, train_flops_per_token=(fwd + bwd) / tokens,
                      train_flops_6n_per_token=6.0 * (active - lookups + tied),
                      saved_bytes_per_token=sum(g.saved_bytes * g.count for g in groups) / tokens,
                      capture_time_s=mg.capture_time_s)
