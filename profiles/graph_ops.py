"""Per-node analysis of a captured fx graph: op kinds, FLOPs and bytes, parameters and how
they shard, layer placement, tags, and the saved tensors resolved to one record per storage.

``autopar.profiles.graph.capture`` traces and runs the model; this module turns the traced
nodes and what the run recorded into the ``ModelGraph`` (its op graph an ``OpGraph``).
Tag meanings are documented in ``autopar.profiles.layer_stats``.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
from pydantic import BaseModel, ConfigDict
from torch import nn

from autopar.core.model_spec import ModelSpec
from autopar.profiles.depth import DepthPlan
from autopar.profiles.models.layers import GroupedExperts, RMSNorm, TopKRouter

PREFIX = "model."  # capture wraps the model with its loss; module paths drop this prefix


class SavedTensor(BaseModel):
    """One storage kept for backward. ``name``: producing node (``:copy`` / ``:<what>`` for a
    tensor made inside an op); ``saved_by``: the ops that keep it (the first decides its layer)."""

    model_config = ConfigDict(extra="forbid")

    name: str
    bytes: int
    tags: list[str]
    shape: list[int]
    dtype: str
    saved_by: list[str]


class OpGraph:
    """A directed graph of named ops: ``nodes[name]`` (its attributes), ``successors(name)``,
    ``predecessors(name)``, in insertion order like ``networkx.DiGraph``, the part of it used
    here (importing networkx costs a cold capture about 0.2 s of CPU)."""

    def __init__(self):
        self.nodes: dict[str, dict] = {}
        self._succ: dict[str, dict[str, None]] = {}
        self._pred: dict[str, dict[str, None]] = {}

    def add_node(self, name: str, **attrs) -> None:
        self.nodes.setdefault(name, {}).update(attrs)
        self._succ.setdefault(name, {})
        self._pred.setdefault(name, {})

    def add_edge(self, src: str, dst: str) -> None:
        for n in (src, dst):
            self.add_node(n)
        self._succ[src][dst] = None
        self._pred[dst][src] = None

    def successors(self, name: str) -> Iterator[str]:
        return iter(self._succ[name])

    def predecessors(self, name: str) -> Iterator[str]:
        return iter(self._pred[name])

    def number_of_nodes(self) -> int:
        return len(self.nodes)


@dataclass
class ModelGraph:
    """The captured op graph. Node attributes (``graph.nodes[name]``): kind, target, module,
    layer, section ("embedding" | "block" | "output"), in_shapes, in_dtypes, out_shapes,
    out_dtypes, params, param_bytes, params_by_class, tied_params, fwd_flops, bwd_flops,
    bytes_read, bytes_written, gemm (m, n, k) or None, gemm_batch, sub_ops, saved_bytes,
    tags (of the op), out_tags (of its output). With ``depth`` (``profiles.depth``) the graph
    holds only ``depth.kept`` of the blocks, under their full-depth names."""

    spec: ModelSpec
    seq_len: int
    micro_batch: int
    dtype: str
    graph: OpGraph
    order: list[str]
    saved: list[SavedTensor]
    saved_layer: list[int | None]
    saved_section: list[str]
    block_path: str | None
    block_indices: list[int]
    capture_time_s: float = 0.0
    depth: DepthPlan | None = None  # captured at reduced depth: which layers stand for which


    @property
    def tokens(self) -> int:
        return self.seq_len * self.micro_batch


CALL_OPS = ("call_function", "call_method", "call_module")


def elsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def tensors_in(value) -> list[torch.Tensor]:
    out: list[torch.Tensor] = []
    fx.node.map_aggregate(value, lambda v: out.append(v) if isinstance(v, torch.Tensor) else None)
    return out


def storage_id(t: torch.Tensor) -> int:
    return t.untyped_storage()._cdata


def fetch_attr(root: nn.Module, target: str):
    obj = root
    for atom in target.split("."):
        obj = getattr(obj, atom)
    return obj


# ----- per-node analysis ------------------------------------------------------------------
_MODULE_KINDS = ((nn.Linear, "linear"), (nn.LayerNorm, "layernorm"), (RMSNorm, "rmsnorm"), (nn.RMSNorm, "rmsnorm"),
                 (nn.Embedding, "embedding"), (nn.Dropout, "dropout"), (nn.GELU, "gelu"), (nn.SiLU, "silu"),
                 (nn.Softmax, "softmax"), (TopKRouter, "moe_router"), (GroupedExperts, "moe_experts"))
_NAME_KINDS = {"matmul": "matmul", "bmm": "matmul", "mm": "matmul", "einsum": "matmul", "baddbmm": "matmul",
               "linear": "linear", "softmax": "softmax", "log_softmax": "softmax", "gelu": "gelu", "silu": "silu",
               "dropout": "dropout", "embedding": "embedding", "layer_norm": "layernorm", "rms_norm": "rmsnorm",
               "add": "add", "sub": "add", "iadd": "add", "mul": "mul", "truediv": "mul", "div": "mul",
               "imul": "mul", "scaled_dot_product_attention": "sdpa", "cross_entropy": "cross_entropy"}
# Forward FLOPs per element of elementwise / normalisation ops. Approximate on purpose: these
# ops are memory bound and the cost model prices them by bytes_read + bytes_written.
_EW_FLOPS = {"add": 1, "mul": 1, "gelu": 8, "silu": 4, "softmax": 5, "layernorm": 8, "rmsnorm": 5,
             "dropout": 1, "cross_entropy": 5, "other": 1}
# Megatron tensor-parallel layout by module name (Shoeybi et al. 2019): column-parallel linears
# shard their output features, row-parallel ones their input features (the output is all-reduced).
COLUMN_LINEARS = frozenset({"wq", "wk", "wv", "w1", "w3", "wq_b", "wkv_b"})
ROW_LINEARS = frozenset({"wo", "w2"})
VOCAB_PARALLEL = frozenset({"tok_embeddings", "output"})


def op_kind(n: fx.Node, gm: fx.GraphModule) -> str:
    if n.op == "placeholder":
        return "input"
    if n.op == "get_attr":
        return "attr"
    if n.op == "call_module":
        mod = gm.get_submodule(n.target)
        return next((k for cls, k in _MODULE_KINDS if isinstance(mod, cls)), "other")
    name = n.target if n.op == "call_method" else getattr(n.target, "__name__", str(n.target))
    return _NAME_KINDS.get(name, "other")


def _shapes(ts: list[torch.Tensor]) -> tuple[list[list[int]], list[str]]:
    return [list(t.shape) for t in ts], [str(t.dtype).replace("torch.", "") for t in ts]


def _nbytes(ts) -> int:
    return sum(t.numel() * t.element_size() for t in ts)


def _params_of(n: fx.Node, gm: fx.GraphModule) -> list[tuple[str, nn.Parameter, nn.Module]]:
    """(qualified name, parameter, owning module) used directly by a node."""
    if n.op == "call_module":
        mod = gm.get_submodule(n.target)
        return [(f"{n.target}.{k}", p, mod) for k, p in mod.named_parameters()]
    if n.op == "get_attr":
        obj = fetch_attr(gm, n.target)
        if isinstance(obj, nn.Parameter):
            owner = n.target.rpartition(".")[0]
            return [(n.target, obj, gm.get_submodule(owner))]
    return []


def param_class(qualname: str, module: nn.Module) -> str:
    """How a parameter shards: tp | replicated | expert | embedding (vocab-parallel)."""
    path, _, pname = _strip(qualname).rpartition(".")
    leaf = path.rpartition(".")[2]
    role = getattr(module, "autopar_tp_role", None)  # a transformers module's own tp plan (hf_capture)
    if isinstance(module, GroupedExperts):
        return "expert"
    if path in VOCAB_PARALLEL or role in ("embedding", "output"):
        return "embedding"
    if leaf in COLUMN_LINEARS or (leaf in ROW_LINEARS and pname == "weight") or role == "colwise" or \
            (role == "rowwise" and pname == "weight"):
        return "tp"
    return "replicated"


def _strip(path: str) -> str:
    return path[len(PREFIX):] if path.startswith(PREFIX) else path


def _gemm_cost(kind: str, ins: list[torch.Tensor], outs: list[torch.Tensor], bias: bool):
    """(fwd, bwd, (m, n, k), batch) of a GEMM; backward = grad input + grad weight = 2x."""
    if kind == "linear":
        k, n = ins[0].shape[-1], outs[0].shape[-1]
        m = ins[0].numel() // k
        extra = m * n if bias else 0
        return 2 * m * n * k + extra, 4 * m * n * k + extra, (m, n, k), 1
    a, b = ins[0], ins[1]
    if a.dim() < 2 or b.dim() < 2:
        return None
    m, k, n = a.shape[-2], a.shape[-1], b.shape[-1]
    batch = outs[0].numel() // max(1, m * n)
    return 2 * batch * m * n * k, 4 * batch * m * n * k, (m, n, k), batch


def _node_cost(kind: str, n: fx.Node, ins, outs, params, sub_ops, counted: int) -> dict:
    """FLOPs and bytes of one node (0 for views and pass-throughs)."""
    read = _nbytes(ins) + sum(p.numel() * p.element_size() for _, p, _ in params)
    cost = dict(fwd_flops=0, bwd_flops=0, bytes_read=read, bytes_written=_nbytes(outs), gemm=None, gemm_batch=1)
    if sub_ops:
        for key in ("fwd_flops", "bwd_flops", "bytes_read", "bytes_written"):
            cost[key] = sum(op[key] for op in sub_ops)
        return cost
    if kind == "moe_router":
        t, h, e = ins[0].numel() // ins[0].shape[-1], ins[0].shape[-1], params[0][1].shape[0]
        cost.update(fwd_flops=2 * t * h * e + 7 * t * e, bwd_flops=4 * t * h * e + 10 * t * e, gemm=(t, e, h))
        return cost
    if kind in ("linear", "matmul") and ins and not counted:
        bias = any(q.endswith("bias") for q, _, _ in params) or (n.op == "call_function" and len(ins) > 2)
        g = _gemm_cost(kind, ins, outs, bias)
        if g:
            cost.update(fwd_flops=g[0], bwd_flops=g[1], gemm=g[2], gemm_batch=g[3])
            return cost
    if kind == "sdpa":
        q, k, v = ins[:3]
        f = 2 * q.numel() * k.shape[-2] + 2 * (q.numel() // q.shape[-1]) * k.shape[-2] * v.shape[-1]
        cost.update(fwd_flops=f, bwd_flops=int(2.5 * f))  # flash backward recomputes QK^T
        return cost
    if kind == "embedding":
        cost.update(bwd_flops=_numel(outs))  # scatter-add of the gradient rows
        return cost
    if counted:  # a GEMM-like op the flop counter knows (conv, einsum, ...)
        cost.update(fwd_flops=counted, bwd_flops=2 * counted)
        return cost
    numel = max(_numel(outs), ins[0].numel() if ins else 0)
    f = _EW_FLOPS.get(kind, 1) * numel
    cost.update(fwd_flops=f, bwd_flops=2 * f)
    return cost


def _numel(ts) -> int:
    return sum(t.numel() for t in ts)


def expert_sub_ops(rows: int, num_e: int, h: int, f: int, tokens: int, es: int) -> list[dict]:
    """GroupedExperts under uniform top-k routing: rows = tokens*k token copies, rows/E per
    expert; three grouped GEMMs (w1, w3: h->f, w2: f->h), SwiGLU, dispatch and weighted combine."""
    per = -(-rows // num_e)

    def gemm(name, k, n):
        return dict(kind="matmul", name=name, fwd_flops=2 * rows * k * n, bwd_flops=4 * rows * k * n,
                    bytes_read=(rows * k + num_e * k * n) * es, bytes_written=rows * n * es,
                    gemm=(per, n, k), gemm_batch=num_e)

    def ew(name, kind, flops, read, written):
        return dict(kind=kind, name=name, fwd_flops=flops, bwd_flops=2 * flops, bytes_read=read,
                    bytes_written=written, gemm=None, gemm_batch=1)

    return [ew("dispatch", "moe_dispatch", 0, tokens * h * es + rows * 16, rows * h * es),
            gemm("w1", h, f), gemm("w3", h, f),
            ew("swiglu", "silu", 5 * rows * f, 2 * rows * f * es, rows * f * es),
            gemm("w2", f, h),
            ew("combine", "moe_combine", 2 * rows * h, rows * (h + 1) * es, tokens * h * es)]


# ----- assembling the graph ------------------------------------------------------------------
def build(gm, rec, model, spec, seq_len, micro_batch, dtype, container) -> ModelGraph:
    nodes = [n for n in gm.graph.nodes if n.op != "output"]
    info = {n: _analyse(n, gm, rec) for n in nodes}
    _assign_params(nodes, info, gm)
    _place(nodes, info, container)
    _tag(nodes, info, seq_len)
    saved, savers = _resolve_saved(rec, info, _state_storages(model), seq_len)
    for t, saver in zip(saved, savers):
        info[saver]["saved_bytes"] += t.bytes
    g = OpGraph()
    for n in nodes:
        r = info[n]
        r["tags"], r["out_tags"] = sorted(r["tags"]), sorted(r["out_tags"])
        for key in ("_ins", "_outs", "_params", "batch", "_role"):
            r.pop(key)
        g.add_node(n.name, **r)
        for a in n.all_input_nodes:
            g.add_edge(a.name, n.name)
    return ModelGraph(spec=spec, seq_len=seq_len, micro_batch=micro_batch, dtype=dtype, graph=g,
                      order=[n.name for n in nodes], saved=saved, saved_layer=[info[s]["layer"] for s in savers],
                      saved_section=[info[s]["section"] for s in savers],
                      block_path=container[0] if container else None,
                      block_indices=sorted({info[n]["layer"] for n in nodes if info[n]["layer"] is not None}))


def _analyse(n: fx.Node, gm: fx.GraphModule, rec: Any) -> dict:
    ins = [t for a in n.all_input_nodes for t in tensors_in(rec.outputs.get(a))]
    outs = tensors_in(rec.outputs.get(n))
    kind = op_kind(n, gm)
    in_sids = {storage_id(t) for t in ins}
    free = n.op in CALL_OPS and bool(outs) and all(storage_id(t) in in_sids for t in outs)
    if free and kind not in _NAME_KINDS.values():
        kind = "view"
    params = _params_of(n, gm)
    if n.op == "call_module":
        target = type(gm.get_submodule(n.target)).__name__
    elif n.op == "get_attr":
        target = n.meta.get("autopar_path", "")
    else:
        target = n.target if isinstance(n.target, str) else getattr(n.target, "__name__", str(n.target))
    in_shapes, in_dtypes = _shapes(ins)
    out_shapes, out_dtypes = _shapes(outs)
    r = dict(kind=kind, target=target, module=n.meta.get("autopar_path", ""), layer=None, section="",
             in_shapes=in_shapes, in_dtypes=in_dtypes, out_shapes=out_shapes, out_dtypes=out_dtypes,
             params=0, param_bytes=0, params_by_class={}, tied_params=0, sub_ops=rec.sub_ops.get(n, []),
             saved_bytes=0, tags=set(), out_tags=set(), _ins=ins, _outs=outs, _params=params, batch=False,
             _role=getattr(gm.get_submodule(n.target), "autopar_tp_role", None) if n.op == "call_module" else None)
    if free or n.op in ("placeholder", "get_attr"):
        r.update(fwd_flops=0, bwd_flops=0, bytes_read=0, bytes_written=0, gemm=None, gemm_batch=1)
    else:
        r.update(_node_cost(kind, n, ins, outs, params, r["sub_ops"], rec.counted.get(n, 0)))
    return r


def _assign_params(nodes, info, gm) -> None:
    """Each parameter counts once, at its first use; a tied weight's later users record it
    as ``tied_params`` (the output layer of a tied-embedding model)."""
    seen: set[int] = set()
    for n in nodes:
        r = info[n]
        for qual, p, owner in r["_params"]:
            if id(p) in seen:
                r["tied_params"] += p.numel()
                continue
            seen.add(id(p))
            cls = param_class(qual, owner)
            r["params"] += p.numel()
            r["param_bytes"] += p.numel() * p.element_size()
            r["params_by_class"][cls] = r["params_by_class"].get(cls, 0) + p.numel()


def _place(nodes, info, container) -> None:
    """Layer index from the block container path; nodes before the first block are the
    embedding section, after it the output section."""
    prefix = f"{container[0]}." if container else None
    keys = {k: i for i, k in enumerate(container[1])} if container else {}
    seen_block = False
    for n in nodes:
        r = info[n]
        path = r["module"] or ""
        if prefix is not None and path.startswith(prefix):
            key = path[len(prefix):].split(".", 1)[0]
            r["layer"] = int(key) if key.isdigit() else keys.get(key)
        if r["layer"] is not None:
            r["section"], seen_block = "block", True
        else:
            r["section"] = "output" if seen_block else "embedding"
    if container is None:
        for n in nodes:
            info[n]["section"] = "block"


def _is_quadratic(shape, seq_len: int) -> bool:
    return seq_len > 1 and len(shape) >= 2 and shape[-1] == seq_len and shape[-2] == seq_len


def _tag(nodes, info, seq_len: int) -> None:
    """Sharding tags by dataflow (see the module docstring of layer_stats), then the
    attention core, quadratic and batch-independent (const) tags."""
    for n in nodes:
        r = info[n]
        ins = [info[a] for a in n.all_input_nodes if a in info]
        r["batch"] = n.op == "placeholder" or any(a["batch"] for a in ins)
        leaf = r["module"].rpartition(".")[2]
        in_tp = any("tp" in a["out_tags"] for a in ins)
        if r["kind"] == "moe_experts":
            r["tags"], r["out_tags"] = {"expert"}, {"replicated"}
        elif r["kind"] == "moe_router":
            r["tags"], r["out_tags"] = {"router", "replicated"}, {"router", "replicated"}
        elif r["kind"] == "linear" and n.op == "call_module" and (leaf in ROW_LINEARS or r["_role"] == "rowwise"):
            r["tags"], r["out_tags"] = {"tp", "row_parallel"}, {"replicated"}
        elif r["kind"] == "linear" and n.op == "call_module" and (leaf in COLUMN_LINEARS or r["module"] == "output"
                                                                  or r["_role"] in ("colwise", "output")):
            r["tags"], r["out_tags"] = {"tp", "column_parallel"}, {"tp"}
        elif in_tp and r["kind"] not in ("input", "attr"):
            r["tags"], r["out_tags"] = {"tp"}, {"tp"}
        else:
            r["tags"], r["out_tags"] = {"replicated"}, {"replicated"}
        if n.op == "placeholder":
            r["out_tags"].add("input")
        if r["module"] in VOCAB_PARALLEL or r["_role"] in ("embedding", "output"):
            r["tags"].add("vocab")
        if not r["batch"]:
            r["tags"].add("const")
            r["out_tags"].add("const")
    _tag_attention_core(nodes, info)
    # s x s shapes count as quadratic only inside the attention core or for constants (the
    # causal mask): a [b, s, d] activation with d == s must not be mistaken for scores.
    for n in nodes:
        r = info[n]
        if not {"attn_core", "const"} & r["tags"]:
            continue
        if any(_is_quadratic(s, seq_len) for s in r["in_shapes"] + r["out_shapes"]):
            r["tags"].add("quadratic")
        if any(_is_quadratic(s, seq_len) for s in r["out_shapes"]):
            r["out_tags"].add("quadratic")


def _tag_attention_core(nodes, info) -> None:
    """Eager attention: per module, pair an activation x activation matmul (QK^T) with the
    next one it feeds through a softmax (probs x V); everything from QK^T up to the second
    matmul is the core (its output, the context, is not)."""
    by_module: dict[str, list[fx.Node]] = {}
    for n in nodes:
        if info[n]["kind"] == "matmul" and not any(info[a]["kind"] == "attr" for a in n.all_input_nodes):
            by_module.setdefault(info[n]["module"], []).append(n)
    for mms in by_module.values():
        for qk, pv in zip(mms, mms[1:]):
            between = _between(qk, pv, info)
            if not any(info[b]["kind"] == "softmax" for b in between):
                continue
            for b in [qk, *between]:
                info[b]["tags"].add("attn_core")
                info[b]["out_tags"].add("attn_core")
            info[pv]["tags"].add("attn_core")


def _between(src: fx.Node, dst: fx.Node, info) -> list[fx.Node]:
    """Nodes on a dataflow path src -> dst (exclusive), searched within src's layer."""
    layer, down, stack = info[src]["layer"], set(), [src]
    while stack:
        for u in stack.pop().users:
            if u in info and u not in down and u is not dst and info[u]["layer"] == layer:
                down.add(u)
                stack.append(u)
    up, stack = set(), [dst]
    while stack:
        for a in stack.pop().all_input_nodes:
            if a in down and a not in up:
                up.add(a)
                stack.append(a)
    return [n for n in down if n in up]


def _state_storages(model: nn.Module) -> set[int]:
    return {storage_id(t) for t in [*model.parameters(), *model.buffers()]}


def _resolve_saved(rec: Any, info, excluded: set[int], seq_len: int):
    """One SavedTensor per storage, named after the node that produced it; a tensor made
    inside a matmul with the shape of one of its inputs is that input's contiguous copy
    (torch.matmul copies transposed operands before bmm) and takes the input's tags."""
    owner: dict[int, fx.Node] = {}
    for n, out in rec.outputs.items():
        for t in tensors_in(out):
            owner.setdefault(storage_id(t), n)
    found: dict[int, SavedTensor] = {}
    saved, savers = [], []
    for saver, t, extra, label in rec.saves:
        sid = storage_id(t)
        if t.dim() == 0 or sid in excluded:
            continue  # wrapped scalars, parameters and buffers are not activations
        if sid in found:
            if saver.name not in found[sid].saved_by:
                found[sid].saved_by.append(saver.name)
            continue
        name, base = _origin(saver, t, label, owner.get(sid), rec, info, owner)
        tags = {x for x in base if x not in ("quadratic", "stat")} | set(extra)
        if "expert" in tags:
            tags -= {"replicated", "tp"}
        if _is_quadratic(t.shape, seq_len) and {"attn_core", "const"} & tags:
            tags.add("quadratic")
        if t.dim() >= 2 and t.shape[-1] == 1:
            tags.add("stat")
        st = SavedTensor(name=name, bytes=t.untyped_storage().nbytes(), tags=sorted(tags), shape=list(t.shape),
                         dtype=str(t.dtype).replace("torch.", ""), saved_by=[saver.name])
        found[sid] = st
        saved.append(st)
        savers.append(saver)
    return saved, savers


def _origin(saver, t, label, producer, rec, info, owner) -> tuple[str, set]:
    if producer is not None:
        return producer.name, info[producer]["out_tags"]
    if info[saver]["kind"] == "matmul":
        for a in saver.all_input_nodes:
            for x in tensors_in(rec.outputs.get(a)):
                if x.numel() == t.numel() and x.dtype == t.dtype and x.shape[-2:] == t.shape[-2:]:
                    src = owner.get(storage_id(x), a)
                    return f"{src.name}:copy", info[src]["out_tags"]
    return f"{saver.name}:{label or 'internal'}", info[saver]["out_tags"]
