"""The search's time bounds (planner/bounds.py) prune without changing the answer: the bounded
search returns the plans of ``search(..., exhaustive=True)``, which partitions every configuration
above the memory floor; and each bound stays under the price it bounds."""

from __future__ import annotations

import pytest
from test_partition import tiny_cost_model

from autopar.core.strategy import Strategy
from autopar.cost_models.session import Inputs, build_cost_model
from autopar.planner import bounds
from autopar.planner import partition as part
from autopar.planner import search as S

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
                S._expand_row(sp, sh, [k])
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
