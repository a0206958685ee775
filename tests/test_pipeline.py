"""Pipeline schedules: closed forms against the op-by-op simulation and the textbook bubbles."""

import random

import pytest

from autopar.cost_models.pipeline import in_flight_microbatches, simulate, step_time


@pytest.mark.parametrize("p,m", [(2, 4), (4, 8), (8, 16), (4, 32)])
def test_1f1b_bubble_is_p_minus_1_over_m(p, m):
    # Narayanan et al. SC21 Sec. 2.2: bubble fraction (p-1)/m of the ideal time m*(f+b).
    f, b = [1.0] * p, [2.0] * p
    t = step_time(f, b, m, "1f1b")
    ideal = m * 3.0
    assert t.step_time_s == pytest.approx(ideal * (1 + (p - 1) / m))
    assert simulate(f, b, m, "1f1b").step_time_s == pytest.approx(t.step_time_s)
    assert simulate(f, b, m, "gpipe").step_time_s == pytest.approx(t.step_time_s)


@pytest.mark.parametrize("p,m,v", [(2, 4, 2), (4, 8, 2), (4, 8, 4), (8, 16, 2), (4, 32, 3)])
def test_interleaved_bubble_is_p_minus_1_over_vm(p, m, v):
    # SC21 Sec. 2.2.2: interleaving with v chunks divides the bubble by v.
    f, b = [1.0] * p, [2.0] * p
    t = step_time(f, b, m, "interleaved", v)
    ideal = m * 3.0
    assert t.step_time_s == pytest.approx(ideal * (1 + (p - 1) / (v * m)))
    assert simulate(f, b, m, "interleaved", v).step_time_s == pytest.approx(t.step_time_s)


def test_unequal_stages_follow_the_slowest_stage():
    random.seed(1)
    for p, m in [(4, 8), (8, 32)]:
        f = [random.uniform(0.5, 1.5) for _ in range(p)]
        b = [2 * x for x in f]
        closed = step_time(f, b, m, "1f1b").step_time_s
        sim = simulate(f, b, m, "1f1b").step_time_s
        assert closed == pytest.approx(sim, rel=0.05)
        assert closed >= m * max(x + y for x, y in zip(f, b))


def test_in_flight_microbatches():
    # 1F1B: stage i holds p - i micro-batches; GPipe holds all m.
    assert [in_flight_microbatches(i, 4, 16, "1f1b") for i in range(4)] == [4, 3, 2, 1]
    assert in_flight_microbatches(0, 4, 16, "gpipe") == 16
    assert in_flight_microbatches(0, 4, 2, "1f1b") == 2
    # interleaved holds more than 1F1B on the first rank: (2(p-1) + (v-1)p + 1)/v micro-batches
    assert in_flight_microbatches(0, 4, 16, "interleaved", 2) == pytest.approx((6 + 4 + 1) / 2)
