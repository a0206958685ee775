"""Closed-loop validation (`autopar validate`): comparison math, the failure and timeout paths
(a run that crashes or hangs is reported failed and the others still run), and one real
end-to-end run of two strategies on two gloo ranks."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest
from scipy.stats import spearmanr

from autopar.codegen import validate as v
from autopar.codegen import validate_report as rep
from autopar.cost_models.session import Inputs, build_cost_model


@pytest.fixture(scope="module")
def cm():
    return build_cost_model(Inputs(model="gpt-tiny", gpu="cpu", nodes=1, gpus_per_node=2, seq_len=32,
                                   dtype="fp32"))[0]


def _row(name, pt, mt, pm, mm, status="ok") -> v.Row:
    meas = v.Measurement(status=status, step_times_s=[9.0, mt, mt], peak_bytes=[1.0, mm, mm], warmup=1)
    return v.Row(name=name, strategy=name, prediction=v.Prediction(pt, pm, pm + 10, {}), measurement=meas)


# ----- math -----------------------------------------------------------------------------
def test_percentage_errors():
    assert v.ape(110, 100) == pytest.approx(10.0)
    assert v.ape(90, 100) == pytest.approx(10.0)
    assert v.under_prediction(90, 100) == pytest.approx(10.0)
    assert v.under_prediction(120, 100) == 0.0


@pytest.mark.parametrize("xs,ys", [([1, 2, 3, 4], [10, 20, 30, 40]), ([1, 2, 3, 4], [4, 3, 2, 1]),
                                   ([1, 2, 2, 5, 3], [2, 1, 4, 3, 5]), ([0.3, 0.1, 0.2], [3.0, 2.0, 1.0])])
def test_spearman_matches_scipy(xs, ys):
    assert v.spearman(xs, ys) == pytest.approx(spearmanr(xs, ys).statistic)


def test_spearman_needs_three_points_and_spread():
    assert v.spearman([1, 2], [1, 2]) is None
    assert v.spearman([1, 1, 1], [1, 2, 3]) is None


def test_median_after_warmup_and_peak():
    m = v.Measurement(status="ok", step_times_s=[5.0, 4.0, 1.0, 3.0, 2.0], peak_bytes=[9, 1, 2, 3, 2], warmup=2)
    assert m.time_s == 2.0  # median of [1, 3, 2]: the two warm-up steps are left out
    assert m.mem_bytes == 3  # step 1 is left out (optimizer states appear after its peak)
    m.peak_bytes = [9, 4, -1, -1, -1]  # CPU: the tracker runs in the warm-up steps only
    assert m.mem_bytes == 4


def test_cpu_tracks_memory_in_warmup_steps_only():
    cfg = v.Config(nproc=2, global_batch=4, steps=5, warmup=1)
    assert cfg.mem_steps == 2 and cfg.untimed == 2
    assert "--mem-steps" in v.torchrun_command(cfg) and v.torchrun_command(cfg)[-3] == "2"
    assert v.Config(nproc=2, global_batch=4, device="cuda", warmup=1).mem_steps == 0


def test_summary_best_and_errors():
    rows = [_row("a", 1.0, 2.0, 100, 100), _row("b", 2.0, 1.0, 90, 100), _row("c", 3.0, 3.0, 110, 100),
            _row("dead", 0.5, 0.0, 1, 1, status="failed")]
    s = v.summarize(rows)
    assert s["ran"] == 3 and s["failed"] == 1
    assert s["predicted_best"] == "a" and s["measured_best"] == "b"
    assert s["best_gap_pct"] == pytest.approx(100.0)  # the predicted best runs 2x slower than b
    assert s["memory_mape"] == pytest.approx(20 / 3)
    assert s["max_memory_under_prediction"] == pytest.approx(10.0)
    assert s["spearman"] == pytest.approx(0.5)
    assert s["time_mape"] == pytest.approx((50 + 100 + 0) / 3)
    by = {r["name"]: r for r in s["strategies"]}
    assert by["b"]["memory_error_pct"] == pytest.approx(-10.0)
    assert by["dead"]["status"] == "failed" and "time_error_pct" not in by["dead"]


def test_parse_steps_and_status():
    cfg = v.Config(nproc=2, global_batch=4, steps=4, warmup=1, timeout_s=5)
    text = ("noise\nstep=1 loss=2.0 step_time_s=0.5 peak_mem_bytes=100\nstep=2 loss=1.9 step_time_s=0.25 "
            "peak_mem_bytes=120\nstep=3 loss=1.8 step_time_s=0.3 peak_mem_bytes=-1\nstep=garbled\n"
            "step=4 loss=1.7 step_time_s=0.2 peak_mem_bytes=-1\n")
    ok = v.measure(0, text, 1.0, Path("log"), cfg)
    assert ok.status == "ok" and ok.step_times_s == [0.5, 0.25, 0.3, 0.2] and ok.time_s == pytest.approx(0.25)
    assert ok.mem_bytes == 120
    crash = v.measure(1, text.split("step=3")[0] + "Traceback (most recent call last):\nRuntimeError: boom\n", 1.0,
                      Path("log"), cfg)
    assert crash.status == "failed" and "RuntimeError: boom" in crash.error
    assert v.measure(None, text, 5.0, Path("log"), cfg).status == "timeout"
    # every step measured, then an abort at interpreter shutdown: the numbers stand, the exit is noted
    late = v.measure(-6, text + "terminate called without an active exception\n", 1.0, Path("log"), cfg)
    assert late.status == "ok" and "after the last step" in late.error
    assert v.measure(0, "step=1 loss=1 step_time_s=1 peak_mem_bytes=1\n", 1.0, Path("log"), cfg).status == "failed"


def test_launch_kills_the_whole_group_on_timeout(tmp_path):
    # a child that would outlive its parent: the process group must go
    pidfile = tmp_path / "child.pid"
    cmd = ["bash", "-c", f"sleep 60 & echo $! > {pidfile}; wait"]
    t0 = time.perf_counter()
    rc, _, wall = v.launch(cmd, tmp_path, 1.0, tmp_path / "log.txt")
    assert rc is None and time.perf_counter() - t0 < 15
    assert not _alive(int(pidfile.read_text()))


def _alive(pid: int) -> bool:
    """Running (a killed child re-parented to init may linger as a zombie until reaped)."""
    for _ in range(20):
        try:
            state = Path(f"/proc/{pid}/status").read_text().split("State:")[1].split()[0]
        except (FileNotFoundError, IndexError):
            return False
        if state in ("Z", "X"):
            return False
        time.sleep(0.1)
    return True


# ----- the loop with a fake launcher ------------------------------------------------------
FAKE = """
import json, sys, time
s = json.load(open("plan.json"))["strategy"]
if s["tp"] > 1:
    raise RuntimeError("fake crash in tensor parallel")
if s["zero_stage"] == 3:
    time.sleep(60)
for i in range(1, 5):
    print(f"step={i} loss=1.0 step_time_s={0.1 * s['micro_batch']} peak_mem_bytes={1000 * s['dp']}")
"""


def test_failed_and_hung_runs_are_reported_and_the_rest_run(cm, tmp_path):
    cfg = v.Config(nproc=2, global_batch=4, steps=4, warmup=1, timeout_s=3)
    chosen = v.select(cm, ["dp=2,mbs=1", "tp=2,mbs=1", "dp=2,mbs=1,zero=3", "dp=2,mbs=2", "tp=3"], cfg,
                      strict=True)
    rows, s = v.validate(cm, chosen, cfg, tmp_path, cmd=[sys.executable, "-c", FAKE])
    statuses = [r.measurement.status if r.measurement else "failed" for r in rows]
    assert statuses == ["ok", "failed", "timeout", "ok", "failed"]
    crashed = next(r for r in rows if r.measurement and r.measurement.status == "failed")
    assert "fake crash" in crashed.measurement.error and Path(crashed.measurement.log).is_file()
    assert "does not divide" in rows[-1].error  # tp=3 on 2 ranks: a strategy rule, reported with its reason
    assert s["ran"] == 2 and s["failed"] == 3
    files = rep.write_all(s, {"model": "gpt-tiny", "nproc": 2, "device": "cpu"}, tmp_path)
    assert all(f.stat().st_size > 0 for f in files)
    md = files[0].read_text()
    assert "fake crash" in md and "timeout" in md
    assert json.loads(files[1].read_text())["ran"] == 2


def test_auto_selects_at_least_eight_for_four_ranks():
    for model in ("gpt-small", "moe-tiny"):
        cm4 = build_cost_model(Inputs(model=model, gpu="cpu", nodes=1, gpus_per_node=4, seq_len=64, dtype="fp32"))[0]
        chosen = v.select(cm4, v.candidates(cm4, "auto", 4), v.Config(nproc=4, global_batch=16), strict=False)
        names = [r.strategy for r, _ in chosen]
        assert len(names) >= 8 and len(set(names)) == len(names)
        assert all(r.prediction is not None for r, _ in chosen)
        # context parallel is in the closed loop, alone and beside dp (dense and MoE)
        cps = {(s.split("cp=")[1].split(",")[0], s.split("dp=")[1].split(",")[0]) for s in names}
        assert {("4", "1"), ("2", "2")} <= cps, names


def test_cli_bad_input_is_one_line(run_cli, tmp_path):
    code, _, err = run_cli("validate", "gpt-tiny", "--nproc", "2", "--strategies", str(tmp_path / "missing.txt"))
    assert code == 2 and err.strip().count("\n") == 0 and "does not exist" in err
    code, _, err = run_cli("validate", "gpt-tiny", "--nproc", "2", "--steps", "2", "--warmup", "2")
    assert code == 2 and "--steps" in err


def test_merge_compares_pieces_as_one_set(run_cli, tmp_path):
    """--merge: runs of one configuration made in pieces give the summary of all their strategies."""
    rows = [_row("a", 1.0, 2.0, 100, 100), _row("b", 2.0, 1.0, 90, 100), _row("c", 3.0, 3.0, 110, 100),
            _row("dead", 0.5, 0.0, 1, 1, status="failed")]
    meta = {"model": "gpt-tiny", "nproc": 2, "device": "cpu", "profile": "cpu", "seq_len": 32, "global_batch": 4,
            "dtype": "fp32", "steps": 3, "warmup": 1, "load": "calm", "command": "autopar validate"}
    for name, part in (("p1", rows[:2]), ("p2", rows[2:])):
        rep.write_all(v.summarize(part), meta, tmp_path / name)
    pieces = f"{tmp_path / 'p1'},{tmp_path / 'p2'}"
    code, out, err = run_cli("validate", "gpt-tiny", "--nproc", "2", "--merge", pieces, "--out",
                             str(tmp_path / "all"), "--json")
    assert code == 0, err
    merged, whole = json.loads(out), v.summarize(rows)
    for key in ("ran", "failed", "spearman", "time_mape", "memory_mape", "max_memory_under_prediction",
                "predicted_best", "measured_best", "best_gap_pct"):
        assert merged[key] == pytest.approx(whole[key]), key
    assert (tmp_path / "all" / "validation.md").is_file()
    rep.write_all(v.summarize(rows[:1]), {**meta, "seq_len": 64}, tmp_path / "p3")
    for argv in (("--merge", f"{tmp_path / 'p1'},{tmp_path / 'p3'}"), ("--merge", str(tmp_path / "none")),
                 ("--merge", str(tmp_path / "p1"), "--nproc", "4")):
        code, _, err = run_cli("validate", "gpt-tiny", "--nproc", "2", *argv, "--out", str(tmp_path / "x"))
        assert code == 2 and err.strip().count("\n") == 0 and "--merge" in err


# ----- one real run -------------------------------------------------------------------------
@pytest.mark.slow
def test_end_to_end_two_strategies_on_two_ranks(tmp_path, run_cli):
    strategies = tmp_path / "s.txt"
    strategies.write_text("dp=2,mbs=1\ntp=2,mbs=1  # tensor parallel\n")
    code, out, err = run_cli("validate", "gpt-tiny", "--nproc", "2", "--strategies", str(strategies), "--steps",
                             "3", "--warmup", "1", "--seq-len", "32", "--global-batch", "4", "--out",
                             str(tmp_path / "out"), "--json")
    assert code == 0, err
    s = json.loads(out)
    assert s["ran"] == 2, s["strategies"]
    for r in s["strategies"]:
        assert r["measured_time_s"] > 0 and r["measured_mem_bytes"] > 0 and len(r["losses"]) == 3
    assert (tmp_path / "out" / "validation.png").stat().st_size > 10_000


# ----- the CPU-rank physics the closed loop needed (cost_models) ---------------------------
def test_processor_sharing_makespan():
    from autopar.cost_models.estimate import shared_makespan

    assert shared_makespan([1, 1, 1, 1], 2) == pytest.approx(2.0)      # 4 equal ranks on 2 cores: k = 2
    assert shared_makespan([1], 2) == pytest.approx(1.0)               # one rank uses one core at most
    # a heavy stage: all four share until the light ones finish, then it runs alone
    assert shared_makespan([2.05, 2, 2, 2.9], 2) == pytest.approx(4.9)


def test_busy_node_prices_collectives_from_the_all_ranks_fit():
    from autopar.cost_models.comm import CommFit
    from autopar.cost_models.layer_cost import busy_node_fits

    fits = [CommFit(kind="all_reduce", group_size=g, link="intra_node", alpha_s=a, beta_s_per_byte=1e-9, r2=1)
            for g, a in ((2, 1e-4), (4, 3e-3))] + \
           [CommFit(kind="p2p", group_size=2, link="intra_node", alpha_s=1e-4, beta_s_per_byte=1e-9, r2=1)]
    kept = busy_node_fits(fits, 4)
    assert sorted((f.kind, f.group_size) for f in kept) == [("all_reduce", 4), ("p2p", 2)]


def test_emitted_program_memory_terms():
    cm4 = build_cost_model(Inputs(model="gpt-small", gpu="cpu", nodes=1, gpus_per_node=4, seq_len=128,
                                  dtype="fp32"))[0]
    from autopar.core.strategy import Strategy

    dp = cm4.estimate(Strategy.parse("dp=4,mbs=1").resolve(4, 16)).worst_rank.memory
    assert dp["comm_buffers"] == pytest.approx(dp["gradients"])  # DDP's flat buckets: one gradient copy
    pp = cm4.estimate(Strategy.parse("pp=4,dp=1,mbs=1").resolve(4, 16)).worst_rank.memory
    assert pp["pipeline_buffers"] > 0
    tp = cm4.estimate(Strategy.parse("tp=4,dp=1,mbs=1").resolve(4, 16)).worst_rank.memory
    # the vocab-parallel embedding's gradient comes back full size on every tp rank
    assert tp["gradients"] > tp["parameters"]


def test_tp_module_counts_follow_the_unfused_torch_plan():
    from autopar.cost_models.layer_cost import _tp_modules

    cm1 = build_cost_model(Inputs(model="gpt-small", gpu="cpu", nodes=1, gpus_per_node=2, seq_len=64,
                                  dtype="fp32"))[0]
    block = next(t for t in cm1.templates if t.kind == "block")
    assert _tp_modules(block, sp=False) == (2, 4, 0)   # wo, w2 row-wise; wq, wk, wv, w1 column-wise
    assert _tp_modules(block, sp=True)[2] == 2         # attention_norm, ffn_norm under sequence parallel
