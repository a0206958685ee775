"""The search's cheaper queue (issue 15, warm `plan` speed) returns the same plans: the offload optimizer floor,
the zero-bubble / offload recompute floors, the coarse row bound and the coarse group bound each stay under
what they stand for, and the bounded search still returns the exhaustive one's plans where offload and
zero-bubble schedules are in the space (tests/test_search_bounds.py fixes offload off in most cases)."""

from __future__ import annotations

import pytest
from test_partition import tiny_cost_model

from autopar.planner import bounds, groups
from autopar.planner import partition as part
from autopar.planner import search as S
from autopar.techniques import pipeline

EPS = 1 + 1e-9


def _plans(res: S.SearchResult) -> list[tuple]:
    return [(c.strategy.short(), c.stages, c.layer_recompute, c.estimate.step_time_s) for c in res.candidates]


# seed 12 (500 MiB, batch 16): the exhaustive reference missed pp=2 GPipe plans the bounded search found,
# because partition() with no upper bound gave up when the balanced layout did not fit (fixed: the DP
# then runs unbounded)
@pytest.mark.parametrize("seed,usable,gb", [(11, 350, 8), (12, 500, 16), (13, 260, 8), (14, 400, 16)])
def test_bounded_search_equals_exhaustive_with_offload_and_zero_bubble(seed, usable, gb):
    cm = tiny_cost_model(seed, layers=8, nodes=2, gpus_per_node=2, usable_mib=usable, kinds=1)
    bounded = S.search(cm, gb, S.Constraints(), top_k=4)
    every = S.search(cm, gb, S.Constraints(), top_k=4, exhaustive=True)
    assert bounded.candidates and _plans(bounded) == _plans(every)
    assert bounded.stats.priced < every.stats.priced


def _configs(cm, sp, gb):
    for row in S.shardings(cm, sp.cons, gb):
        for sh in row:
            knobs = S.knob_options(cm, sp.cons, sh, gb, sp.knob_cache)
            if knobs:
                yield sh, knobs


@pytest.mark.parametrize("seed", [0, 1])
def test_coarse_bounds_stay_under_the_bounds_and_prices_they_stand_for(seed):
    cm = tiny_cost_model(seed, layers=8, nodes=2, gpus_per_node=4, usable_mib=3000, kinds=1)
    gb = 16
    sp = bounds.Space(cm, S.Constraints(), gb)
    pushed = []
    sp.push = lambda lb, kind, *payload: pushed.append((lb, kind, payload))
    S._fill(sp)
    checked = offloaded = zb = 0
    for lb, _, (sh, knobs) in [x for x in pushed if x[1] == "coarse row"]:
        assert lb <= S._row_bound(sp, sh, knobs, *sp.memo["probe", sh]) * EPS, sh
        pr = sp.priced(sh)
        terms = S._schedule_bounds(sp, sh, knobs, pr, sh.mbs, pr.total - pr.total_no_cp)
        for k in knobs:
            cand = S._partitioned(sp, sh, k, part.INF)
            if cand is None:
                continue
            est = cm.estimate(cand.strategy, cand.stages, cand.layer_recompute)
            assert terms[k.schedule, k.vpp] <= cand.step_time_s * EPS, (sh, k)
            if k.offload:   # the floor counts the host copies of every micro-batch, as the estimate does
                assert S.step_optimizer_floor(sp, sh, k, pr) <= est.time["optimizer"] * EPS, (sh, k)
            checked, offloaded, zb = checked + 1, offloaded + k.offload, zb + (k.schedule in pipeline.ZERO_BUBBLE)
    assert checked > 50 and offloaded > 10 and zb > 5


@pytest.mark.parametrize("seed,usable", [(0, 400), (2, 260)])
def test_restricted_mode_floors_never_prune_a_configuration_that_fits(seed, usable):
    # zero-bubble (none/full) and offload (none/selective/full) configurations get the memory floor and
    # recompute offers of their own modes: a configuration the partition fits is still queued, under a
    # bound at most its price
    cm = tiny_cost_model(seed, layers=6, nodes=1, gpus_per_node=4, usable_mib=usable, kinds=1)
    gb = 8
    sp = bounds.Space(cm, S.Constraints(), gb)
    fits = restricted = 0
    for sh, knobs in _configs(cm, sp, gb):
        for k in knobs:
            pushed = []
            sp.push = lambda lb, kind, *payload: pushed.append(lb)   # noqa: B023
            S.expand_row(sp, sh, [k])
            cand = S._partitioned(sp, sh, k, part.INF)
            if cand is None:
                continue
            assert pushed and pushed[0] <= cand.step_time_s * EPS, (sh, k)
            fits += 1
            restricted += S.allowed_modes(sp.cons.modes, k.schedule, k.offload) != sp.cons.modes
    assert fits > 5 and restricted > 2


def test_pipeline_buffer_recompute_floor_stays_under_real_pipeline_prices():
    # llama3-8b on 8 GPUs, memory-tight at seq 8192: the recompute floor with each rank's in-flight count and
    # pipeline receive buffers (groups.recompute_floor) stays under the partition price of every pipelined
    # configuration it bounds, and is tighter than the fewest-in-flight floor somewhere
    from autopar.cost_models.session import Inputs, build_cost_model

    cm, _, _, _ = build_cost_model(Inputs(model="llama3-8b", nodes=1, seq_len=8192))
    cons = S.Constraints(fixed={"offload_optimizer": False, "micro_batch": 1, "cp": 1, "tp": 1})
    sp = bounds.Space(cm, cons, 32)
    checked = tighter = 0
    for sh, knobs in _configs(cm, sp, 32):
        if sh.pp == 1:
            continue
        for k in knobs:
            pushed = []
            sp.push = lambda lb, kind, *payload: pushed.append(lb)   # noqa: B023
            S.expand_row(sp, sh, [k])
            cand = S._partitioned(sp, sh, k, part.INF)
            if cand is None or not pushed:
                continue
            assert pushed[0] <= cand.step_time_s * EPS, (sh, k)
            pr, floor = sp.priced(sh), groups.floor_for(sp, sh, S.allowed_modes(sp.cons.modes, k.schedule, k.offload))
            in_flight = bounds.min_in_flight(sh.pp, 32 // (sh.dp * sh.mbs), k.schedule, k.vpp)
            warm = bounds.grads_freed(sp, sh, k.schedule, k.vpp)
            tighter += S.recompute_floor(sp, sh, k, floor, in_flight, warm, pr.rc) > \
                floor.recompute_time(cm, sh, k, in_flight, sp.usable, pr.rc, warm)
            checked += 1
    assert checked > 10 and tighter > 0
