"""Ranking of the printed plans: only feasible ones, in the order of the step time shown, and
within 1% the simpler plan first (planner/rank.py)."""

from __future__ import annotations

import json

import pytest

from autopar.core.strategy import Strategy
from autopar.cost_models.session import Inputs, build_cost_model
from autopar.planner import rank
from autopar.planner import search as S


class _E:
    def __init__(self, t: float):
        self.step_time_s, self.feasible = t, True


def _cand(text: str, t: float) -> S.Candidate:
    s = Strategy.parse(text).resolve(8, 8)
    return S.Candidate(s, [], [], t, _E(t))


def test_simpler_first_within_one_percent():
    z3 = _cand("dp=8,zero=3", 1.000)
    ddp = _cand("dp=8", 1.004)
    tp = _cand("dp=4,tp=2", 1.002)
    slow = _cand("dp=8,zero=1", 1.05)
    got = [c.strategy.short() for c in rank.order([slow, z3, tp, ddp])]
    assert got == [ddp.strategy.short(), z3.strategy.short(), tp.strategy.short(), slow.strategy.short()]


def test_outside_the_tie_the_faster_wins():
    z3, ddp = _cand("dp=8,zero=3", 1.00), _cand("dp=8", 1.02)
    assert rank.order([ddp, z3])[0] is z3


def test_the_fastest_plan_is_always_listed():
    # every plan within 1% of the fastest (a step time that is mostly a constant): the tie rule lists
    # the simpler ones first, and the fastest (the most dimensions) must not fall past top_k
    fast = _cand("dp=2,tp=2,pp=2", 1.000)
    simpler = [_cand("dp=8", 1.004), _cand("dp=8,zero=1", 1.003), _cand("dp=4,tp=2", 1.002),
               _cand("dp=4,pp=2", 1.001)]
    got = rank.listed([fast, *simpler], 3)
    assert [c.strategy.short() for c in got] == [simpler[0].strategy.short(), simpler[1].strategy.short(),
                                                 fast.strategy.short()]
    assert rank.listed([fast, *simpler], 5) == rank.order([fast, *simpler])


def test_the_cut_reads_the_kth_estimate_not_the_order_found():
    # feasible_ranked walks the found plans by the search's price (at most the estimate); plans past the
    # top_k-th *estimate* plus the tie band cannot be listed, so it stops there: the list equals the one of
    # every plan (as an exhaustive search finds them), whichever slower plans a search also partitioned.
    # Mixtral-8x7b on 8 nodes: the 5th fastest (cp2, z2) is within 1% of a simpler zbv z1 plan, whose
    # price came after the 5th plan kept in price order (the old cut: 3.4743 > 3.4373 x 1.01)
    c = [_cand("dp=8,pp=1", 3.376), _cand("dp=4,pp=1,cp=2", 3.389), _cand("dp=4,pp=2", 3.432),
         _cand("dp=2,pp=2,cp=2,zero=2", 3.445), _cand("dp=4,pp=2,zero=1", 3.437), _cand("dp=2,pp=2,cp=2", 3.451),
         _cand("dp=8,zero=1", 3.4743), _cand("dp=2,pp=2,cp=2,zero=1", 3.488)]
    prices = [3.376, 3.389, 3.4218, 3.4345, 3.4373, 3.4508, 3.4743, 3.4878]   # each at most its estimate
    for x, p in zip(c, prices):
        x.step_time_s = p
    got, dropped = rank.feasible_ranked(None, c, 5)
    assert dropped == 0 and [x.strategy.short() for x in got] == [x.strategy.short() for x in rank.listed(c, 5)]
    assert any(x is c[6] for x in got)


def test_simplicity_order():
    keys = [rank.simplicity(Strategy.parse(t).resolve(8, 8)) for t in
            ("dp=8", "dp=8,zero=1", "dp=8,zero=3", "dp=8,zero=3,offload=1", "dp=4,tp=2", "dp=2,tp=2,pp=2")]
    assert keys == sorted(keys)


@pytest.fixture(scope="module")
def gpt2_result():
    cm = build_cost_model(Inputs(model="gpt2-124m", gpu="h100-sxm", nodes=1, gpus_per_node=8, seq_len=1024))[0]
    return cm, S.search(cm, 512, top_k=5)


def test_gpt2_on_8_gpus_ranks_plain_data_parallel_first(gpt2_result):
    # a 124M model on one node: plain data parallelism, at the simplest ZeRO stage within the tie rule's 1% of the
    # fastest (DDP itself until FSDP2's copies were priced, 02de733: replicate's casts and the unsharded optimizer
    # step now leave it 1.1% behind ZeRO-1)
    _, res = gpt2_result
    best = res.candidates[0].strategy
    assert (best.dp, best.tp, best.pp, best.offload_optimizer) == (8, 1, 1, False), best.short()
    fastest = min(c.estimate.step_time_s for c in res.candidates)
    tied = [c.strategy for c in res.candidates if c.estimate.step_time_s <= fastest * (1 + rank.TIE)]
    assert rank.simplicity(best) == min(map(rank.simplicity, tied)), [s.short() for s in tied]


def test_printed_order_is_step_time_order_up_to_the_tie(gpt2_result):
    _, res = gpt2_result
    times = [c.estimate.step_time_s for c in res.candidates]
    assert all(c.estimate.feasible for c in res.candidates)
    for a, b in zip(times, times[1:]):
        assert b >= a / (1 + rank.TIE) - 1e-12


def test_moe_tiny_order_and_feasibility(run_cli):
    code, out, err = run_cli("plan", "moe-tiny", "--json", "--top", "6")
    assert code == 0, err
    cands = json.loads(out)["candidates"]
    times = [c["step_time_s"] for c in cands]
    assert all(c["feasible"] for c in cands)
    assert times == sorted(times) or all(b >= a / (1 + rank.TIE) for a, b in zip(times, times[1:]))


def test_plan_help_states_the_tie_rule(run_cli):
    code, out, _ = run_cli("plan", "--help")
    assert code == 0 and "within 1%" in " ".join(out.split())
