"""`autopar plan` end to end: table, JSON, --out Plan, --strategy, --plot, exit codes."""

from __future__ import annotations

import json

import pytest

from autopar.core.plan import Plan

TINY = ("gpt-tiny", "--gpu", "h100-sxm", "--gpus-per-node", "4", "--global-batch", "32")


def test_default_cluster_and_table(run_cli):
    code, out, err = run_cli("plan", "gpt-tiny")
    assert code == 0, err
    assert "1 x 8 h100-sxm" in out            # the embedded default cluster
    for col in ("strategy", "tokens/s", "TFLOP/s/GPU", "MFU", "peak mem"):
        assert col in out
    assert "Winner" in out and "searched" in out


def test_json_has_best_candidates_and_stats(run_cli):
    code, out, err = run_cli("plan", *TINY, "--top", "3", "--json")
    assert code == 0, err
    d = json.loads(out)
    assert set(d) >= {"best", "candidates", "stats", "why"}
    assert len(d["candidates"]) == 3 and d["best"] == d["candidates"][0]
    assert d["stats"]["search_time_s"] > 0 and d["stats"]["space"] > 0
    best = d["best"]
    # strategy keys are the strategy string's keys
    assert set(best["strategy"]) == {k.split("=")[0] for k in best["strategy_string"].split(",")}
    steps = [c["step_time_s"] for c in d["candidates"]]
    assert all(b >= a / 1.01 - 1e-12 for a, b in zip(steps, steps[1:]))  # sorted up to the 1% tie rule
    # the same prediction keys as `estimate --json`
    code, out2, _ = run_cli("estimate", *TINY, "--strategy", best["strategy_string"], "--json")
    est = json.loads(out2)
    assert code == 0 and set(est) <= set(best)


def test_out_writes_a_plan_emit_can_read(run_cli, tmp_path):
    path = tmp_path / "plan.json"
    code, out, err = run_cli("plan", *TINY, "--pp", "2", "--out", str(path))
    assert code == 0, err
    plan = Plan.load(path)
    s = plan.strategy
    assert s.pp == 2 and s.global_batch == 32 and s.dp * s.tp * s.pp * s.cp == 4
    assert len(plan.layer_recompute) == plan.model.layers
    assert [(x.layer_start, x.layer_end) for x in plan.stages][0][0] == 0
    assert plan.stages[-1].layer_end == plan.model.layers and plan.stages[-1].has_output
    assert all(x.rank == x.index % s.pp for x in plan.stages)
    assert plan.predictions["feasible"] and plan.predictions["step_time_s"] > 0
    assert "plan" in plan.provenance.command


def test_strategy_fixes_the_knobs_it_names(run_cli):
    code, out, err = run_cli("plan", *TINY, "--strategy", "tp=2,zero=1", "--json")
    assert code == 0, err
    for c in json.loads(out)["candidates"]:
        assert c["strategy"]["tp"] == 2 and c["strategy"]["zero"] == 1


def test_plot_writes_timeline_and_memory(run_cli, tmp_path):
    code, out, err = run_cli("plan", *TINY, "--pp", "2", "--plot", str(tmp_path / "fig"))
    assert code == 0, err
    for name in ("timeline.png", "memory.png"):
        p = tmp_path / "fig" / name
        assert p.is_file() and p.read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("args", [("--tp", "3"), ("--strategy", "tp=2,pp=2,cp=2,dp=2"), ("--zero", "5")])
def test_impossible_constraints_exit_2(run_cli, args):
    code, out, err = run_cli("plan", *TINY, *args)
    assert code == 2
    assert err.startswith("error: ") and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_405b_on_16_gpus_exits_3_with_overflow_and_fixes(run_cli):
    # without offload: CPUOffloadPolicy puts every state on the host, and host memory is not priced
    code, out, err = run_cli("plan", "llama3-405b", "--nodes", "2", "--no-offload")
    assert code == 3
    assert "Traceback" not in err
    assert "nothing fits" in err and "GiB over" in err and "GPUs" in err
    # a hand-written strategy that cannot fit gets the same exit code and its overflow
    code, out, err = run_cli("plan", "llama3-405b", "--nodes", "2", "--strategy", "tp=8,pp=2,zero=1,offload=0")
    assert code == 3 and "GiB over" in err and "tp8" in err
