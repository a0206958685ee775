"""Zero-bubble pipeline schedules (ScheduleInterleavedZeroBubble, ScheduleZBVZeroBubble,
ScheduleDualPipeV): priced with backward split into input- and weight-gradient work, simulated,
searched, and emitted programs that match one process (2 gloo ranks)."""

from __future__ import annotations

import pytest
from helpers_plans import make_plan

from autopar.codegen.emit import emit
from autopar.core.strategy import Strategy
from autopar.cost_models.pipeline import bubble_share, in_flight_microbatches, simulate, step_time
from autopar.cost_models.session import Inputs, build_cost_model
from autopar.planner import search as S

P, M = 4, 8
F, B, W = [1.0] * P, [2.0] * P, [1.0] * P   # backward = 2 x forward, half of it weight gradients


def test_zero_bubble_closed_forms_and_simulation_agree():
    for sched, v in (("zb_interleaved", 2), ("zb_interleaved", 1), ("zbv", 2), ("dualpipev", 2)):
        closed = step_time(F, B, M, sched, v, 0.0, W).step_time_s
        sim = simulate(F, B, M, sched, v, 0.0, W).step_time_s
        assert sim == pytest.approx(closed, rel=0.08), sched
    one = step_time(F, B, M, "1f1b", 1).step_time_s
    inter = step_time(F, B, M, "interleaved", 2).step_time_s
    zb = step_time(F, B, M, "zb_interleaved", 2, 0.0, W).step_time_s
    zbv = step_time(F, B, M, "zbv", 2, 0.0, W).step_time_s
    assert zbv <= zb < inter < one
    assert zbv == pytest.approx(M * 3.0)     # F + B - 2W per chunk = 0: no bubble (Qi et al. 2024)


def test_without_weight_gradients_zero_bubble_is_interleaved():
    no_w = step_time(F, B, M, "zb_interleaved", 2, 0.0, [0.0] * P).step_time_s
    assert no_w == pytest.approx(step_time(F, B, M, "interleaved", 2).step_time_s)
    assert bubble_share("zbv", 1.0, 2.0, 1.0) == 0.0 and bubble_share("1f1b", 1.0, 2.0, 1.0) == 1.0


def test_simulation_splits_backward_into_b_and_w():
    ev = simulate(F, B, M, "zbv", 2, 0.0, W).events
    kinds = {e[1] for e in ev}
    assert kinds == {"F", "B", "W"}
    assert sum(e[5] - e[4] for e in ev if e[0] == 0) == pytest.approx(M * 3.0)  # all work of rank 0 done once


def test_v_schedule_holds_p_microbatches_on_every_rank():
    assert [in_flight_microbatches(r, P, M, "zbv", 2) for r in range(P)] == [P] * P
    assert in_flight_microbatches(0, P, M, "1f1b") == P and in_flight_microbatches(P - 1, P, M, "1f1b") == 1


@pytest.fixture(scope="module")
def llama_cm():
    return build_cost_model(Inputs(model="llama-tiny", gpu="h100-sxm", nodes=1, gpus_per_node=4, seq_len=64))[0]


def test_estimate_prices_zero_bubble_below_1f1b(llama_cm):
    base = "pp=4,dp=1,mbs=1,gbs=16"
    one = llama_cm.estimate(Strategy.parse(base).resolve(4)).time["bubble"]
    inter = llama_cm.estimate(Strategy.parse(base + ",schedule=interleaved,vpp=2").resolve(4)).time["bubble"]
    zb = llama_cm.estimate(Strategy.parse(base + ",schedule=zb_interleaved,vpp=2").resolve(4)).time["bubble"]
    zbv = llama_cm.estimate(Strategy.parse(base + ",schedule=zbv,vpp=2").resolve(4)).time["bubble"]
    assert 0 < zbv < zb < inter < one


def test_search_tries_zero_bubble_schedules(llama_cm):
    cons = S.Constraints(fixed={"pp": 2, "dp": 2})
    row = next(S.shardings(llama_cm, cons, 16))
    scheds = {k.schedule for k in S.knob_options(llama_cm, cons, row[0], 16)}
    assert {"zb_interleaved", "zbv"} <= scheds


# ----- numerics: 2 gloo ranks against one process ------------------------------------------------
ZB_CASES = {
    "zb_interleaved": ("llama-tiny", "pp=2,vpp=2,schedule=zb_interleaved,mbs=2", {}),
    "zbv": ("llama-tiny", "pp=2,vpp=2,schedule=zbv,mbs=2", {}),
    "dualpipev": ("llama-tiny", "pp=2,vpp=2,schedule=dualpipev,mbs=1", {}),
}


@pytest.mark.slow
def test_zero_bubble_programs_match_one_process(tmp_path):
    from test_codegen_runs import _check_case, _jobs_for, _launch

    plan = make_plan("llama-tiny", 2, ZB_CASES["zbv"][1])
    emit(plan, tmp_path / "probe", "cpu")
    assert "STAGE_RANKS = [0, 1, 1, 0]" in (tmp_path / "probe" / "train.py").read_text()
    results = _launch(tmp_path, 2, _jobs_for(tmp_path, 2, ZB_CASES, {}, None))
    for name, case in ZB_CASES.items():
        _check_case(results, name, case)
