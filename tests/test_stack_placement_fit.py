"""A partition whose recompute the stack places on other layers: the search takes the least denser placement that fits.

Megatron recomputes the first N layers of each stage (``--recompute-method block``); the partition may have chosen
to leave the first (dense, small) layers plain and recompute the later (MoE, large) ones. With the same count of
recomputed layers Megatron's placement leaves the MoE layers plain and does not fit (DeepSeek-V3 on 1024 GPUs
at dp1024 ep8 z3 mbs4, found by U1: layers 59, 60 plain, 79.5 GiB live of 74.1). The search used to drop the
configuration; ``search._placed`` now tries larger N (``recompute.denser_layouts``) and keeps the smallest that fits.
``test_moe_tiny_megatron_search_finds_the_denser_placement`` runs the search on moe-tiny (layer 0 dense, 1-3 MoE,
whose activations are larger) under --runtime megatron with the GPU memory set between the two placements; the
other tests use a stand-in cost model (each layer's saved bytes by its kind, the time growing with every recomputed
layer), so the answer is known without pricing.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from autopar.core.strategy import Strategy
from autopar.cost_models.session import Inputs, build_cost_model
from autopar.planner import recompute as rc
from autopar.planner import search as S
from autopar.planner.partition import PartitionResult
from autopar.planner.space import Constraints

DENSE, MOE = 2, 6   # layers 0-1 dense, 2-7 MoE
ACT = {"dense": {"none": 1.0, "full": 0.1}, "moe": {"none": 5.0, "full": 0.5}}


@dataclass
class _Est:
    feasible: bool
    step_time_s: float


class _Model:
    """Live bytes = the layers' saved bytes; fits under ``budget``; each recomputed layer adds 1 s."""

    def __init__(self, budget: float):
        self.budget, self.priced = budget, 0

    def estimate(self, s, stages, lr):
        self.priced += 1
        live = sum(ACT["dense" if i < DENSE else "moe"][m] for i, m in enumerate(lr))
        return _Est(live <= self.budget, 10.0 + sum(m == "full" for m in lr))


def _fits(budget: float, lr: list[str]) -> bool:
    return _Model(budget).estimate(None, None, lr).feasible


def _partition(lr: list[str]) -> PartitionResult:
    return PartitionResult(0.0, [len(lr)], [(0, len(lr))], lr, [])


STRAT = Strategy(dp=1, micro_batch=1, global_batch=1).resolve(1)


@pytest.mark.parametrize("budget", [7.0, 10.0, 13.0])
def test_megatron_placement_that_does_not_fit_is_made_denser(budget):
    """The partition keeps the dense layers plain (its per-layer choice fits); Megatron's first N with the same
    count keeps MoE layers plain, which does not fit: the smallest N whose placement fits is the plan."""
    chosen = ["none"] * DENSE + ["full"] * MOE
    assert _fits(budget, chosen)
    cm = _Model(budget)
    cand = S._placed(cm, STRAT, "first_n", _partition(chosen), float("inf"))
    layers = DENSE + MOE
    fitting = [n for n in range(layers + 1) if _fits(budget, rc.first_n([(0, layers)], n))]
    assert cand is not None
    assert cand.layer_recompute == rc.first_n([(0, layers)], min(fitting))
    assert cand.estimate.feasible and cand.step_time_s == 10.0 + min(fitting)


def test_denser_stops_at_the_first_fit_and_respects_the_bound():
    """Denser placements priced until one fits; one slower than ``upper`` is not returned."""
    chosen = ["none"] * DENSE + ["full"] * MOE
    cm = _Model(7.0)
    assert S._placed(cm, STRAT, "first_n", _partition(chosen), float("inf")) is not None
    assert cm.priced == 1 + 2   # stack_layouts' one placement (N = 6), then N = 7 and 8
    assert S._placed(_Model(7.0), STRAT, "first_n", _partition(chosen), 10.0 + DENSE + MOE - 1) is None


def test_a_placement_that_fits_is_not_made_denser():
    chosen = ["full"] * 3 + ["none"] * 5
    cand = S._placed(_Model(100.0), STRAT, "first_n", _partition(chosen), float("inf"))
    assert cand.layer_recompute == chosen


@pytest.mark.parametrize("mix", ["first_n", "every_nth"])
def test_denser_layouts_recompute_more_each_step(mix):
    stages = [(0, 5), (5, 8), (8, 13), (13, 16)]
    chosen = ["full"] + ["none"] * 4 + ["full"] + ["none"] * 10
    tried = rc.stack_layouts(mix, chosen, stages, 2, "interleaved")
    more = rc.denser_layouts(mix, chosen, stages, 2, "interleaved")
    assert more and more[-1] == ["full"] * 16
    counts = [sum(m == "full" for m in lr) for lr in tried + more]
    assert all(a <= b for a, b in zip(counts, counts[1:]))
    for lr in more:
        assert all(lr[i] == "full" for t in tried for i, m in enumerate(t) if m == "full") or mix == "every_nth"
    assert rc.denser_layouts("per_layer", chosen, stages, 2, "interleaved") == []


def _live(cm, s, stages, lr) -> float:
    e = cm.estimate(s, stages, lr)
    return e.peak_bytes - e.memory_overhead


def test_moe_tiny_megatron_search_finds_the_denser_placement():
    """moe-tiny dp1 mbs8 under Megatron, none / full only, the GPU's memory set so that the partition's choice
    (dense layer 0 plain, the MoE layers recomputed) fits and Megatron's first 3 (MoE layer 3 plain) does not:
    before, the search found no plan; now the first N whose placement fits (all 4)."""
    cm = build_cost_model(Inputs(model="moe-tiny", gpu="h100-sxm", nodes=1, gpus_per_node=1, runtime="megatron"))[0]
    s, stages = Strategy(dp=1, micro_batch=8, global_batch=8).resolve(1), [(0, 4)]
    chosen = ["none", "full", "full", "full"]
    want = (_live(cm, s, stages, chosen) + _live(cm, s, stages, rc.first_n(stages, 3))) / 2
    lo, hi, g0 = 0, cm.gpu.mem_capacity_bytes, cm.gpu
    while hi - lo > 1:   # the capacity whose usable bytes first reach ``want``
        mid = (lo + hi) // 2
        cm.gpu = g0.model_copy(update={"mem_capacity_bytes": mid})
        lo, hi = (mid, hi) if cm.usable_mem_bytes < want else (lo, mid)
    cm.gpu = g0.model_copy(update={"mem_capacity_bytes": hi})
    assert cm.estimate(s, stages, chosen).feasible and not cm.estimate(s, stages, rc.first_n(stages, 3)).feasible
    res = S.search(cm, 8, Constraints(fixed={"dp": 1, "micro_batch": 8}, recompute_modes=("none", "full")),
                   top_k=1, exhaustive=True)
    n = next(n for n in range(5) if cm.estimate(s, stages, rc.first_n(stages, n)).feasible)
    assert [c.layer_recompute for c in res.candidates] == [rc.first_n(stages, n)]
