"""What the host-bound floor adds to a step, as the estimate carries it (``Estimate.host_floor_s``, summed from
``LayerCost.host_floor_s`` where ``host_bound.layer_floor`` applies it) and as estimate / plan say it: one line with
the fix, only when it is at least ``report.MATERIAL_HOST`` of the step."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from autopar.core.strategy import Strategy
from autopar.cost_models import host_bound, report
from autopar.cost_models.session import Inputs, build_cost_model

MODELS = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check_models"
ONE_H100 = ("--gpu", "h100-sxm", "--gpus-per-node", "1", "--seq-len", "4096", "--global-batch", "4", "--dtype", "bf16")


def _cm(name: str, gpus: int = 1):
    return build_cost_model(Inputs(model=str(MODELS / f"{name}.json"), gpu="h100-sxm", gpus_per_node=gpus,
                                   seq_len=4096, dtype="bf16"))[0]


def _steps(monkeypatch, cm, strategies: list[Strategy]) -> list[tuple[float, float]]:
    """(step, host_floor_s) of each strategy, then the step with no host floor (the same model, prices forgotten)."""
    floored = [(e.step_time_s, e.host_floor_s) for e in map(cm.estimate, strategies)]
    monkeypatch.setattr(host_bound, "host_launch_s", lambda gpu, runtime="torch": 0.0)
    monkeypatch.setattr(cm, "_cache", {})   # a fresh price cache; the floored one comes back at teardown
    bare = [cm.estimate(s) for s in strategies]
    assert all(e.host_floor_s == 0.0 for e in bare)
    return [(step - e.step_time_s, floor) for (step, floor), e in zip(floored, bare)]


def test_the_field_is_what_the_floor_adds_to_the_step(monkeypatch):
    cm = _cm("moe-gpu")
    ss = [Strategy(dp=1, global_batch=4, micro_batch=1).resolve(1),
          Strategy(dp=1, global_batch=4, micro_batch=2, recompute="full").resolve(1),
          Strategy(dp=1, global_batch=4, micro_batch=4).resolve(1)]
    (d1, f1), (d2, f2), (d4, f4) = _steps(monkeypatch, cm, ss)
    assert f1 > 0.1 and f1 == pytest.approx(d1, rel=1e-9)   # one GPU, one stage: the whole difference
    assert f2 > 0 and f2 == pytest.approx(d2, rel=1e-9)     # re-runs included
    assert f4 == d4 == 0.0                                  # GPU-bound at mbs 4: nothing added


def test_a_pipeline_adds_at_least_the_field(monkeypatch):
    cm = _cm("moe-gpu", gpus=2)
    s = Strategy(dp=1, pp=2, global_batch=8, micro_batch=1).resolve(2)
    [(added, floor)] = _steps(monkeypatch, cm, [s])
    assert 0 < floor <= added * (1 + 1e-9)   # the bubble grows with the stages' floored times too


def test_gpu_bound_dense_model_has_no_floor_and_no_note():
    cm = _cm("llama-gpu")
    e = cm.estimate(Strategy(dp=1, global_batch=4, micro_batch=1).resolve(1))
    assert e.host_floor_s == 0.0 and report.host_bound_note(e, cm) is None
    d = report.estimate_dict(e, cm)
    assert d["time"]["host_floor_s"] == 0.0 and d["host_bound"] is None


def test_the_note_names_the_share_and_a_priced_fix(monkeypatch):
    cm = _cm("moe-gpu")
    e = cm.estimate(Strategy(dp=1, global_batch=4, micro_batch=1).resolve(1))
    note = report.host_bound_note(e, cm)
    bigger = cm.estimate(Strategy(dp=1, global_batch=4, micro_batch=2).resolve(1))
    assert note.startswith("host-bound: ") and "\n" not in note
    assert f"({100 * e.host_floor_s / e.step_time_s:.0f}% of the step)" in note
    assert f"mbs=2 ({report.seconds(bigger.step_time_s)} a step)" in note and bigger.step_time_s < e.step_time_s
    assert "ep=2" not in note   # one GPU: no larger ep to offer
    monkeypatch.setattr(report, "MATERIAL_HOST", e.host_floor_s / e.step_time_s * 1.01)
    assert report.host_bound_note(e, cm) is None   # just under the threshold: not said


def test_estimate_and_plan_say_it_once(run_cli):
    model = str(MODELS / "moe-gpu.json")
    code, out, err = run_cli("estimate", model, *ONE_H100, "--strategy", "dp=1,mbs=1")
    assert code == 0, err
    assert len([x for x in out.splitlines() if x.startswith("host-bound: ")]) == 1
    code, out, err = run_cli("estimate", model, *ONE_H100, "--strategy", "dp=1,mbs=1", "--json")
    d = json.loads(out)
    assert d["host_bound"].startswith("host-bound: ") and d["time"]["host_floor_s"] > 0.1 * d["step_time_s"]
    code, out, err = run_cli("plan", model, *ONE_H100, "--mbs", "1", "--json")
    assert code == 0, err
    why = json.loads(out)["why"]
    assert "is host-bound" in why[0] and why[1] == json.loads(out)["best"]["host_bound"]
