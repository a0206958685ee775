"""The search's caches give what the uncached computations give (issue 15: a faster warm plan, the same answers)."""

from __future__ import annotations

import pytest

from autopar.cost_models import host_bound
from autopar.cost_models.recompute_cost import _rerun_ops, early_stop_tail, rerun_ops, rerun_tail
from autopar.cost_models.session import Inputs, build_cost_model
from autopar.planner import bounds, probes
from autopar.planner.space import Knobs, Sharding, strategy_with


@pytest.fixture(scope="module")
def cm():
    return build_cost_model(Inputs(model="llama-tiny", gpu="h100-sxm", nodes=2))[0]


@pytest.mark.parametrize("k", [None, Knobs(2, True, "interleaved", 2)])
def test_a_probe_is_the_defaults_with_its_fields_and_is_built_once(k):
    sh = Sharding(2, 2, 4, 2, 1, 1, True, 2)
    fields = dict(dp=2, tp=2, pp=4, cp=2, ep=1, etp=1, micro_batch=2, global_batch=64, sequence_parallel=True)
    if k is not None:
        fields.update(zero_stage=2, offload_optimizer=True, schedule="interleaved", vpp=2)
    built, slow = bounds.probe(sh, 64, k), probes._default_probe().model_copy(update=fields)
    assert built.__dict__ == slow.__dict__ and list(built.__dict__) == list(slow.__dict__)
    assert built.model_fields_set == slow.model_fields_set and built.__pydantic_extra__ is None
    assert bounds.probe(sh, 64, k) is built   # shared: read-only
    named = bounds.probe(sh, 64, k, schedule="1f1b")   # extra fields: a fresh one
    assert named is not built and named.__dict__ == strategy_with(built, {"schedule": "1f1b"}).__dict__


def test_floor_offers_are_recomputed_for_another_pricing():
    saves = ((4, {"op": 10.0, "full": 30.0}),)
    floor = bounds.Floor(1.0, 0.0, 1.0, 40.0, 0.0, saves)
    rc, other = [{"none": 0.0, "op": 1.0, "full": 6.0}], [{"none": 0.0, "op": 4.0, "full": 4.5}]
    assert floor.offers(rc, 1.0) == [(0.1, 120.0)] and floor.offers(rc, 1.0) is floor.offers(rc, 1.0)
    # another scale alone, another rc alone, then both (op: 1 x 2 / 10 bytes; full: 4.5 x scale / 30 bytes; the most
    # bytes any mode saves), each after the others are in the memo
    assert floor.offers(rc, 2.0) == [pytest.approx((0.2, 120.0))]
    assert floor.offers(other, 1.0) == [pytest.approx((0.15, 120.0))]
    assert floor.offers(other, 2.0) == [pytest.approx((0.3, 120.0))]


def test_rerun_memos_match_the_rules(cm):
    block = cm.blocks[0]
    for runtime in ("torch", "torchtitan"):
        for mode in ("none", "selective", "op", "full"):
            assert rerun_ops(block, block.ops, mode, runtime) == _rerun_ops(block, block.ops, mode, runtime)
        assert rerun_tail(block, block.ops, runtime) == (early_stop_tail(block, block.ops) if runtime == "torch"
                                                         else [])


@pytest.fixture(scope="module")
def moe():
    return build_cost_model(Inputs(model="moe-tiny", gpu="h100-sxm", nodes=2))[0]


@pytest.mark.parametrize("grouped", [False, True])
def test_layer_calls_memo_reads_ep(moe, grouped):
    """An MoE block's expert loop runs ``experts / ep`` calls (one grouped GEMM where the stack groups them): the
    memo, asked for ep 1 then 2, gives each its own uncached count."""
    block = next(t for t in moe.templates if t.is_moe)
    got = []
    for ep in (1, 2):
        s = bounds.probe(Sharding(1, 1, 1, 2, ep, 1, False, 1), 8)
        calls = [host_bound.op_calls(o, s, grouped) for o in block.ops]
        for mode in ("none", "full"):
            want = (sum(calls), sum(calls[i] for i in rerun_ops(block, block.ops, mode, "torch")))
            assert host_bound.layer_calls(block, s, mode, grouped) == want
        got.append(host_bound.layer_calls(block, s, "none", grouped))
    assert (got[0] == got[1]) == grouped   # looped experts: ep halves their calls; grouped: one call either way


def test_floor_memo_shared_by_the_search_gives_each_sharding_its_own(moe):
    """``Floor.memo`` is one dict for every floor of a search, keyed by the parameters (not tp / ep): shardings that
    share them (ep 2 x etp 1 and ep 1 x etp 2) and one that does not share dp get what a fresh memo gives."""
    shs = [Sharding(1, 1, 2, 4, 2, 1, False, 1), Sharding(1, 1, 2, 4, 1, 2, False, 1),
           Sharding(1, 1, 2, 8, 2, 1, False, 1)]
    shared, modes = {}, ("none", "full")
    floors = [bounds.floor_terms(moe, sh, modes, memo=shared) for sh in shs]
    assert (floors[0].dense, floors[0].expert) == (floors[1].dense, floors[1].expert) and floors[1].expert > 0
    for sh, f in zip(shs * 2, floors * 2):   # twice: the second round reads the memo
        fresh = bounds.floor_terms(moe, sh, modes)
        assert fresh.memo is not shared
        for zero in (0, 1, 2, 3):
            for offload in (False, True):
                assert f.states(moe, sh, zero, offload) == fresh.states(moe, sh, zero, offload)
                for warm in (False, True):
                    assert f.resident(moe, sh, zero, offload, warm) == fresh.resident(moe, sh, zero, offload, warm)
        assert f.host_bytes(moe, sh) == fresh.host_bytes(moe, sh)
    assert floors[0].states(moe, shs[0], 3, False) != floors[2].states(moe, shs[2], 3, False)   # dp is read


def test_deferred_grads_memo_gives_each_configuration_its_own(cm):
    """``groups.with_deferred_grads`` in one search's memo, in either order, gives what a fresh search gives, for
    floors and knobs that differ in what the held gradients read (dp, ZeRO stage, offload)."""
    from autopar.cost_models.fsdp import plan_holds_stage_grads
    from autopar.planner import groups
    from autopar.planner.search import Constraints

    shs = [Sharding(1, 1, 2, 2, 1, 1, False, 1), Sharding(1, 1, 2, 4, 1, 1, False, 1)]
    ks = [Knobs(2, False, "zbv", 2), Knobs(2, True, "zbv", 2), Knobs(1, True, "zbv", 2)]
    cases = [(sh, k) for sh in shs for k in ks]
    assert all(plan_holds_stage_grads(cm, bounds.probe(sh, 64, k)) for sh, k in cases)   # the rule applies

    def held(order):
        sp = bounds.Space(cm, Constraints(), 64)
        return {(sh, k): groups.with_deferred_grads(sp, sh, k, sp.floor(sh)) for sh, k in order}

    alone = {c: held([c])[c] for c in cases}
    assert held(cases) == alone and held(cases[::-1]) == alone
    assert len({f.temps for f in alone.values()}) > 1


def test_rank_rows_edge_cache_gives_each_rank_its_own(cm):
    """``rank_floor._rank_rows`` works out the states of each rank's edge layers once per (edge parameters,
    gradients counted): each row is what the uncached states give (pp 4: the first and last ranks hold the
    embedding / output, the middle ones none)."""
    from autopar.planner import rank_floor as rf
    from autopar.planner.search import Constraints

    sp = bounds.Space(cm, Constraints(), 64)
    sh, modes = Sharding(1, 1, 4, 2, 1, 1, False, 1), ("none", "full")
    for k in (Knobs(1, False, "1f1b", 1), Knobs(2, False, "interleaved", 1)):
        blk = rf._least_layer(sp, sh, modes)
        s, io = rf._rank_io(sp, sh, k.schedule, k.vpp)
        holds = rf._holds_grads(sp, sh, k)
        give = rf._deferred_block(sp, sh) if holds else 0.0
        want = [(e, f, sp.usable * (1 + rf.MARGIN) - fixed + (give if grads else 0.0)
                 - rf._states(cm, s, edge, 0.0, k, grads, grads and holds),
                 rf._states(cm, s, blk[2], blk[3], k, grads, grads and holds)) for e, f, fixed, edge, grads in io]
        assert rf._rank_rows(sp, sh, k, blk) == want
        assert len({row[3] for row in io}) > 1   # edge ranks and middle ranks differ


def test_grad_sync_floor_memo_reads_the_schedule():
    """ZeRO-1 syncs after the last backward (exposed) under zero-bubble schedules only
    (``fsdp.syncs_after_backward``): the floor asked for either schedule, in either order, is the uncached one."""
    from autopar.planner.search import Constraints

    big = build_cost_model(Inputs(model="llama3-8b", nodes=1, seq_len=2048, dtype="bf16"))[0]
    sh = Sharding(tp=1, cp=1, pp=2, dp=4, ep=1, etp=1, sp=False, mbs=1)
    zbv, inter = Knobs(zero=1, offload=False, schedule="zbv", vpp=2), Knobs(1, False, "interleaved", 2)

    def floors(*ks):
        sp = bounds.Space(big, Constraints(), 64)
        pr = sp.priced(sh)
        return [bounds.grad_sync_floor(sp, sh, k, pr) for k in ks]

    alone = floors(zbv)[0], floors(inter)[0]
    assert alone[0] != alone[1]   # the rule tells them apart
    assert floors(zbv, inter) == list(alone) and floors(inter, zbv) == list(alone[::-1])
