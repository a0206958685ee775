"""Checkpoints of ZeRO-1's ``ShardedAdamW`` (runtime_zero1) in the plan-independent form.

``ShardedAdamW`` optimizes flat fp32 slices of each parameter (rank ``r`` of the reduction group
holds elements ``[start, start + size)`` of its local tensor), which ``get_state_dict`` cannot
map to parameter names. At a save the slices of every state (fp32 master, ``exp_avg``,
``exp_avg_sq``) are all-gathered over the group into tensors shaped like the local parameter
(DTensor-wrapped where the parameter is one) under the keys ``get_state_dict`` gives a plain
AdamW (``state.<fqn>.exp_avg``, ``param_groups.<fqn>.lr``, ...), so any plan loads them and a
ZeRO-1 program loads any plan's; at a load each rank takes its slices back. The gathered copy
costs one parameter-sized fp32 buffer per state kind during the save (host memory once staged).

Imports only torch (the run folder needs nothing else).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor

STATES = ("exp_avg", "exp_avg_sq")


def is_sharded_adamw(opt) -> bool:
    return hasattr(opt, "buckets") and hasattr(opt, "masters")


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


def _names(part: nn.Module, clean) -> dict[int, str]:
    return {id(p): clean(n) for n, p in part.named_parameters()}


def _slots(opt):
    """``(bucket, column of the slot in the bucket, slot, master)`` for every parameter."""
    for b, masters in zip(opt.buckets, opt.masters):
        col = 0
        for s, m in zip(b.slots, masters):
            yield b, col, s, m
            col += s.chunk


def _gather(opt, pick) -> dict[int, torch.Tensor]:
    """id(param) -> the full local tensor of ``pick(master)`` (fp32), gathered per bucket."""
    out = {}
    for b, masters in zip(opt.buckets, opt.masters):
        if not b.slots:
            continue
        mine = torch.zeros(b.width, dtype=torch.float32, device=masters[0].device if masters else None)
        col = 0
        for s, m in zip(b.slots, masters):
            value = pick(m)
            if value is not None:
                mine[col: col + s.size] = value
            col += s.chunk
        full = mine
        if b.n > 1:
            full = torch.empty(b.n * b.width, dtype=mine.dtype, device=mine.device)
            dist.all_gather_into_tensor(full, mine, group=b.group)
        rows, col = full.view(b.n, b.width), 0
        for s in b.slots:
            shape = _local(s.p).shape
            out[id(s.p)] = rows[:, col: col + s.chunk].reshape(-1)[: shape.numel()].view(shape)
            col += s.chunk
    return out


def _like(p: nn.Parameter, local: torch.Tensor) -> torch.Tensor:
    if isinstance(p, DTensor):
        return DTensor.from_local(local, p.device_mesh, p.placements, run_check=False)
    return local


def optim_state(part: nn.Module, opt, clean) -> dict:
    """The flattened ``get_state_dict`` form of a ``ShardedAdamW`` (collective over its groups)."""
    names = _names(part, clean)
    out = {}
    gathered = {k: _gather(opt, lambda m, k=k: opt.state.get(m, {}).get(k)) for k in STATES}
    for _, _, s, m in _slots(opt):
        fqn = names[id(s.p)]
        st = opt.state.get(m, {})
        out[f"state.{fqn}.step"] = torch.as_tensor(st.get("step", 0.0), dtype=torch.float32).clone()
        for k in STATES:
            out[f"state.{fqn}.{k}"] = _like(s.p, gathered[k][id(s.p)])
    out.update(_group_values(opt, names))
    return out


def _group_values(opt, names: dict) -> dict:
    """``param_groups.<fqn>.<key>`` for every parameter (lr, betas, weight_decay, initial_lr...)."""
    param_of = {id(m): s.p for _, _, s, m in _slots(opt)}
    out = {}
    for group in opt.param_groups:
        for m in group["params"]:
            fqn = names[id(param_of[id(m)])]
            out.update({f"param_groups.{fqn}.{k}": v for k, v in group.items() if k != "params"})
    return out


def master_weights(part: nn.Module, opt, clean) -> dict:
    """fp32 masters as full local tensors where the parameters train in a lower precision (the
    checkpoint keeps the fp32 weights, as FSDP2 and plain AdamW plans save them)."""
    if opt.param_dtype == torch.float32:
        return {}
    names = _names(part, clean)
    full = _gather(opt, lambda m: m)
    return {names[id(s.p)]: _like(s.p, full[id(s.p)]) for _, _, s, _ in _slots(opt)}


@torch.no_grad()
def load_optim_state(part: nn.Module, opt, loaded: dict, model_sd: dict, clean) -> None:
    """This rank's slices back into the masters and Adam states, the group values into the groups.
    ``model_sd``: the loaded model weights (fp32 where ``master_weights`` gave them)."""
    names = _names(part, clean)
    for _, _, s, m in _slots(opt):
        fqn = names[id(s.p)]
        flat = _local(model_sd[fqn]).reshape(-1)[s.start: s.start + s.size]
        m.copy_(flat.float())
        if s.size == 0:
            continue
        opt.state[m] = {"step": loaded[f"state.{fqn}.step"].clone()}
        for k in STATES:
            opt.state[m][k] = _local(loaded[f"state.{fqn}.{k}"]).reshape(-1)[s.start: s.start + s.size].float().clone()
    param_of = {id(m): s.p for _, _, s, m in _slots(opt)}
    for group in opt.param_groups:
        if group["params"]:
            fqn = names[id(param_of[id(group["params"][0])])]
            for k in group:
                if k != "params" and f"param_groups.{fqn}.{k}" in loaded:
                    group[k] = loaded[f"param_groups.{fqn}.{k}"]


def placeholders(part: nn.Module, opt, clean) -> tuple[dict, dict]:
    """(model overrides, optimizer dict) of fresh tensors for DCP to load into: fp32 local-shaped
    weights where the masters are fp32 copies, and every Adam state."""
    names = _names(part, clean)
    weights = {}
    if opt.param_dtype != torch.float32:
        weights = {names[id(s.p)]: _like(s.p, torch.zeros(_local(s.p).shape, dtype=torch.float32,
                                                          device=_local(s.p).device)) for _, _, s, _ in _slots(opt)}
    optim = {}
    for _, _, s, _ in _slots(opt):
        fqn = names[id(s.p)]
        optim[f"state.{fqn}.step"] = torch.zeros((), dtype=torch.float32)
        for k in STATES:
            optim[f"state.{fqn}.{k}"] = _like(s.p, torch.zeros(_local(s.p).shape, dtype=torch.float32,
                                                               device=_local(s.p).device))
    optim.update(_group_values(opt, names))
    return weights, optim
