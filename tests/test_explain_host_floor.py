"""The plan's explanation (``planner.explain.why``) names the eager host's launch floor inside the compute share when
it is material (``report.MATERIAL_HOST``, the threshold of the host-bound note that follows it), and not otherwise."""

from __future__ import annotations

from pathlib import Path

import pytest

from autopar.core.strategy import Strategy
from autopar.cost_models import report
from autopar.cost_models.session import Inputs, build_cost_model
from autopar.planner import explain
from autopar.planner.search import Candidate

MODELS = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check_models"


def _why(name: str, s: Strategy):
    """(the winner's explanation, its estimate, the cost model) of ``s`` alone on one H100."""
    cm = build_cost_model(Inputs(model=str(MODELS / f"{name}.json"), gpu="h100-sxm", gpus_per_node=1, seq_len=4096,
                                 dtype="bf16"))[0]
    e = cm.estimate(s)
    return explain.why([Candidate(strategy=s, stages=[], layer_recompute=[s.recompute] * cm.num_layers, estimate=e,
                                  step_time_s=e.step_time_s)], cm), e, cm


@pytest.mark.parametrize("mbs,recompute", [(1, "none"), (2, "full")])
def test_a_material_host_floor_is_named_inside_compute(mbs, recompute):
    s = Strategy(dp=1, global_batch=4, micro_batch=mbs, recompute=recompute).resolve(1)
    why, e, cm = _why("moe-gpu", s)
    share = 100 * e.host_floor_s / e.step_time_s
    what = "compute and recomputation are" if recompute == "full" else "compute is"
    inside = e.time["compute"] + e.time.get("recompute", 0.0)
    assert share >= 100 * report.MATERIAL_HOST and e.host_floor_s <= inside
    assert (f"{what} {100 * inside / e.step_time_s:.0f}% of the step, of which the eager host's kernel launches add "
            f"{report.seconds(e.host_floor_s)} ({share:.0f}%)") in why[0]
    assert why[1] == report.host_bound_note(e, cm)   # then the note: its seconds and priced fixes


def test_no_floor_no_mention(monkeypatch):
    s = Strategy(dp=1, global_batch=4, micro_batch=1).resolve(1)
    why, e, _ = _why("llama-gpu", s)
    assert e.host_floor_s == 0.0 and "host" not in " ".join(why)
    assert f"compute is {100 * e.time['compute'] / e.step_time_s:.0f}% of the step" in why[0]
    why, e, _ = _why("moe-gpu", s)
    monkeypatch.setattr(explain, "MATERIAL_HOST", e.host_floor_s / e.step_time_s * 1.01)   # just under it: not said
    assert "kernel launches" not in explain._compute_share(e)
