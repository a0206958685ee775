"""``search(best_only=True)`` (what ``planner.awkward`` asks of an alternative it shows by its best plan):
the first plan listed is the full search's, found with no more partitions; an alternative that is
recommended is searched again in full (the plan command lists its ``top_k``)."""

from __future__ import annotations

import pytest
from test_partition import tiny_cost_model
from test_search_bounds import CASES

from autopar.planner import awkward
from autopar.planner import search as S


def _first(res: S.SearchResult) -> tuple:
    c = res.candidates[0]
    return c.strategy.short(), c.stages, c.layer_recompute, c.estimate.step_time_s


@pytest.mark.parametrize("seed,layers,nodes,gpn,moe,usable,gb,fixed", CASES)
def test_best_only_lists_the_full_searchs_first_plan(seed, layers, nodes, gpn, moe, usable, gb, fixed):
    cm = tiny_cost_model(seed, layers=layers, nodes=nodes, gpus_per_node=gpn, moe=moe, usable_mib=usable)
    full = S.search(cm, gb, S.Constraints(fixed=dict(fixed)), top_k=3)
    best = S.search(cm, gb, S.Constraints(fixed=dict(fixed)), top_k=3, best_only=True)
    assert full.candidates and _first(best) == _first(full)
    assert best.stats.priced <= full.stats.priced


def test_a_recommended_nearest_batch_is_searched_in_full(monkeypatch):
    # 13 single-GPU nodes of the tiny model: the nearest batch (13) is searched best_only; where it is
    # recommended, alternatives() searches it again with every plan the plan command lists
    calls = []
    real = awkward.search

    def spy(cm, gb, cons=None, top_k=5, **kw):
        calls.append((cm.cluster.world, gb, kw.get("best_only", False)))
        return real(cm, gb, cons, top_k, **kw)

    monkeypatch.setattr(awkward, "search", spy)
    monkeypatch.setattr(awkward, "recommend", lambda options, gb: (options[-1], "forced"))   # the nearest batch
    cm = tiny_cost_model(1, layers=4, nodes=13, gpus_per_node=1, usable_mib=2000)
    res = S.search(cm, 16, S.Constraints(), top_k=3)
    alts = awkward.alternatives(cm, 16, S.Constraints(), res, top_k=3)
    assert alts.recommended.kind == "other_batch" and (13, 13, True) in calls and calls[-1] == (13, 13, False)
    full = S.search(alts.recommended.cm, 13, S.Constraints(), top_k=3)
    assert [_first_of(c) for c in alts.recommended.result.candidates] == [_first_of(c) for c in full.candidates]


def _first_of(c) -> tuple:
    return c.strategy.short(), c.stages, c.layer_recompute, c.estimate.step_time_s


def test_strategy_with_is_model_copy():
    # space.strategy_with: the probes and rule shapes the search builds, as model_copy(update=...) builds them
    from autopar.core.strategy import Strategy
    from autopar.planner.space import strategy_with

    base = Strategy.model_construct(**Strategy().model_dump())
    for update in ({}, {"dp": 4, "tp": 2, "micro_batch": 2, "schedule": "interleaved", "vpp": 2},
                   {"zero_stage": 3, "offload_optimizer": True, "sequence_parallel": True}):
        fast, slow = strategy_with(base, update), base.model_copy(update=update)
        assert fast == slow and fast.__dict__ == slow.__dict__ and fast.model_dump() == slow.model_dump()
        world = fast.dp * fast.tp
        assert fast.model_fields_set == slow.model_fields_set and fast.resolve(world) == slow.resolve(world)
        assert fast.__pydantic_extra__ is None and fast.__pydantic_private__ is None
    assert base.dp == Strategy().dp   # the base is left as it was
