"""Expert parallel under tensor parallel: the tp collectives an MoE block of the emitted program runs are the ones its
price counts (``tp_collectives.block_tp_collectives`` with ``ep``). Every tp rank holds the block's tokens whole and
dispatches 1/tp of them (``runtime_moe.ExpertParallelGroupedExperts``: ``_SliceRows``), gathering the expert outputs
back (``_GatherRows``): one all-gather forward, two backward (the input rows' and the gate weights' gradients). The
price counted none of them (1 all-gather forward and 2 backward missing per MoE block).

Counted as tests/test_tp_sp_collectives.py counts (a fake process group of 2 ranks, the block as the difference of 4
and 2 layers), tp = ep = 2 (MoE Parallel Folding over the tp ranks). The fake group moves no data, so the token
exchange is replaced by what rank 0 sees when it holds every expert (its rows come back to it): the counts and sizes
of the all-gathers do not depend on the routing."""

from __future__ import annotations

import collections

import helpers_collectives
import pytest
import torch
from helpers_plans import tiny_spec

from autopar.codegen import runtime as rt
from autopar.codegen import runtime_moe
from autopar.cost_models.templates import build_templates
from autopar.cost_models.tp_collectives import block_tp_collectives

SEQ, MBS, TP = 64, 2, 2
KINDS = {"all_reduce": "all_reduce", "all_gather_into_tensor": "all_gather", "allgather_": "all_gather",
         "reduce_scatter_tensor": "reduce_scatter"}


class _Counted(helpers_collectives.Collectives):
    """(phase, kind) counts, and (phase, "gathered") the elements each all-gather's rank contributes."""

    def collective(self, name: str) -> str | None:
        return KINDS.get(name)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.__name__.split(".")[0]
        if KINDS.get(name) == "all_gather":
            t = args[1] if name == "allgather_" else args[0]
            while isinstance(t, (list, tuple)):
                t = t[0]
            self.seen[(self.phase, "gathered")] += t.numel()
        return super().__torch_dispatch__(func, types, args, kwargs)


class _LocalExchange:
    """``torch.distributed`` / its functional collectives as rank 0 of a dispatch that keeps every row."""

    def __init__(self, real):
        self.real = real

    def __getattr__(self, name):
        return getattr(self.real, name)

    @staticmethod
    def all_to_all_single(out, inp, *args, **kwargs):
        if isinstance(inp, torch.Tensor):   # dist.all_to_all_single(output, input, group=...): the counts
            out.copy_(inp)
            return None
        return out.clone()                  # fc.all_to_all_single(x, out_splits, in_splits, group): the rows


def _run(spec, layers: int, sp: bool, ep: int, monkeypatch) -> collections.Counter:
    spec = spec.model_copy(update={"layers": layers})
    monkeypatch.setattr(runtime_moe, "dist", _LocalExchange(runtime_moe.dist))
    monkeypatch.setattr(runtime_moe, "fc", _LocalExchange(runtime_moe.fc))
    mesh = rt.build_mesh("cpu", tp=TP, ep=ep)
    model = rt.build_meta_model(spec)
    rt.apply_tp(model, mesh, sequence_parallel=sp)
    runtime_moe.apply_ep(model, mesh, [[list(range(spec.num_experts)), []]] * layers)
    rt.materialize([model], spec, 0, torch.device("cpu"))
    return _Counted().step(model, torch.randint(0, spec.vocab, (MBS, SEQ)))


def _measured(spec, sp: bool, ep: int, monkeypatch) -> dict:
    four, two = _run(spec, 4, sp, ep, monkeypatch), _run(spec, 2, sp, ep, monkeypatch)
    return {k: (four[k] - two[k]) / 2 for k in set(four) | set(two) if four[k] != two[k]}


def _priced(spec, sp: bool, ep: int) -> dict:
    block = [t for t in build_templates(spec.model_copy(update={"layers": 2}), SEQ, "fp32") if t.kind == "block"][-1]
    colls = block_tp_collectives(block, sp, ep, spec.topk)
    out: collections.Counter = collections.Counter()
    for phase in ("forward", "backward"):
        for kind, width in getattr(colls, phase):
            out[(phase, kind)] += 1
            if kind == "all_gather":   # each rank contributes 1/tp of the gathered tensor
                out[(phase, "gathered")] += width * MBS * SEQ * spec.hidden / TP
    return dict(out)


SPECS = {"shared": {}, "routed": {"shared_experts": 0}}


@pytest.mark.parametrize("variant", list(SPECS))
@pytest.mark.parametrize("sp", [True, False])
def test_ep_block_runs_the_priced_tp_collectives(variant, sp, monkeypatch):
    spec = tiny_spec("moe-tiny", SEQ, SPECS[variant])
    with helpers_collectives.fake_world(TP):
        measured = _measured(spec, sp, 2, monkeypatch)
        assert measured == pytest.approx(_priced(spec, sp, 2))
        alone = _measured(spec, sp, 1, monkeypatch)
    assert alone == pytest.approx(_priced(spec, sp, 1))
    extra = {k: measured.get(k, 0) - alone.get(k, 0) for k in measured}
    assert extra[("forward", "all_gather")] == 1 and extra[("backward", "all_gather")] == 2
