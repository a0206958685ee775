"""torch.fx graph capture: an op graph with shapes, FLOPs, bytes and measured saved activations.

``capture(spec, seq_len, micro_batch, dtype)`` builds the model on the meta device, traces it
with a tracer whose proxies carry meta values (so shape-dependent Python control flow such as
``if k.shape[1] != q.shape[1]`` runs concretely and the graph is specialised to the captured
shapes), then runs the graph once more on meta tensors with autograd on, under
``torch.autograd.graph.saved_tensors_hooks``: every tensor autograd keeps for backward is
recorded, attributed to the fx node that produced it (storage identity: meta tensors keep
real ``StorageImpl`` objects, so ``untyped_storage()._cdata`` tells views of one allocation
apart from copies) and counted once per storage.

Three ops are priced the way a GPU run behaves rather than the way meta/CPU kernels do:
dropout (CUDA ``native_dropout`` keeps a 1-byte bool mask; the CPU path keeps a mask in the
input dtype), SDPA (a flash kernel keeps q, k, v, the output and an fp32 logsumexp; the
meta/CPU math path would keep the s^2 probabilities) and the ``GroupedExperts`` leaf (uniform
top-k routing, see ``_Recorder.experts``). The ``TopKRouter`` leaf runs for real.

With a ``profiles.depth.DepthPlan`` only some of a built-in model's blocks are built and traced,
under the node names the full-depth trace gives them (``layer_stats.capture_stats``).
"""

from __future__ import annotations

import inspect
import time
from contextlib import nullcontext
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from autopar.core.model_spec import ModelSpec
from autopar.errors import InputError
from autopar.profiles.depth import DepthPlan, LayerNames
from autopar.profiles.dynamo_shim import no_dynamo_import
from autopar.profiles.graph_ops import (
    CALL_OPS,
    PREFIX,
    ModelGraph,
    SavedTensor,
    build,
    elsize,
    expert_sub_ops,
    fetch_attr,
    op_kind,
    storage_id,
    tensors_in,
)
from autopar.profiles.hf_capture import expert_geometry, is_expert_container
from autopar.profiles.models import build_model
from autopar.profiles.models.layers import GroupedExperts, RMSNorm, TopKRouter

__all__ = ["DTYPES", "ModelGraph", "SavedTensor", "capture", "storage_id", "tensors_in"]

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
INPUT_DTYPES = {"int64": torch.int64, "float32": torch.float32, "bfloat16": torch.bfloat16,
                "float16": torch.float16}
LEAF_TYPES = (TopKRouter, GroupedExperts, RMSNorm)


# ----- tracing ------------------------------------------------------------------------
class _MetaProxy(fx.Proxy):
    """A proxy that knows its meta value: shape queries return concrete numbers."""

    def _v(self):
        return self.tracer.vals.get(self.node)

    def _concrete(self, name: str):
        v = self._v()
        return getattr(v, name) if isinstance(v, torch.Tensor) else fx.Proxy.__getattr__(self, name)

    shape = property(lambda self: self._concrete("shape"))
    dtype = property(lambda self: self._concrete("dtype"))
    device = property(lambda self: self._concrete("device"))
    ndim = property(lambda self: self._concrete("ndim"))

    def size(self, dim=None):
        v = self._v()
        return v.size() if dim is None else v.size(dim)

    def dim(self):
        return self._v().dim()

    def numel(self):
        return self._v().numel()

    def __len__(self):
        return len(self._v())

    def __iter__(self):
        return iter([self[i] for i in range(len(self._v()))])

    def __bool__(self):
        v = self._v()
        if isinstance(v, torch.Tensor):
            raise RuntimeError("data-dependent control flow on a tensor value")
        return bool(v)


class _Tracer(fx.Tracer):
    proxy_buffer_attributes = True  # buffers sliced by a traced length become graph nodes

    def __init__(self, inputs: dict[str, Any], names: LayerNames | None = None):
        super().__init__()
        self.inputs, self.vals, self.paths = inputs, {}, {}
        self._running, self._leaf_forward = False, None
        self.names = names  # a reduced-depth trace: keep the full-depth node names

    def create_node(self, kind, target, args, kwargs, name=None, type_expr=None):
        if self.names is not None:  # the candidate fx.Graph.create_node makes the node's name from
            self.names.note(self.scope.module_path, name if name is not None else self.graph._target_to_str(target))
        return super().create_node(kind, target, args, kwargs, name, type_expr)

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, LEAF_TYPES) or is_expert_container(m) or super().is_leaf_module(m, qualname)

    def proxy(self, node: fx.Node) -> fx.Proxy:
        return _MetaProxy(node, self)

    def call_module(self, m, forward, args, kwargs):
        if self._running:  # evaluating a leaf on meta values: plain call, no graph nodes
            return forward(*args, **kwargs)
        self._leaf_forward = forward
        if self.names is not None:
            self.names.enter(self.path_of_module(m), self)
        return super().call_module(m, forward, args, kwargs)

    def getattr(self, attr, attr_val, parameter_proxy_cache):
        return attr_val if self._running else super().getattr(attr, attr_val, parameter_proxy_cache)

    def create_proxy(self, kind, target, args, kwargs, name=None, type_expr=None, proxy_factory_fn=None):
        proxy = super().create_proxy(kind, target, args, kwargs, name, type_expr, proxy_factory_fn)
        self.paths[proxy.node] = self.scope.module_path
        self.vals[proxy.node] = self._evaluate(kind, target, args, kwargs)
        return proxy

    def _evaluate(self, kind, target, args, kwargs):
        def unwrap(a):
            return self.vals[a.node] if isinstance(a, fx.Proxy) else a

        a, k = fx.node.map_aggregate(args, unwrap), fx.node.map_aggregate(kwargs, unwrap)
        self._running = True
        try:
            with torch.no_grad():
                if kind == "placeholder":
                    return self.inputs.get(target, a[0] if a else None)
                if kind == "get_attr":
                    return fetch_attr(self.root, target)
                if kind == "call_function":
                    return target(*a, **k)
                if kind == "call_method":
                    return getattr(a[0], target)(*a[1:], **k)
                mod = self.root.get_submodule(target)
                if isinstance(mod, GroupedExperts) or is_expert_container(mod):
                    return torch.empty_like(a[0])
                return self._leaf_forward(*a, **k)
        finally:
            self._running = False


class _WithLoss(nn.Module):
    """The model plus the training loss: cross-entropy on fp32 logits (torchtitan's recipe),
    so the logits' upcast and the saved log-softmax are part of the capture."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, tokens, labels):
        logits = self.model(tokens)
        return F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten())


# ----- running with saved-tensor hooks -------------------------------------------------
class _Recorder:
    """Collects (saving node, tensor, extra tags, label) for every tensor kept for backward."""

    def __init__(self):
        self.node: fx.Node | None = None
        self.outputs: dict[fx.Node, Any] = {}  # kept alive so storage ids are never reused
        self.saves: list[tuple[fx.Node, torch.Tensor, tuple, str]] = []
        self.suppress = False
        self.sub_ops: dict[fx.Node, list[dict]] = {}
        self.counted: dict[fx.Node, int] = {}

    def pack(self, t):
        if not self.suppress:
            self.saves.append((self.node, t, (), ""))
        return t

    def add(self, t: torch.Tensor, tags: tuple = (), label: str = "") -> None:
        self.saves.append((self.node, t, tags, label))

    def dropout(self, x, p: float, training: bool):
        if not training or p == 0:
            return x
        return torch.native_dropout(x, p, True)[0]  # the CUDA kernel: bool mask

    def sdpa(self, args, kwargs):
        q, k, v = args[:3]
        self.suppress = True
        try:
            out = F.scaled_dot_product_attention(*args, **kwargs)
        finally:
            self.suppress = False
        for t in (q, k, v, out):
            self.add(t)
        self.add(torch.empty(q.shape[:-1], dtype=torch.float32, device=q.device), ("stat",), "logsumexp")
        return out

    def experts(self, mod: GroupedExperts, x, idx, weight):
        """Uniform top-k routing: T*k token rows, T*k/E per expert. Saved, as the eager SwiGLU
        expert loop keeps them: the dispatched rows x[tok] (input of w1 and w3), w1 output
        (silu input), silu output, w3 output (both factors of the product), the product (w2
        input), the w2 output and the gate weights (the weighting product), and the int64
        token and slot indices of the gather / index_add."""
        rows, h = idx.numel(), x.shape[-1]
        num_e, f = expert_geometry(mod, h)
        dt, meta = x.dtype, dict(device=x.device)
        for label, shape, dtype in (("dispatched_x", (rows, h), dt), ("w1_out", (rows, f), dt),
                                    ("silu_out", (rows, f), dt), ("w3_out", (rows, f), dt),
                                    ("w2_in", (rows, f), dt), ("w2_out", (rows, h), dt),
                                    ("gate_weight", (rows,), weight.dtype), ("token_index", (rows,), torch.int64),
                                    ("slot_index", (rows,), torch.int64)):
            self.add(torch.empty(shape, dtype=dtype, **meta), ("expert",), label)
        self.sub_ops[self.node] = expert_sub_ops(rows, num_e, h, f, x.shape[0], elsize(dt))
        return torch.empty_like(x).requires_grad_(x.requires_grad)


class _Runner(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule, rec: _Recorder):
        super().__init__(gm, garbage_collect_values=False)
        self.rec = rec

    def run_node(self, n):
        self.rec.node = n
        if n.op in CALL_OPS and (op_kind(n, self.module) == "other" or n.target is torch.einsum):
            # ops without a formula here (conv, einsum, ... in user modules): count GEMM FLOPs
            with FlopCounterMode(display=False) as counter:
                out = super().run_node(n)
            self.rec.counted[n] = counter.get_total_flops()
        else:
            out = super().run_node(n)
        self.rec.outputs[n] = out
        return out

    def call_module(self, target, args, kwargs):
        mod = self.fetch_attr(target)
        if isinstance(mod, GroupedExperts) or is_expert_container(mod):  # transformers' *Experts too
            return self.rec.experts(mod, *args[:3])
        if isinstance(mod, nn.Dropout):
            return self.rec.dropout(args[0], mod.p, mod.training)
        return super().call_module(target, args, kwargs)

    def call_function(self, target, args, kwargs):
        if target is F.dropout:
            bound = _DROPOUT_SIG.bind(*args, **kwargs)
            bound.apply_defaults()
            return self.rec.dropout(bound.arguments["input"], bound.arguments["p"], bound.arguments["training"])
        if target is F.scaled_dot_product_attention:
            return self.rec.sdpa(args, kwargs)
        return super().call_function(target, args, kwargs)


_DROPOUT_SIG = inspect.signature(lambda input, p=0.5, training=True, inplace=False: None)


# ----- capture ---------------------------------------------------------------------------
def capture(spec: ModelSpec, seq_len: int, micro_batch: int = 1, dtype: str = "bf16",
            plan: DepthPlan | None = None) -> ModelGraph:
    """Trace ``spec`` at (micro_batch, seq_len) on the meta device and measure every op.

    ``plan``: capture only ``plan.kept`` of a built-in model's layers, with the node names of the
    full-depth trace (``profiles.depth``; may raise ``DepthMismatch``)."""
    t0 = time.perf_counter()
    if dtype not in DTYPES:
        raise InputError(f"dtype: '{dtype}' is not supported for capture; use one of {', '.join(DTYPES)}")
    if seq_len < 1 or micro_batch < 1:
        raise InputError(f"seq_len={seq_len} and micro_batch={micro_batch} must be positive integers")
    builtin = spec.hf_config is None and spec.family != "custom"  # code we know never needs dynamo
    with no_dynamo_import() if builtin else nullcontext():
        if spec.hf_config is not None:  # a transformers module, captured as itself
            model, gm, inputs, seq_len = _trace_hf(spec, seq_len, micro_batch, dtype)
        else:
            model, gm, inputs, seq_len, micro_batch = _trace_builtin(spec, seq_len, micro_batch, dtype, plan)
        rec = _run(gm, inputs, spec)
        mg = build(gm, rec, model, spec, seq_len, micro_batch, dtype, _block_container(model))
    mg.depth = plan
    mg.capture_time_s = time.perf_counter() - t0
    return mg


def _trace_builtin(spec: ModelSpec, seq_len: int, micro_batch: int, dtype: str, plan: DepthPlan | None):
    """(model, graph module, inputs, seq_len, micro_batch) of a built-in model or a factory,
    built on meta without initialisers (nothing to fill; see ``models.SkipInit``)."""
    model = build_model(spec, "meta", layer_ids=plan.kept if plan else None, init=False)
    _cast_params(model, DTYPES[dtype])
    model.train()
    if spec.family == "custom":
        gm, inputs, seq_len, micro_batch = _trace_custom(spec, model)
        return model, gm, inputs, seq_len, micro_batch
    if seq_len > spec.max_seq_len:
        raise InputError(f"seq_len: {seq_len} exceeds the model's max_seq_len={spec.max_seq_len}; "
                         "use a shorter --seq-len or raise max_seq_len")
    tokens = torch.zeros(micro_batch, seq_len, dtype=torch.int64, device="meta")
    inputs = {"tokens": tokens, "labels": tokens.clone()}
    names = None
    if plan is not None:
        container = _block_container(model)
        names = LayerNames(plan, f"{PREFIX}{container[0]}.")
    gm = _trace(_WithLoss(model), inputs, names)
    if names is not None:
        names.check()
    return model, gm, inputs, seq_len, micro_batch


def _cast_params(model: nn.Module, dtype: torch.dtype) -> None:
    """Cast floating parameters only (buffers such as RoPE tables stay fp32); ``.data``
    assignment keeps tied weights tied."""
    for p in model.parameters():
        if p.is_floating_point():
            p.data = p.data.to(dtype)


def _trace(root: nn.Module, inputs: dict[str, Any], names: LayerNames | None = None) -> fx.GraphModule:
    tracer = _Tracer(inputs, names)
    return _graph_module(tracer, tracer.trace(root))


def _trace_hf(spec: ModelSpec, seq_len: int, micro_batch: int, dtype: str):
    """(model, graph module, inputs, sequence length) of a transformers module; a non-token
    input's sequence length is its tokens per sample (``spec.sample_tokens``: ViT patches)."""
    from autopar.profiles import hf_capture

    model = hf_capture.build_hf_model(spec, "meta")
    _cast_params(model, DTYPES[dtype])
    model.train()
    inputs = hf_capture.example_inputs(spec, model, seq_len, micro_batch)
    tracer, graph, _ = hf_capture.trace_hf(spec, model, inputs, _Tracer)
    seq = spec.sample_tokens or seq_len if inputs["tokens"].is_floating_point() else seq_len
    return model, _graph_module(tracer, graph), inputs, seq


def _graph_module(tracer: _Tracer, graph: fx.Graph) -> fx.GraphModule:
    gm = fx.GraphModule(tracer.root, graph)
    for node in gm.graph.nodes:
        path = tracer.paths.get(node, "")
        node.meta["autopar_path"] = path[len(PREFIX):] if path.startswith(PREFIX) else path
        if node.op == "call_module" and node.target.startswith(PREFIX):
            node.meta["autopar_path"] = node.target[len(PREFIX):]
    return gm


def _trace_custom(spec: ModelSpec, model: nn.Module):
    shape = spec.input_shape
    if not shape:
        raise InputError(f"model: factory '{spec.factory}' needs an example input shape; "
                         "pass --input-shape B,S (and --input-dtype)")
    x_dtype = INPUT_DTYPES[spec.input_dtype]
    if x_dtype.is_floating_point:  # activations run in the capture dtype (mixed precision)
        x_dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), x_dtype)
    x = torch.zeros(*shape, dtype=x_dtype, device="meta")
    params = [p for p in inspect.signature(model.forward).parameters.values()
              if p.default is inspect.Parameter.empty and p.kind is p.POSITIONAL_OR_KEYWORD]
    inputs = {params[0].name: x} if params else {}
    try:
        gm = _trace(model, inputs)
    except InputError:
        raise
    except Exception as exc:
        raise InputError(f"model: cannot trace factory '{spec.factory}': {type(exc).__name__}: "
                         f"{str(exc).splitlines()[0] if str(exc) else ''}; make data-dependent control flow "
                         "a leaf module or use shape-only branching") from None
    return gm, inputs, spec.sample_tokens or (shape[1] if len(shape) > 1 else 1), shape[0]


def _run(gm: fx.GraphModule, inputs: dict[str, Any], spec: ModelSpec) -> _Recorder:
    rec = _Recorder()
    args = [inputs.get(n.target) for n in gm.graph.nodes if n.op == "placeholder"]
    try:
        with torch.autograd.graph.saved_tensors_hooks(rec.pack, lambda t: t):
            _Runner(gm, rec).run(*args)
    except Exception as exc:
        where = rec.node.name if rec.node is not None else "?"
        raise InputError(f"model: cannot run {spec.short()} on meta tensors at node '{where}': "
                         f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}") from None
    return rec


def _block_container(model: nn.Module) -> tuple[str, list[str]] | None:
    """The block list: ``layers`` of the built-ins, else the largest ModuleList/ModuleDict
    whose children all have one type."""
    best, best_n = None, 1
    for name, mod in model.named_modules():
        if isinstance(mod, (nn.ModuleList, nn.ModuleDict)):
            kids = [(k, c) for k, c in mod.named_children() if c is not None]
            if len(kids) > best_n and len({type(c) for _, c in kids}) == 1:
                best, best_n = (name, [k for k, _ in kids]), len(kids)
    return best


