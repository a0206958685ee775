"""The search's time bounds (planner/bounds.py) prune without changing the answer: the bounded
search returns the plans of ``search(..., exhaustive=True)``, which partitions every configuration
above the memory floor; and each bound stays under the price it bounds."""

from __future__ import annotations

import pytest
from test_partition import tiny_cost_model
from test_search_floors import filled

from autopar.core.strategy import Strategy
from autopar.cost_models.session import Inputs, build_cost_model
from autopar.planner import bounds
from autopar.planner import partition as part
from autopar.planner import recompute as rc
from autopar.planner import search as S
from autopar.planner.rank_floor import slowest_rank_floor
from autopar.techniques import pipeline

CASES = [  # (seed, layers, nodes, gpus per node, moe, usable MiB, global batch, fixed knobs)
    (1, 4, 1, 4, False, 450, 8, {}),
    (2, 6, 2, 2, False, 300, 8, {"offload_optimizer": False}),
    (3, 4, 1, 4, True, 700, 8, {"offload_optimizer": False}),
    (5, 6, 1, 4, False, 2000, 16, {"zero_stage": 1}),   # roomy: every schedule fits, bounds decide
    (7, 8, 2, 4, False, 900, 16, {"offload_optimizer": False, "sequence_parallel": False}),
]


def _plans(res: S.SearchResult) -> list[tuple]:
    return [(c.strategy.short(), c.stages, c.layer_recompute, c.estimate.step_time_s) for c in res.candidates]


@pytest.mark.parametrize("seed,layers,nodes,gpn,moe,usable,gb,fixed", CASES)
def test_bounded_search_returns_the_exhaustive_plans(seed, layers, nodes, gpn, moe, usable, gb, fixed):
    cm = tiny_cost_model(seed, layers=layers, nodes=nodes, gpus_per_node=gpn, moe=moe, usable_mib=usable)
    cons = S.Constraints(fixed=dict(fixed))
    bounded = S.search(cm, gb, cons, top_k=3)
    every = S.search(cm, gb, S.Constraints(fixed=dict(fixed)), top_k=3, exhaustive=True)
    assert bounded.candidates, bounded.stats
    assert _plans(bounded) == _plans(every)
    assert bounded.stats.priced <= every.stats.priced


def test_llama3_8b_bounded_equals_exhaustive_on_a_narrowed_space():
    # a real model, all schedules incl. zero bubble, pp up to 4 on 8 GPUs: ~hundreds of configurations
    cm, _, _, seq = build_cost_model(Inputs(model="llama3-8b", nodes=1, seq_len=2048))
    cons = dict(fixed={"zero_stage": 1, "offload_optimizer": False, "micro_batch": 1}, max_cp=2)
    bounded = S.search(cm, 64, S.Constraints(**cons))
    every = S.search(cm, 64, S.Constraints(**cons), exhaustive=True)
    assert _plans(bounded) == _plans(every)
    assert bounded.stats.priced < every.stats.priced   # the bounds did prune


@pytest.mark.parametrize("seed", range(2))
def test_each_configuration_bound_stays_under_its_partition_price(seed):
    cm = tiny_cost_model(seed, layers=8, nodes=2, gpus_per_node=4, usable_mib=3000)
    gb = 16
    sp = bounds.Space(cm, S.Constraints(), gb)
    checked = 0
    for row in S.shardings(cm, sp.cons, gb):
        for sh in row:
            for k in S.knob_options(cm, sp.cons, sh, gb):
                pushed = []
                sp.push = lambda lb, kind, *payload: pushed.append((lb, payload))   # noqa: B023
                S.expand_row(sp, sh, [k])
                if not pushed:
                    continue
                lb = pushed[0][0] + (bounds.zero3_floor(sp, sh) if k.zero == 3 else 0.0)
                cand = S._partitioned(sp, sh, k, part.INF)
                if cand is None:
                    continue
                s = Strategy(**bounds.probe(sh, gb, k).model_dump()).resolve(cm.cluster.world)
                assert lb <= cand.step_time_s * (1 + 1e-9), (s.short(), lb, cand.step_time_s)
                if k.zero < 3:   # the partition prices ZeRO-3's exposed edges per layer, the estimate per rank
                    est = cm.estimate(cand.strategy, cand.stages, cand.layer_recompute).step_time_s
                    assert lb <= est * (1 + 1e-9), (s.short(), lb, est)
                checked += 1
    assert checked > 20


@pytest.mark.parametrize("seed", range(2))
def test_each_row_bound_stays_under_its_configurations_prices(seed):
    # _fill's bound of a row (no pricing at its micro-batch: the largest one scaled down, plus the
    # context-parallel ring floor) and the bound it is re-queued under once priced stay under the
    # partition price of every configuration of the row; kinds=1 and 8 GPUs let cp reach 8
    cm = tiny_cost_model(seed, layers=8, nodes=2, gpus_per_node=4, usable_mib=3000, kinds=1)
    gb = 16
    sp = bounds.Space(cm, S.Constraints(), gb)
    rows = []
    sp.push = lambda lb, kind, *payload: rows.append((lb, payload))
    S._fill(sp)
    checked = cps = 0
    for lb, (sh, knobs) in rows:
        pr = sp.priced(sh)
        priced_lb = S._row_bound(sp, sh, knobs, pr, sh.mbs, pr.total - pr.total_no_cp)
        for k in knobs:
            cand = S._partitioned(sp, sh, k, part.INF)
            if cand is not None:
                assert max(lb, priced_lb) <= cand.step_time_s * (1 + 1e-9), (sh, k, lb, priced_lb, cand.step_time_s)
                checked, cps = checked + 1, cps + (sh.cp > 1)
    assert checked > 50 and cps > 10


def test_cannot_fit_is_true_exactly_where_choose_finds_nothing():
    cm = tiny_cost_model(3, layers=8, kinds=2)
    s = Strategy.parse("dp=4,tp=1,pp=1,mbs=2,gbs=8").resolve(cm.cluster.world)
    costs = cm.layer_costs(s)
    groups = [(costs[0], 3), (costs[7], 5)]
    need = sum(c.act_bytes["none"] * n for c, n in groups)
    for modes in (part.RECOMPUTE_MODES, ("selective", "full"), ("full",)):
        for frac in (0.05, 0.2, 0.4, 0.6, 0.8, 1.0, 1.2):
            for in_flight in (1.0, 3.0):
                budget, work = frac * need * in_flight, (lambda w: 0.5 * w)
                found = rc.choose(groups, in_flight, budget, modes, {}, work)
                assert part.cannot_fit(groups, modes, in_flight, budget, work) == (found is None), (modes, frac)


@pytest.mark.parametrize("spec,usable", [("dp=1,tp=1,pp=4,mbs=2,gbs=8", 200), ("dp=2,tp=1,pp=2,mbs=2,gbs=8", 300),
                                         ("dp=2,tp=1,pp=2,vpp=2,schedule=interleaved,mbs=1,gbs=8", 200)])
def test_can_hold_refuses_only_what_the_partition_cannot_fit(spec, usable):
    # memory-tight one-kind models (some seeds fit, some do not): can_hold must never refuse a
    # strategy the DP fits, and the partition answers the same with and without asking it
    refused = 0
    for seed in range(4):
        cm = tiny_cost_model(seed, layers=8, usable_mib=usable, kinds=1)
        s = Strategy.parse(spec).resolve(cm.cluster.world)
        fits = part.partition(cm, s, tight=False) is not None
        held = part.can_hold(part.RankPricer(cm, s))
        assert held or not fits, (seed, spec)
        assert (part.partition(cm, s) is not None) == fits
        refused += not held
    assert 0 < refused < 4   # the memory above makes it decide both ways


@pytest.mark.parametrize("seed,usable,gb", [(0, 400, 4), (1, 300, 8), (2, 250, 4)])
def test_the_memory_floor_never_prunes_a_configuration_that_fits(seed, usable, gb):
    # small global batches give one micro-batch per step, where the program frees the gradients
    # before the activation peak (memory.grads_freed_before_activation_peak): the floor must allow it
    cm = tiny_cost_model(seed, layers=6, nodes=1, gpus_per_node=4, usable_mib=usable)
    sp = bounds.Space(cm, S.Constraints(), gb)
    fits = warm = 0
    for row in S.shardings(cm, sp.cons, gb):
        for sh in row:
            for k in S.knob_options(cm, sp.cons, sh, gb):
                pushed = []
                sp.push = lambda lb, kind, *payload: pushed.append(lb)   # noqa: B023
                S.expand_row(sp, sh, [k])
                cand = S._partitioned(sp, sh, k, part.INF)
                if cand is not None:
                    assert pushed, (sh, k)
                    fits += 1
                    warm += bounds.grads_freed(sp, sh, k.schedule, k.vpp)
    assert fits > 5 and warm > 0


@pytest.mark.parametrize("seed,kinds", [(0, 2), (1, 1)])
def test_caches_shared_across_strategies_change_no_partition(seed, kinds):
    # the search hands every partition one ``shared`` dict (layer layouts, counts, base times,
    # zero-bubble sums, recompute frontiers and fit sums by pricing) and the bounds memoize by value:
    # each strategy's partition is the one a fresh cache gives, and the fit check with its cached
    # sums says what the uncached one says
    cm = tiny_cost_model(seed, layers=8, nodes=1, gpus_per_node=4, usable_mib=500, kinds=kinds)
    gb, shared, checked, fitted = 8, {}, 0, 0
    sp = bounds.Space(cm, S.Constraints(), gb)
    for row in S.shardings(cm, sp.cons, gb):
        for sh in row:
            for k in S.knob_options(cm, sp.cons, sh, gb):
                if k.schedule in pipeline.V_SHAPED:   # not partitioned: the search takes the even split
                    continue
                s = Strategy(**bounds.probe(sh, gb, k).model_dump()).resolve(cm.cluster.world)
                costs = sp.priced(sh).costs
                fresh = part.partition(cm, s, _allowed_modes(s), part.INF, costs, None)
                reused = part.partition(cm, s, _allowed_modes(s), part.INF, costs, shared)
                assert (fresh is None) == (reused is None), (sh, k)
                if fresh is not None:
                    assert (fresh.step_time_s, fresh.stages, fresh.layer_recompute) == \
                        (reused.step_time_s, reused.stages, reused.layer_recompute), (sh, k)
                    fitted += 1
                checked += 1
    assert checked > 30 and fitted > 5
    costs = cm.layer_costs(Strategy.parse("dp=4,tp=1,pp=1,mbs=2,gbs=8").resolve(cm.cluster.world))
    groups = [(costs[0], 3), (costs[7], 5)] if kinds == 2 else [(costs[0], 8)]
    need, cache = sum(c.act_bytes["none"] * n for c, n in groups), {}
    for modes in (part.RECOMPUTE_MODES, ("selective", "full"), ("full",)):
        for frac in (0.05, 0.3, 0.7, 1.1):
            budget, work = frac * need * 2.0, (lambda w: 0.5 * w)
            assert part.cannot_fit(groups, modes, 2.0, budget, work, cache) == \
                part.cannot_fit(groups, modes, 2.0, budget, work)


def _allowed_modes(s: Strategy) -> tuple[str, ...]:
    """The recompute modes ``search._partitioned`` lets the partition use."""
    from autopar.techniques import offload, pipeline

    modes = part.RECOMPUTE_MODES
    if s.schedule in pipeline.ZERO_BUBBLE:
        modes = tuple(m for m in modes if m in pipeline.ZB_RECOMPUTE) or modes
    if s.offload_optimizer:
        modes = tuple(m for m in modes if m in offload.OFFLOAD_RECOMPUTE) or modes
    return modes


@pytest.mark.parametrize("seed,usable", [(0, 420), (1, 340)])
def test_schedule_terms_stay_under_prices_where_memory_binds(seed, usable):
    # each schedule's term of a row bound carries that schedule's recompute floor (its fewest micro-batches
    # in flight, its gradients freed) and, priced at the row's own micro-batch, the slowest rank's floor:
    # both the term scaled from the largest micro-batch and the own one stay under the partition price of
    # every configuration of the schedule, here where memory makes plans recompute
    cm = tiny_cost_model(seed, layers=8, nodes=2, gpus_per_node=4, usable_mib=usable, kinds=1)
    gb = 16
    sp, rows = filled(cm, gb)
    checked = recomputed = 0
    for sh, knobs in rows:
        terms = (S._schedule_bounds(sp, sh, knobs, *sp.memo["probe", sh]), S._own_bounds(sp, sh, knobs))
        for k in knobs:
            cand = S._partitioned(sp, sh, k, part.INF)
            if cand is not None:
                assert all(t[k.schedule, k.vpp] <= cand.step_time_s * (1 + 1e-9) for t in terms), (sh, k)
                checked, recomputed = checked + 1, recomputed + any(m != "none" for m in cand.layer_recompute)
    assert checked > 30 and recomputed > 5, (checked, recomputed)


@pytest.mark.parametrize("seed,usable,kinds,moe", [(0, 420, 1, False), (1, 340, 2, False), (3, 700, 1, True)])
def test_the_slowest_rank_floor_stays_under_the_partitions_slowest_rank(seed, usable, kinds, moe):
    # planner/rank_floor.py: each rank's own memory (its micro-batches in flight, pipeline buffers, logits) forces
    # recompute the mean-rank floors do not see; the floor of the slowest rank over every layout stays under the
    # partition's slowest rank, is inf only where nothing fits, and the bound the search queues a configuration
    # under with it stays under the configuration's price
    cm = tiny_cost_model(seed, layers=8, nodes=1 if moe else 2, gpus_per_node=4, usable_mib=usable, kinds=kinds,
                         moe=moe)   # MoE: ep and etp multiply the space, 4 GPUs keep the test short
    gb = 16
    sp, rows = filled(cm, gb)
    checked = above = refused = v_shaped = 0
    for sh, knobs in rows:
        for k in knobs:
            s = Strategy(**bounds.probe(sh, gb, k).model_dump()).resolve(cm.cluster.world)
            modes = S.allowed_modes(sp.cons.modes, k.schedule, k.offload)
            x = slowest_rank_floor(sp, sh, k, modes)
            cand = S._partitioned(sp, sh, k, part.INF)
            refused += x == part.INF
            if x == part.INF or cand is None or x == 0:
                assert x < part.INF or cand is None, s.short()
                continue
            if k.schedule in pipeline.V_SHAPED:   # the even split, every layer in one mode: the estimate's ranks
                slowest = max(r.fwd_s + r.bwd_s for r in cand.estimate.ranks)
                v_shaped += 1
            else:
                slowest = max(r.P for r in part.partition(cm, s, modes, part.INF, sp.priced(sh).costs).ranks)
            assert x <= slowest * (1 + 1e-12), (s.short(), x, slowest)
            above += x > bounds.peak_floor(sp, sh, k, sp.priced(sh)) * (1 + 1e-6)
            pushed = []
            sp.push = lambda lb, kind, *payload: pushed.append((lb, payload))   # noqa: B023
            S.expand_row(sp, sh, [k])           # its group, then the group's configuration, then its rank bound
            S.expand_group(sp, *pushed.pop()[1])
            lb, payload = pushed.pop()
            S._rank_bound(sp, lb, *payload)   # with FSDP's contention floor: under the estimate the plans rank by
            est = cand.estimate or cm.estimate(cand.strategy, cand.stages, cand.layer_recompute)
            assert pushed[-1][0] <= est.step_time_s * (1 + 1e-9), (s.short(), pushed[-1][0], est.step_time_s)
            checked += 1
    # several kinds of layer: V-shaped schedules only (their layers per rank are known without a layout)
    assert checked > 30 and v_shaped > 5 and (above > 5 or kinds > 1), (checked, above, refused, v_shaped)


def test_the_fsdp_contention_floor_stays_under_the_estimates_fsdp_terms():
    # rank_floor.contention_floor: FSDP's exposed per-unit traffic plus the compute its hidden rest slows (the
    # Hopper stack's overlap_slowdown) is at least min(1, slowdown) x the mean rank's traffic: under the
    # estimate's dp_comm + comm_contention of every ZeRO-3 plan, and above 0 for them
    from autopar.planner.rank_floor import contention_floor

    cm, _, _, seq = build_cost_model(Inputs(model="llama3-8b", nodes=1, seq_len=2048))
    gb = 64
    sp = bounds.Space(cm, S.Constraints(fixed={"zero_stage": 3, "offload_optimizer": False}, max_cp=2), gb)
    checked = 0
    for row in S.shardings(cm, sp.cons, gb):
        for sh in row[:1]:
            for k in S.knob_options(cm, sp.cons, sh, gb)[:2]:
                cand = S._partitioned(sp, sh, k, part.INF)
                if cand is None:
                    continue
                e = cand.estimate or cm.estimate(cand.strategy, cand.stages, cand.layer_recompute)
                floor = contention_floor(sp, sh, k)
                assert floor <= e.time["dp_comm"] + e.time["comm_contention"], (cand.strategy.short(), floor)
                checked += floor > 0
    assert checked > 5, checked
