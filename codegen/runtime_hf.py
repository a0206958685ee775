"""Tensor/sequence parallel and pipeline stages for a transformers module (``HFLanguageModel``).

The transformers counterparts of ``runtime_parallel.apply_tp`` and ``runtime_pp.split_stages``:

- ``apply_hf_tp``: the module's own tensor-parallel plan (``base_model_tp_plan`` of its config,
  or the one derived from its linears' roles: ``profiles.models.hf.tp_plan``) applied with DTensor
  ``parallelize_module``: "colwise" linears ``ColwiseParallel``, "rowwise" ``RowwiseParallel``,
  the token embedding vocab-parallel and the head column-parallel with the logits gathered (the
  plain cross-entropy), routed experts replicated. Sequence parallel (Korthikanti et al. 2022)
  splits the residual stream along the sequence: the norms run ``SequenceParallel``, an all-gather
  precedes each attention / MLP and the row-parallel linear reduce-scatters. Attention reads its
  local head count from the projection widths (transformers views with ``-1`` heads); integer
  head-count attributes an attention module keeps are divided by tp, as transformers' own
  ``tp_plan="auto"`` does.
- ``split_hf_stages``: the decoder layer list split into pipeline stages; the embedding on the
  first stage, norm + lm_head on the last, the rotary module on every stage (each stage computes
  its position embeddings: transformers passes them down from the top model).

Imports torch only at load (transformers through the vendored model file).
"""

from __future__ import annotations

import copy

from torch import nn
from torch.distributed.tensor import DTensor, Replicate, Shard
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, SequenceParallel, parallelize_module

from autopar.codegen.runtime_mesh import ParallelMesh
from autopar.profiles.models.hf import decoder, is_experts, tp_plan

_HEAD_ATTRS = ("num_heads", "num_attention_heads", "num_key_value_heads", "num_kv_heads")


def apply_hf_tp(model: nn.Module, mesh: ParallelMesh, sequence_parallel: bool = False) -> nn.Module:
    """Tensor (+ sequence) parallel on one part of an ``HFLanguageModel`` over the ``tp`` mesh dim."""
    tp_mesh = mesh["tp"]
    if tp_mesh.size() == 1:
        return model
    plan, why = tp_plan(model.hf)
    if why:
        raise RuntimeError(f"tensor parallel: {why}")
    hf, sp = model.hf, sequence_parallel
    dec, base = decoder(hf), f"hf.{hf.base_model_prefix}"
    seq, rep = Shard(1), Replicate()
    styles = {}
    if dec.embed_tokens is not None:
        styles[f"{base}.embed_tokens"] = RowwiseParallel(input_layouts=rep, output_layouts=rep)
    if dec.norm is not None and sp:
        styles[f"{base}.norm"] = SequenceParallel(use_local_output=True)
    if hf.lm_head is not None:
        styles["hf.lm_head"] = ColwiseParallel(input_layouts=seq if sp else rep, output_layouts=rep,
                                               use_local_output=True)
    names = dict(model.named_modules())
    moe = [n for n, m in names.items() if any(is_experts(x) for x in m.children())]
    for path, style in plan.items():
        if f"hf.{path}" not in names:
            continue  # a layer another pipeline stage holds
        in_moe = any(f"hf.{path}".startswith(p + ".") for p in moe)  # the MoE block's output is replicated
        styles[f"hf.{path}"] = ColwiseParallel() if style == "colwise" else \
            RowwiseParallel(output_layouts=seq if sp and not in_moe else rep)
    parallelize_module(model, tp_mesh, styles)
    if dec.embed_tokens is not None and hf.lm_head is not None and hf.config.tie_word_embeddings:
        hf.lm_head.weight = dec.embed_tokens.weight  # both Shard(0) over the vocabulary: re-tie
    sharded = {id(names[k]) for k in styles if k in names}
    for name, layer in _layers(dec):
        _local_heads(layer, tp_mesh.size(), sharded)
        if sp:
            _sequence_parallel_layer(layer, tp_mesh, sharded, first=name == "0" and dec.embed_tokens is not None)
        else:
            _replicated_input_layer(layer, tp_mesh, sharded)
    if sp:
        model.seq_shards = tp_mesh.size()
    return model


def _layers(dec: nn.Module) -> list[tuple[str, nn.Module]]:
    return list(dec.layers.items() if isinstance(dec.layers, nn.ModuleDict) else dec.layers.named_children())


def _local_heads(layer: nn.Module, tp: int, sharded: set[int]) -> None:
    """Head counts of the modules whose projections are split (a replicated attention keeps all)."""
    for mod in layer.modules():
        if not any(id(child) in sharded for child in mod.children()):
            continue
        for attr in _HEAD_ATTRS:
            value = mod.__dict__.get(attr)
            if isinstance(value, int) and not isinstance(value, bool) and value % tp == 0:
                setattr(mod, attr, value // tp)


def _sequence_parallel_layer(layer: nn.Module, tp_mesh, sharded: set[int], first: bool) -> None:
    """Norms on ``Shard(1)``; the sub-modules holding linears (attention, MLP) gather the sequence
    first; a replicated one (routed experts, or no linear in the plan) splits its output again
    (the row-parallel linear's reduce-scatter does it elsewhere). The first layer takes the
    embedding's full sequence and keeps its share. A sub-module whose linears are all split takes
    the gathered sequence as a Replicate DTensor (torchtitan's plan): autograd sums the column-parallel
    linears' Partial input gradients and the gather's backward reduce-scatters once (a local tensor
    made each of them all-reduce its own); one with a replicated linear or experts takes a local tensor."""
    for sub in layer.children():
        if _is_norm(sub):
            parallelize_module(sub, tp_mesh, SequenceParallel(use_local_output=True))
        elif any(isinstance(m, nn.Linear) or is_experts(m) for m in sub.modules()):
            gather = _relayout_input(tp_mesh, Shard(1), Replicate(), local=not _split(sub, sharded))
            sub.register_forward_pre_hook(gather, with_kwargs=True)
            if any(is_experts(m) for m in sub.children()) or not any(id(m) in sharded for m in sub.modules()):
                sub.register_forward_hook(_relayout_output(tp_mesh, Replicate(), Shard(1)))
    if first:
        layer.register_forward_pre_hook(_relayout_input(tp_mesh, Replicate(), Shard(1)), with_kwargs=True)


def _replicated_input_layer(layer: nn.Module, tp_mesh, sharded: set[int]) -> None:
    """Without sequence parallel: a sub-module whose linears are all split takes its input as a Replicate
    DTensor, so its column-parallel linears' Partial input gradients are summed by autograd and all-reduced
    once (from_local's backward), not once per linear (q, k, v; gate, up)."""
    for sub in layer.children():
        if not _is_norm(sub) and _split(sub, sharded):
            sub.register_forward_pre_hook(_relayout_input(tp_mesh, Replicate(), Replicate(), local=False),
                                          with_kwargs=True)


def _split(sub: nn.Module, sharded: set[int]) -> bool:
    """Every linear of ``sub`` is split by the plan (and it has some, and no experts)."""
    linears = [m for m in sub.modules() if isinstance(m, nn.Linear)]
    return bool(linears) and all(id(m) in sharded for m in linears) and not any(is_experts(m) for m in sub.modules())


def _is_norm(m: nn.Module) -> bool:
    return isinstance(m, (nn.LayerNorm, nn.RMSNorm)) or type(m).__name__.endswith(("RMSNorm", "LayerNorm"))


def _relayout(x, tp_mesh, src, dst, local: bool = True):
    if not isinstance(x, DTensor):
        x = DTensor.from_local(x, tp_mesh, [src], run_check=False)
    x = x.redistribute(tp_mesh, [dst])
    return x.to_local() if local else x


def _relayout_input(tp_mesh, src, dst, local: bool = True):
    """The sub-module's hidden states (first positional argument, or ``hidden_states=``) from
    ``src`` to ``dst`` placement over tp, as a local tensor (``local``) or a DTensor."""
    def hook(module, args, kwargs):
        if args:
            return (_relayout(args[0], tp_mesh, src, dst, local), *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": _relayout(kwargs["hidden_states"], tp_mesh, src, dst, local)}
    return hook


def _relayout_output(tp_mesh, src, dst):
    def hook(module, args, out):
        if isinstance(out, tuple):
            return (_relayout(out[0], tp_mesh, src, dst), *out[1:])
        return _relayout(out, tp_mesh, src, dst)
    return hook


# ----- pipeline stages ----------------------------------------------------------------------
def split_hf_stages(model: nn.Module, mesh: ParallelMesh, stages: list[tuple[int, int]],
                    ranks: list[int] | None = None) -> tuple[list, list]:
    """This rank's stage copies of an ``HFLanguageModel`` and their virtual stage indices (the
    contract of ``runtime_pp.split_stages``): the decoder's layer list becomes a ``ModuleDict``
    keyed by global index (names and checkpoint keys stay the full model's), layers outside the
    stage deleted; ``embed_tokens`` off all but the first stage, ``norm`` and ``lm_head`` off all
    but the last. Tied embeddings across the two ends are refused at plan time."""
    pp, rank = mesh.size("pp"), mesh.rank("pp")
    ranks = ranks or [i % pp for i in range(len(stages))]
    mine = [i for i in range(len(stages)) if ranks[i] == rank]
    dec = decoder(model.hf)
    dec.layers = nn.ModuleDict({str(i): layer for i, layer in enumerate(dec.layers)})
    parts = []
    for n, i in enumerate(mine):
        part = model if n == len(mine) - 1 else copy.deepcopy(model)  # meta tensors: copies are free
        pdec = decoder(part.hf)
        start, end = stages[i]
        for name in list(pdec.layers.keys()):
            if not start <= int(name) < end:
                del pdec.layers[name]
        if i != 0:
            pdec.embed_tokens = None
        if i != len(stages) - 1:
            pdec.norm = part.hf.lm_head = None
        part.staged = True
        parts.append(part)
    return parts, mine
