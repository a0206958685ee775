"""From the captured graph to per-layer cost templates (``layer_model.LayerTemplate``).

``build_templates(spec, seq_len, dtype)`` captures the model once with torch.fx at
micro-batch 1, one block per distinct layer context (``profiles.layer_stats.capture_stats``,
``profiles.depth``), groups identical blocks and converts each group: GEMMs keep their
(m, n, k) and batch count so the compute model can look up a shape-dependent
efficiency; the sharding tags decide how each op and saved tensor divides under a
strategy. Results are cached per (model, seq_len, dtype): the search reuses them.
"""

from __future__ import annotations

import json
from functools import lru_cache
from typing import TYPE_CHECKING

from autopar.core.model_spec import ModelSpec
from autopar.cost_models.compute import op_signature
from autopar.cost_models.layer_model import LayerTemplate, OpTerm, SavedTerm, Shard
from autopar.cost_models.template_cache import cached_templates

if TYPE_CHECKING:  # capture imports torch: only a cache miss pays for it
    from autopar.profiles.layer_stats import LayerGroup, ModelStats, OpCost

ROW_PARALLEL = ("wo", "w2")   # row-parallel linears: tensor parallel splits their k (input) dim


def build_templates(spec: ModelSpec, seq_len: int, dtype: str = "bf16", fuse: bool = True) -> list[LayerTemplate]:
    """Templates of every layer group; ``fuse`` merges chains of elementwise ops into one
    kernel (what the GPU profile's ``fused_elementwise`` says the training stack does)."""
    # name and source do not change the graph: leave them out of the cache key
    key = spec.model_copy(update={"name": "model", "source": ""}).model_dump_json()
    return list(_cached(key, seq_len, dtype, fuse))


@lru_cache(maxsize=16)
def _cached(spec_json: str, seq_len: int, dtype: str, fuse: bool) -> tuple[LayerTemplate, ...]:
    key = {"spec": json.loads(spec_json), "seq_len": seq_len, "micro_batch": 1, "dtype": dtype, "fuse": fuse}
    return cached_templates(key, lambda: _capture(spec_json, seq_len, dtype, fuse))


def _capture(spec_json: str, seq_len: int, dtype: str, fuse: bool) -> tuple[LayerTemplate, ...]:
    from autopar.profiles.layer_stats import capture_stats

    spec = ModelSpec.model_validate_json(spec_json)
    return templates_from_stats(capture_stats(spec, seq_len, 1, dtype), spec, seq_len, dtype, fuse)


def templates_from_stats(stats: ModelStats, spec: ModelSpec, seq_len: int, dtype: str,
                         fuse: bool = True) -> tuple[LayerTemplate, ...]:
    """Convert a capture's layer statistics (at micro-batch 1) to templates."""
    dbytes = 4 if dtype == "fp32" else 2
    tied = sum(g.params_tied for g in stats.groups if g.kind == "output")
    out = [_template(g, spec, seq_len, dbytes, fuse) for g in stats.groups]
    for t in out:
        if t.kind == "output":
            t.params_tied = float(tied)
    return tuple(out)


def _template(g: LayerGroup, spec: ModelSpec, seq_len: int, dbytes: int, fuse: bool) -> LayerTemplate:
    hidden = spec.hidden or 0
    ops = [o for o in g.ops if o.fwd_flops or o.bytes_rw]
    return LayerTemplate(
        name=g.name, kind=g.kind, indices=list(g.indices), is_moe=g.is_moe,
        params_tp=float(g.params_tp), params_rep=float(g.params_replicated),
        params_expert=float(g.params_expert), params_vocab=float(g.params_embedding),
        ops=[_op(o, g.kind, o.name in g.op_kept) for o in (fuse_elementwise(ops) if fuse else ops)],
        saved=[_saved(t.name, t.bytes, t.tags) for t in g.saved],
        op_saved=[_saved(t.name, t.bytes, t.tags) for t in g.op_saved],
        input_bytes=float(seq_len * hidden * dbytes),
        temp_bytes=float(sum(t.bytes for t in g.temporaries)),
    )


def fuse_elementwise(ops: list[OpCost]) -> list[OpCost]:
    """Merge each run of adjacent memory-bound ops where the next consumes the previous
    output into one op: the intermediate tensor is neither written nor read back, so the
    fused op moves ``sum(bytes) - 2 * intermediate bytes`` (as a fused CUDA kernel does)."""
    out: list[OpCost] = []
    for o in ops:
        prev = out[-1] if out else None
        if prev is not None and _membound(prev) and _membound(o) and _feeds(prev, o) and _same_region(prev, o):
            inter = _nbytes(prev.out_shapes[0], prev.dtype)
            out[-1] = prev.model_copy(update={
                "name": f"{prev.name}+{o.name}", "fwd_flops": prev.fwd_flops + o.fwd_flops,
                "bwd_flops": prev.bwd_flops + o.bwd_flops, "out_shapes": o.out_shapes,
                "bytes_rw": max(prev.bytes_rw + o.bytes_rw - 2 * inter, 0),
                "tags": sorted(set(prev.tags) | set(o.tags))})
        else:
            out.append(o)
    return out


def _same_region(a: OpCost, b: OpCost) -> bool:
    """Fuse only within one sharding region and one side of the attention-core boundary."""
    return _shard(a.tags) == _shard(b.tags) and ("attn_core" in a.tags) == ("attn_core" in b.tags)


def _membound(o: OpCost) -> bool:
    return o.gemm_mnk is None and o.kind not in ("sdpa", "moe_router", "moe_experts", "embedding")


def _feeds(a: OpCost, b: OpCost) -> bool:
    return bool(a.out_shapes) and a.out_shapes[0] in b.in_shapes


_DSIZE = {"torch.float32": 4, "float32": 4, "fp32": 4, "torch.int64": 8, "int64": 8, "torch.bool": 1, "bool": 1}


def _nbytes(shape: list[int], dtype: str) -> int:
    n = 1
    for d in shape:
        n *= d
    return n * _DSIZE.get(dtype, 2)


def _shard(tags: list[str]) -> Shard:
    if "partial" in tags:  # a row-parallel matmul's partial sums: full size on every tp rank
        return "partial"
    if "expert" in tags:
        return "expert"
    if "tp" in tags:
        return "tp"
    if "router" in tags:
        return "router"
    return "rep"


def _op(o: OpCost, section: str, kept: bool = False) -> OpTerm:
    shard = _shard(o.tags)
    attn_core = "attn_core" in o.tags
    if o.gemm_mnk is not None:
        leaf = o.name.rsplit(".", 1)[-1] if shard == "expert" else o.module.rsplit(".", 1)[-1]
        batched = o.kind == "matmul" and shard != "expert"  # expert GEMMs: one call per local expert
        # row-parallel: by name (built models) or by the capture's tag (a transformers model's own tp plan)
        row = leaf in ROW_PARALLEL or "row_parallel" in o.tags
        tp_dim = "calls" if batched else ("k" if row else "n")
        return OpTerm(name=o.name, kind="gemm", shard=shard, fwd_flops=float(o.fwd_flops),
                      bwd_flops=float(o.bwd_flops), bytes_rw=float(o.bytes_rw),
                      gemm=tuple(float(x) for x in o.gemm_mnk), calls=float(o.gemm_batch), attn_core=attn_core,
                      tp_dim=tp_dim, batched=batched, sig=_sig(o), op_kept=kept)
    kind = "attention" if o.kind == "sdpa" else "membound"
    return OpTerm(name=o.name, kind=kind, shard=shard, fwd_flops=float(o.fwd_flops), bwd_flops=float(o.bwd_flops),
                  bytes_rw=float(o.bytes_rw), attn_core=attn_core, sig=_sig(o), op_kept=kept)


def _sig(o: OpCost) -> str | None:
    """The measured-profile key of an op as captured; fused chains and leaf sub-ops have none
    (``autopar profile`` times fx nodes one by one)."""
    if "+" in o.name or "." in o.name:
        return None
    return op_signature(o.kind, o.in_shapes, o.out_shapes, o.dtype, o.name)


def _saved(name: str, nbytes: int, tags: list[str]) -> SavedTerm:
    # ":dispatched_x": the expert rows w1/w3 read (profiles.graph._Recorder.experts' label), gathered over etp
    return SavedTerm(name=name, bytes=float(nbytes), shard=_shard(tags), attn_core="attn_core" in tags,
                     const="const" in tags, sp_only="sp_collective" in tags,
                     compile_drops="residual_only" in tags,
                     etp_gathered="expert" in tags and name.endswith(":dispatched_x"))
