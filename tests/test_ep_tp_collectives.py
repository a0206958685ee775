"""Expert parallel under tensor parallel: the tp collectives an MoE block of the emitted program runs are the ones its
price counts (``tp_collectives.block_tp_collectives`` with ``ep``). Every tp rank holds the block's tokens whole and
dispatches 1/tp of them (``runtime_moe.ExpertParallelGroupedExperts``: ``_SliceRows``), gathering the expert outputs
back (``_GatherRows``): one all-gather forward, two backward (the input rows' and the gate weights' gradients). The
price counted none of them (1 all-gather forward and 2 backward missing per MoE block). Under sp each rank dispatches
its own shard instead (``techniques.moe_program.moe_tokens_local``): no gather of the routed tokens, shared experts (and
Qwen2's gated one) a sequence-parallel sub-layer, the router's and shared gate's weight gradients summed over tp.

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
from test_tp_sp_collectives import _grads, _tokens  # the same seq and micro-batch (64, 2)

from autopar.codegen import runtime as rt
from autopar.codegen import runtime_moe
from autopar.cost_models.templates import build_templates
from autopar.cost_models.tp_collectives import block_tp_collectives

SEQ, MBS, TP = 64, 2, 2
KINDS = {"all_reduce": "all_reduce", "allreduce_": "all_reduce", "all_gather_into_tensor": "all_gather",
         "allgather_": "all_gather", "reduce_scatter_tensor": "reduce_scatter"}


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
        if name == "allreduce_":  # c10d in-place: the router gradient (runtime_moe.SumGradColumns)
            t = args[0]
            while isinstance(t, (list, tuple)):
                t = t[0]
            self.seen[(self.phase, "reduced")] += t.numel()
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


def _run(spec, layers: int, sp: bool, ep: int, monkeypatch, etp: int = 1) -> collections.Counter:
    spec = spec.model_copy(update={"layers": layers})
    monkeypatch.setattr(runtime_moe, "dist", _LocalExchange(runtime_moe.dist))
    monkeypatch.setattr(runtime_moe, "fc", _LocalExchange(runtime_moe.fc))
    # the etp group's gather / reduce-scatter of the received rows are priced as etp, not tp (layer_cost._layer_comm)
    monkeypatch.setattr(runtime_moe.ExpertParallelGroupedExperts, "_run_etp", lambda m, rows, eids: rows * 1)
    mesh = rt.build_mesh("cpu", tp=TP, ep=ep, etp=etp)
    model = rt.build_meta_model(spec)
    rt.apply_tp(model, mesh, sequence_parallel=sp)
    every = list(range(spec.num_experts))
    runtime_moe.apply_ep(model, mesh, [[every, []] if ep > 1 else [every]] * layers)
    rt.materialize([model], spec, 0, torch.device("cpu"))
    return _Counted().step(model, torch.randint(0, spec.vocab, (MBS, SEQ)))


def _measured(spec, sp: bool, ep: int, monkeypatch, etp: int = 1) -> dict:
    four, two = _run(spec, 4, sp, ep, monkeypatch, etp), _run(spec, 2, sp, ep, monkeypatch, etp)
    return {k: (four[k] - two[k]) / 2 for k in set(four) | set(two) if four[k] != two[k]}


def _priced(spec, sp: bool, ep: int, etp: int = 1) -> dict:
    block = [t for t in build_templates(spec.model_copy(update={"layers": 2}), SEQ, "fp32") if t.kind == "block"][-1]
    colls = block_tp_collectives(block, sp, ep, spec.topk, etp)
    out: collections.Counter = collections.Counter()
    for phase in ("forward", "backward"):
        for kind, width in getattr(colls, phase):
            out[(phase, kind)] += 1
            if kind == "all_gather":   # each rank contributes 1/tp of the gathered tensor
                out[(phase, "gathered")] += width * MBS * SEQ * spec.hidden / TP
    for elems in colls.weight_grads:   # the router gate's gradient (and a shared gate's), summed over tp
        out[("backward", "all_reduce")] += 1
        out[("backward", "reduced")] += elems
    return dict(out)


SPECS = {"shared": {}, "gated": {"shared_expert_gate": True}, "routed": {"shared_experts": 0}}


@pytest.mark.parametrize("variant", list(SPECS))
@pytest.mark.parametrize("sp", [True, False])
def test_ep_block_runs_the_priced_tp_collectives(variant, sp, monkeypatch):
    spec = tiny_spec("moe-tiny", SEQ, SPECS[variant])
    with helpers_collectives.fake_world(TP):
        measured = _measured(spec, sp, 2, monkeypatch)
        assert measured == pytest.approx(_priced(spec, sp, 2))
        alone = _measured(spec, sp, 1, monkeypatch)
    assert alone == pytest.approx(_priced(spec, sp, 1))
    extra = {k: measured.get(k, 0) - alone.get(k, 0) for k in set(measured) | set(alone)}
    if variant == "routed" and sp:  # each rank's shard dispatched: the replicated router's gathers are gone
        assert extra[("forward", "all_gather")] == -1 and extra[("backward", "all_gather")] == -1
        assert extra[("backward", "all_reduce")] == 1 and measured[("backward", "reduced")] == 8 * 64
    elif sp:  # the shard dispatched beside the shared experts' own gather: the router's (and gate's) gradient sums
        gates = 2 if variant == "gated" else 1
        assert extra.get(("forward", "all_gather"), 0) == 0 and extra.get(("backward", "all_gather"), 0) == 0
        assert measured[("backward", "all_reduce")] == gates
        assert measured[("backward", "reduced")] == (8 + gates - 1) * 64   # router E x h, gate 1 x h
        assert measured[("forward", "reduce_scatter")] == 2   # wo's and the shared w2's (gated: was an all-reduce)
    else:
        assert extra[("forward", "all_gather")] == 1 and extra[("backward", "all_gather")] == 2


@pytest.mark.parametrize("variant", list(SPECS))
@pytest.mark.parametrize("sp", [True, False])
def test_etp_block_runs_the_priced_tp_collectives(variant, sp, monkeypatch):
    """ep = 1, etp = 2 (the expert mesh folded over the tp ranks): the dispatch's tp split and gather, or under sp
    the shard dispatch, as with ep > 1."""
    spec = tiny_spec("moe-tiny", SEQ, SPECS[variant])
    with helpers_collectives.fake_world(TP):
        assert _measured(spec, sp, 1, monkeypatch, etp=2) == pytest.approx(_priced(spec, sp, 1, etp=2))


# ----- numerics on real gloo ranks: the shard-dispatching MoE equals one process ----------------------------
ROUTED = {"shared_experts": 0}
GLOO_CASES = [(2, 1, True), (1, 2, True), (2, 1, False), (1, 1, True)]   # (ep, etp, sp), tp = 2


def _gloo_worker(rank: int, init: str, result: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=TP)
    torch.set_num_threads(1)
    spec, found = tiny_spec("moe-tiny", SEQ, ROUTED), {}
    for ep, etp, sp in GLOO_CASES:
        mesh = rt.build_mesh("cpu", tp=TP, ep=ep, etp=etp)
        model = rt.build_meta_model(spec)
        rt.apply_tp(model, mesh, sequence_parallel=sp)
        runtime_moe.apply_ep(model, mesh, None)
        rt.materialize([model], spec, 0, torch.device("cpu"))
        ids = {n: m.local_expert_ids for n, m in model.named_modules() if hasattr(m, "local_expert_ids")}
        local = {n: m.tokens_local for n, m in model.named_modules() if hasattr(m, "tokens_local")}
        found[ep, etp, sp] = (*_grads(model, _tokens(spec)), ids, local)
    torch.save(found, f"{result}.{rank}")
    dist.destroy_process_group()


@pytest.mark.slow
def test_shard_dispatch_matches_one_process(tmp_path):
    """tp 2 on gloo ranks: with sp and ep*etp > 1 each rank routes and dispatches its own sequence shard (no
    gather, slice or split around the MoE), its router gate's gradient summed over tp; loss and every gradient
    (on both ranks: the router's included, so the replicas stay equal) equal the single process's. Without sp, or
    with the experts replicated (ep = etp = 1), the whole-sequence program as before."""
    import torch.multiprocessing as mp

    mp.spawn(_gloo_worker, args=(f"file://{tmp_path / 'store'}", str(tmp_path / "out.pt")), nprocs=TP)
    spec = tiny_spec("moe-tiny", SEQ, ROUTED)
    model = rt.build_meta_model(spec)
    rt.materialize([model], spec, 0, torch.device("cpu"))
    loss, grads = _grads(model, _tokens(spec))
    for rank in range(TP):
        found = torch.load(f"{tmp_path / 'out.pt'}.{rank}")
        for (ep, etp, sp), (got_loss, got, ids, local) in found.items():
            assert bool(local) == (sp and ep * etp > 1), (ep, etp, sp)
            assert got_loss == pytest.approx(loss, rel=1e-5), (ep, etp, sp)
            for key, g in grads.items():
                owner = key.rsplit(".", 1)[0]
                want = g[ids[owner]] if owner in ids else g   # expert weights: this rank's experts
                assert torch.allclose(got[key], want, rtol=1e-4, atol=1e-5), f"ep{ep} etp{etp} sp{sp} rank{rank} {key}"


def _batch(spec) -> torch.Tensor:
    return torch.randint(0, spec.vocab, (2 * MBS, SEQ), generator=torch.Generator().manual_seed(2))


# MoE layers of each kind (tests/test_moe_shared_local_tokens.py: the shared ones on tp 2 alone)
DP_MODELS = {"routed": ("moe-tiny", ROUTED), "qwen2-like": ("moe-tiny", {"shared_expert_gate": True}),
             "deepseek-like": ("deepseek-tiny", {})}


def _dp_worker(rank: int, init: str, result: str, variant: str) -> None:
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2 * TP)
    torch.set_num_threads(1)
    spec, found = tiny_spec(DP_MODELS[variant][0], SEQ, DP_MODELS[variant][1]), {}
    for zero in (0, 3):   # DDP (experts kept out, summed over edp by sync_grads); FSDP2 (experts over edp)
        mesh = rt.build_mesh("cpu", dp=2, tp=TP, ep=2)
        model = rt.build_meta_model(spec)
        rt.apply_tp(model, mesh, sequence_parallel=True)
        runtime_moe.apply_ep(model, mesh, None)
        rt.materialize([model], spec, 0, torch.device("cpu"))
        model = rt.apply_dp(model, mesh, zero_stage=zero, tp=TP, dtype="fp32")
        half = _batch(spec).chunk(2)[mesh.rank("dp")]
        rt.lm_loss(model(half), half).backward()
        rt.sync_grads([model], mesh)
        inner = getattr(model, "module", model)
        grads = {n: (p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad).detach().clone()
                 for n, p in inner.named_parameters()}
        found[zero] = grads, {n: m.local_expert_ids for n, m in inner.named_modules() if hasattr(m, "local_expert_ids")}
    torch.save(found, f"{result}.{rank}")
    dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.parametrize("variant", list(DP_MODELS))
def test_shard_dispatch_under_data_parallel_matches_one_process(variant, tmp_path):
    """dp 2 x tp 2 with sp, ep 2 (edp 2) on 4 gloo ranks, DDP and FSDP2: every gradient after ``sync_grads``
    (the router's, and Qwen2's shared gate's, summed over tp in backward, then averaged over dp like any replicated
    weight) equals one process's on the whole batch; routed experts alone, Qwen2-like gated shared experts and
    DeepSeek-like shared experts with MLA."""
    import torch.multiprocessing as mp

    mp.spawn(_dp_worker, args=(f"file://{tmp_path / 'store'}", str(tmp_path / "out.pt"), variant), nprocs=2 * TP)
    spec = tiny_spec(DP_MODELS[variant][0], SEQ, DP_MODELS[variant][1])
    model = rt.build_meta_model(spec)
    rt.materialize([model], spec, 0, torch.device("cpu"))
    _grads(model, _batch(spec))
    want = {n: p.grad for n, p in model.named_parameters()}
    for rank in range(2 * TP):
        for zero, (got, ids) in torch.load(f"{tmp_path / 'out.pt'}.{rank}").items():
            for key, g in want.items():
                owner = key.rsplit(".", 1)[0]
                w = g[ids[owner]] if owner in ids else g
                assert torch.allclose(got[key], w, rtol=1e-4, atol=1e-5), f"{variant} zero{zero} rank{rank} {key}"
