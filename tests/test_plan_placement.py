"""`plan --trace --placement --out` carries the expert placement into the Plan that emit reads."""

import json

import pytest

from autopar.cli.main import main
from autopar.planner.experts import solve_placement
from autopar.profiles.routing import synthetic_trace


def test_plan_writes_the_placement(tmp_path, capsys):
    trace = synthetic_trace(experts=8, layers=3, topk=2, tokens=2048, skew=0.5, affinity=0.9, seed=0)
    trace.save(tmp_path / "trace.json")
    placement = solve_placement(trace, ep=4, time_limit_s=5)
    placement.save(tmp_path / "placement.json")
    out = tmp_path / "plan.json"
    with pytest.raises(SystemExit) as exc:
        main(["plan", "moe-tiny", "--gpu", "cpu", "--gpus-per-node", "4", "--seq-len", "64", "--global-batch", "16",
              "--trace", str(tmp_path / "trace.json"), "--placement", str(tmp_path / "placement.json"),
              "--strategy", "ep=4", "--out", str(out)])
        raise SystemExit(0)
    assert exc.value.code == 0
    plan = json.loads(out.read_text())
    assert plan["strategy"]["ep"] == 4
    assert plan["expert_placement"] == placement.assignment
