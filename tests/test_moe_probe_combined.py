"""benchmarks/moe_probe.py ``combined``: Megatron-Core's interleaved order under the all-to-all overlap
(megatron-core 0.16 ``schedules.get_pp_rank_microbatches``: one warmup forward more than the plain
interleaved schedule; ``combined_1f1b``: each steady-state forward merged with the next backward)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from autopar.cost_models import pipeline

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.mark.parametrize("p,v,m", [(2, 2, 4), (2, 12, 8), (4, 3, 8), (8, 7, 16)])
def test_combined_order_runs_every_op_once_with_one_more_warmup_forward(p, v, m):
    sys.path.insert(0, str(BENCH))
    from moe_probe import combined_order, replay_units

    for rank in range(p):
        units = combined_order(rank, p, m, v)
        ops = [op for unit in units for op in unit]
        assert sorted(ops) == sorted(pipeline._interleaved_order(rank, p, m, v))
        warm = next(i for i, unit in enumerate(units) if len(unit) == 2)
        assert warm == min((p - rank - 1) * 2 + (v - 1) * p + 1, m * v)
        assert all([k for k, _, _ in unit] == ["F", "B"] for unit in units if len(unit) == 2)
    f, b = [1.0] * p, [2.0] * p
    # equal stages: the merged steps cannot beat the plain order's lower bound m * (f + b)
    assert replay_units(f, b, m, v, 0.0) >= m * 3.0


def test_combined_replay_against_the_plain_order_on_two_equal_ranks():
    """Two equal ranks, one chunk each: merging a forward with the next backward delays the forward's output, so
    the replay is no faster than the plain order and, with one extra warmup forward, at most one forward slower."""
    sys.path.insert(0, str(BENCH))
    from moe_probe import replay_units

    f, b = [1.0, 1.0], [2.0, 2.0]
    plain = pipeline.simulate(f, b, 8, "interleaved", 1, 0.0).step_time_s
    assert plain <= replay_units(f, b, 8, 1, 0.0) <= plain + 1.0
