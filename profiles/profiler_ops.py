"""The distinct ops of a model, runnable on the local device, keyed by the cost model's signature.

``model_ops(spec, seq_len, micro_batch, dtype, device)`` captures the graph the cost model
prices (``capture`` + ``summarize``: identical blocks form one group), then traces the same
model with real weights on ``device`` (node names match the capture's, so every ``OpCost``
finds its fx node), runs it once with autograd on to record each node's input values, and
returns one ``OpSample`` per distinct signature: a closure running the node's real target on
its real arguments (strides included: a transposed input stays transposed), the inputs that
require grad, and every op instance of the model that shares the signature.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.fx as fx

from autopar.core.model_spec import ModelSpec
from autopar.core.op_signature import op_signature, signature
from autopar.errors import InputError
from autopar.profiles.graph import DTYPES, _trace, _WithLoss, capture
from autopar.profiles.layer_stats import ModelStats, OpCost, summarize
from autopar.profiles.models import build_model
from autopar.profiles.profiler_timing import OpTiming


@dataclass
class OpSample:
    sig: str
    op: OpCost                       # the first op with this signature
    gemm_sig: str | None             # signature("gemm", (m, n, k), dtype) for GEMMs (per call)
    instances: int = 0               # op instances in the model (blocks counted ``count`` times)
    call: Callable[[], Any] | None = None
    wrt: list[torch.Tensor] = field(default_factory=list)
    timing: OpTiming | None = None


@dataclass
class GroupInfo:
    name: str
    count: int
    ops: int
    distinct: int


@dataclass
class ModelOps:
    stats: ModelStats
    samples: list[OpSample]
    groups: list[GroupInfo]
    skipped: list[str]


def model_ops(spec: ModelSpec, seq_len: int, micro_batch: int, dtype: str, device: str) -> ModelOps:
    stats = summarize(capture(spec, seq_len, micro_batch, dtype))
    samples, groups = _distinct(stats, dtype)
    gm, inputs = _real_graph(spec, stats, dtype, device)
    env = _record(gm, inputs)
    nodes = {n.name: n for n in gm.graph.nodes}
    skipped = []
    for s in samples:
        node = nodes.get(s.op.name)
        if node is None:
            skipped.append(f"{s.sig} (no fx node '{s.op.name}')")
            continue
        s.call, s.wrt = _runner(node, gm, env)
    return ModelOps(stats, samples, groups, skipped)


def _distinct(stats: ModelStats, dtype: str) -> tuple[list[OpSample], list[GroupInfo]]:
    """One sample per signature across all groups (a norm of the output layer reuses the
    blocks' timing); per group, how many ops and distinct signatures it has."""
    by_sig: dict[str, OpSample] = {}
    groups = []
    for g in stats.groups:
        sigs = set()
        for op in g.ops:
            if "." in op.name or not (op.fwd_flops or op.bytes_rw):
                continue  # sub-ops of a leaf (grouped experts) have no fx node of their own
            sig = op_signature(op.kind, op.in_shapes, op.out_shapes, op.dtype, op.name)
            sigs.add(sig)
            if sig not in by_sig:
                gemm = signature("gemm", op.gemm_mnk, dtype) if op.gemm_mnk else None
                by_sig[sig] = OpSample(sig, op, gemm)
            by_sig[sig].instances += g.count
        groups.append(GroupInfo(g.name, g.count, len(g.ops), len(sigs)))
    return list(by_sig.values()), groups


def _real_graph(spec: ModelSpec, stats: ModelStats, dtype: str, device: str):
    """The model with real weights on ``device``, traced like ``capture`` (same node names)."""
    torch.manual_seed(0)
    model = build_model(spec, device)
    for p in model.parameters():
        if p.is_floating_point():
            p.data = p.data.to(DTYPES[dtype])
    model.train()
    if spec.family == "custom":
        x = _custom_input(spec, model, device)
        params = [p for p in inspect.signature(model.forward).parameters.values()
                  if p.default is inspect.Parameter.empty and p.kind is p.POSITIONAL_OR_KEYWORD]
        return _trace(model, {params[0].name: x} if params else {}), [x]
    tokens = torch.randint(0, spec.vocab, (stats.micro_batch, stats.seq_len), device=device)
    return _trace(_WithLoss(model), {"tokens": tokens, "labels": tokens.clone()}), [tokens, tokens.clone()]


def _custom_input(spec: ModelSpec, model, device: str) -> torch.Tensor:
    dt = {"int64": torch.int64, "float32": torch.float32, "bfloat16": torch.bfloat16,
          "float16": torch.float16}[spec.input_dtype]
    if not dt.is_floating_point:
        return torch.zeros(*spec.input_shape, dtype=dt, device=device)
    dt = next((p.dtype for p in model.parameters() if p.is_floating_point()), dt)
    return torch.randn(*spec.input_shape, dtype=dt, device=device)


class _Recorder(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule):
        super().__init__(gm, garbage_collect_values=False)


def _record(gm: fx.GraphModule, inputs: list) -> dict[fx.Node, Any]:
    """Every node's value from one forward with autograd on (``requires_grad`` flags are real)."""
    interp = _Recorder(gm)
    try:
        interp.run(*inputs)
    except Exception as exc:
        raise InputError(f"model: cannot run the model on the profiling device: {type(exc).__name__}: "
                         f"{str(exc).splitlines()[0] if str(exc) else ''}") from None
    return interp.env


def _leaf(v):
    """A detached leaf with the same storage and strides, requiring grad where the recorded
    value did (a causal mask or token ids get no gradient, as in training)."""
    if isinstance(v, torch.Tensor):
        t = v.detach()
        return t.requires_grad_(True) if v.requires_grad and v.is_floating_point() else t
    return v


def _runner(node: fx.Node, gm: fx.GraphModule, env: dict) -> tuple[Callable[[], Any], list[torch.Tensor]]:
    args = fx.node.map_aggregate(node.args, lambda a: _leaf(env[a]) if isinstance(a, fx.Node) else a)
    kwargs = fx.node.map_aggregate(node.kwargs, lambda a: _leaf(env[a]) if isinstance(a, fx.Node) else a)
    wrt: list[torch.Tensor] = []
    fx.node.map_aggregate((args, kwargs), lambda a: wrt.append(a) if isinstance(a, torch.Tensor)
                          and a.requires_grad else None)
    if node.op == "call_module":
        mod = gm.get_submodule(node.target)
        wrt += [p for p in mod.parameters() if p.requires_grad]
        return (lambda: mod(*args, **kwargs)), wrt
    if node.op == "call_method":
        return (lambda: getattr(args[0], node.target)(*args[1:], **kwargs)), wrt
    target = node.target
    return (lambda: target(*args, **kwargs)), wrt
