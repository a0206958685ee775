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
    rc, other = [{"none": 0.0, "op": 1.0, "full": 6.0}], [{"none": 0.0, "op": 4.0, "full": 3.0}]
    assert floor.offers(rc, 1.0) == [(0.1, 120.0)] and floor.offers(rc, 1.0) is floor.offers(rc, 1.0)
    assert floor.offers(other, 2.0) == [(0.2, 120.0)]   # full: 3 x 2 / 30 bytes; the most bytes any mode saves


def test_rerun_memos_match_the_rules(cm):
    block = cm.blocks[0]
    for runtime in ("torch", "torchtitan"):
        for mode in ("none", "selective", "op", "full"):
            assert rerun_ops(block, block.ops, mode, runtime) == _rerun_ops(block, block.ops, mode, runtime)
        assert rerun_tail(block, block.ops, runtime) == (early_stop_tail(block, block.ops) if runtime == "torch"
                                                         else [])


def test_layer_calls_memo_reads_ep(cm):
    block = cm.blocks[0]
    for ep in (1, 2):
        s = bounds.probe(Sharding(1, 1, 1, 2, ep, 1, False, 1), 8)
        calls = [host_bound.op_calls(o, s) for o in block.ops]
        for mode in ("none", "full"):
            want = (sum(calls), sum(calls[i] for i in rerun_ops(block, block.ops, mode, "torch")))
            assert host_bound.layer_calls(block, s, mode) == want


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
