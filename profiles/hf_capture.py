"""Build a Hugging Face transformers module from its config and trace it as itself.

``build_hf_model(spec)`` (``profiles.models.hf``) builds the module with ``from_config`` (no hub
access, no weights) on the meta device. ``trace_hf`` traces it with the same concrete-meta
tracer as the built-in catalog (``profiles.graph._Tracer``: proxies carry meta values, so the
shape-dependent Python in transformers' code runs concretely), with three adjustments:

- the packed-sequence probe of transformers' mask code reads tensor values (``.all()``);
  a training batch without packing has none, so it is answered "no packing" while tracing;
- expert containers (a module holding stacked 3-D expert weights, ``gate_up_proj`` /
  ``down_proj`` or ``w1``/``w2``/``w3``) loop over the experts a batch hits, which is data
  dependent: they become leaves priced under uniform top-k routing (as the catalog's
  ``GroupedExperts``);
- the linears of the module's tensor-parallel plan carry their role (``mark_tp_roles``), so tp is
  priced as ``codegen.runtime_hf`` applies it;
- the loss is cross-entropy on fp32 logits when the model returns token logits, else the mean
  of its first output (a stand-in objective whose cost is one reduction).

A failure names the module path and the construct (``cannot capture <model_type>: <module>:
<error>``).
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from autopar.core.model_spec import ModelSpec
from autopar.errors import InputError
from autopar.profiles.models.hf import build_hf_model, decoder, hf_config, model_class, tp_plan  # noqa: F401
from autopar.profiles.models.hf import no_packing_probe as _tracing_patches

_INPUT_DTYPES = {"int64": torch.int64, "float32": torch.float32, "bfloat16": torch.bfloat16,
                 "float16": torch.float16}


def is_expert_container(m: nn.Module) -> bool:
    """A module holding stacked expert weights (3-D parameters) whose forward takes the router's
    (hidden, index, weight): transformers' routed ``*Experts`` classes. Llama 4's experts take
    pre-scaled copies of every token for every expert (dense, no data-dependent loop): traced."""
    params = dict(m.named_parameters(recurse=False))
    if not (type(m).__name__.endswith("Experts") and params and all(p.dim() == 3 for p in params.values())):
        return False
    return len(inspect.signature(m.forward).parameters) >= 3


def expert_geometry(m: nn.Module, hidden: int) -> tuple[int, int]:
    """(experts, inner width) of an expert container from its down projection's shape."""
    params = dict(m.named_parameters(recurse=False))
    down = params.get("down_proj", params.get("w2"))
    if down is None:
        down = list(params.values())[-1]
    num_e = down.shape[0]
    inner = down.shape[2] if down.shape[1] == hidden else down.shape[1]
    return num_e, inner


class WithLoss(nn.Module):
    """The transformers module plus a training loss; ``model`` keeps the capture prefix."""

    def __init__(self, model: nn.Module, encoder_decoder: bool, input_name: str):
        super().__init__()
        self.model, self.encoder_decoder, self.input_name = model, encoder_decoder, input_name

    def forward(self, tokens, labels):
        kwargs = {self.input_name: tokens}
        if self.encoder_decoder:
            kwargs["decoder_input_ids"] = labels
        if self.input_name == "input_ids":
            kwargs["use_cache"] = False
        out = self.model(**kwargs)
        logits = out["logits"] if "logits" in out else out[0]
        if logits.dim() == 3 and logits.shape[:2] == labels.shape:
            return F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten())
        return logits.float().mean()


def example_inputs(spec: ModelSpec, model: nn.Module, seq_len: int, micro_batch: int) -> dict[str, Any]:
    """tokens [b, s] (labels alike) for a token model; ``input_shape`` for any other input
    (pixels [b, c, H, W] for a ViT), in the parameters' dtype when floating."""
    name = getattr(model, "main_input_name", "input_ids")
    if name == "input_ids" or spec.input_dtype == "int64":
        tokens = torch.zeros(micro_batch, seq_len, dtype=torch.int64, device="meta")
        return {"tokens": tokens, "labels": tokens.clone()}
    shape = list(spec.input_shape or [])
    if not shape:
        raise InputError(f"model: {spec.name} takes '{name}'; pass --input-shape (and --input-dtype)")
    shape[0] = micro_batch
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), _INPUT_DTYPES[spec.input_dtype])
    return {"tokens": torch.zeros(*shape, dtype=dtype, device="meta"),
            "labels": torch.zeros(micro_batch, 1, dtype=torch.int64, device="meta")}


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:200] if text else ""


def trace_hf(spec: ModelSpec, model: nn.Module, inputs: dict[str, Any], tracer_cls):
    """Trace ``WithLoss(model)`` with a subclass of ``tracer_cls`` (graph's tracer); a failure
    names the innermost module being run and the construct. Returns (tracer, graph, root)."""
    cfg = model.config
    if "tp" in spec.hf_parallel:
        mark_tp_roles(model)
    root = WithLoss(model, bool(getattr(cfg, "is_encoder_decoder", False)),
                    getattr(model, "main_input_name", "input_ids"))
    tracer = _hf_tracer(tracer_cls)(inputs)
    try:
        with _tracing_patches():
            graph = tracer.trace(root)
    except InputError:
        raise
    except Exception as exc:
        where = _failing_module(exc, root)
        raise InputError(f"model: cannot capture {cfg.model_type} ({type(model).__name__}) at {where}: "
                         f"{type(exc).__name__}: {_first_line(exc)}") from None
    return tracer, graph, root


def mark_tp_roles(model: nn.Module) -> None:
    """Tag the linears of the module's tensor-parallel plan (``autopar_tp_role``: colwise / rowwise,
    the vocab-parallel embedding and output head) so the captured graph prices tp as the emitted
    program applies it (``profiles.graph_ops.param_class`` and its sharding tags)."""
    plan, why = tp_plan(model)
    if why:
        return
    for path, style in plan.items():
        model.get_submodule(path).autopar_tp_role = style
    if getattr(decoder(model), "embed_tokens", None) is not None:
        decoder(model).embed_tokens.autopar_tp_role = "embedding"
    model.lm_head.autopar_tp_role = "output"


def _hf_tracer(base: type) -> type:
    class HFTracer(base):
        """Modules that are not submodules of the model (transformers keeps activation modules
        such as ``ACT2FN['gelu']`` as globals) are inlined: their ops join the caller's scope."""

        def call_module(self, m, forward, args, kwargs):
            known = self.__dict__.setdefault("_known", {id(x) for x in self.root.modules()})
            if id(m) not in known and not self._running:
                return forward(*args, **kwargs)
            return super().call_module(m, forward, args, kwargs)

    return HFTracer


def _failing_module(exc: Exception, root: nn.Module) -> str:
    """'module <path> (<Class>)' of the innermost model module whose code raised."""
    names = {id(m): n for n, m in root.named_modules()}
    found = "module '<top>'"
    tb = exc.__traceback__
    while tb is not None:
        me = tb.tb_frame.f_locals.get("self")
        if isinstance(me, nn.Module) and id(me) in names:
            path = names[id(me)]
            path = path[len("model."):] if path.startswith("model.") else path
            found = f"module '{path or '<top>'}' ({type(me).__name__}, line {tb.tb_lineno})"
        tb = tb.tb_next
    return found
