"""benchmarks/kernel_rates.py --launch / --membound on the CPU (tiny sizes) and benchmarks/fit_kernel_rates.py:
the membound physics fit, host_launch_s from a trace or the launch loop, and --write into a profile copy."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import fit_kernel_rates as fit  # noqa: E402
import kernel_rates  # noqa: E402

from autopar.profiles.hw import load_gpu_profile  # noqa: E402

TRACE = {"step_time_s": 0.36, "kernel_launches": 5497, "kernel_busy_ms": 200.8}   # traced moe-mbs1 (docs/validation.md)


def test_the_membound_fit_recovers_the_physics_curve():
    bw, e_max, t0 = 3350.0, 0.62, 4e-6
    rows = [{"bytes": x, "time_s": x / (e_max * bw * 1e9) + t0} for x in (2**20, 2**24, 2**28, 2**32)]
    got_e, got_t0 = fit.fit_membound(rows, bw)
    assert got_e == pytest.approx(e_max, rel=1e-6) and got_t0 == pytest.approx(t0, rel=1e-6)
    pts = fit.curve(got_e, got_t0, bw)
    assert pts[-1][1] == pytest.approx(e_max, rel=1e-2) and pts[0][1] < 0.01   # launch-bound at 1 kB
    with pytest.raises(fit.InputError, match="do not grow"):   # a CPU smoke run's noise: no curve written
        fit.fit_membound([{"bytes": 2e6, "time_s": 7e-5}, {"bytes": 3e6, "time_s": 8e-5},
                          {"bytes": 1.5e6, "time_s": 1e-4}], bw)
    with pytest.raises(fit.InputError, match="same bytes"):   # one size: bandwidth and launch time not separable
        fit.fit_membound([{"bytes": 2e6, "time_s": 7e-5}, {"bytes": 2e6, "time_s": 8e-5}], bw)


def test_host_launch_from_a_host_bound_trace_or_the_launch_loop():
    s, how = fit.host_launch([], TRACE)
    assert s == pytest.approx(0.36 / 5497) and "5497" in how
    rows = [{"kind": "launch", "mode": "autograd", "host_launch_s": 1.2e-5}]
    assert fit.host_launch(rows, None)[0] == 1.2e-5
    with pytest.raises(fit.InputError, match="GPU-bound"):   # llama-gpu's trace: kernels busy 279 of 297 ms
        fit.host_launch(rows, {"step_time_s": 0.297, "kernel_launches": 3286, "kernel_busy_ms": 279.1})


def test_cpu_smoke_run_then_fit_and_write_a_profile_copy(tmp_path, capsys):
    out = tmp_path / "rates.json"
    assert kernel_rates.main(["--device", "cpu", "--launch", "--membound", "--max-mb", "1", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert {r["kind"] for r in rows} == {"launch", "membound"}
    assert all(r["host_launch_s"] > 0 for r in rows if r["kind"] == "launch")
    # a CPU's 1 MB rows do not fit a curve (the cast can run slower than the copy): fit an H100-like set instead
    rows = [r for r in rows if r["kind"] == "launch"] + [
        {"kind": "membound", "bytes": x, "time_s": x / (0.6 * 3350e9) + 3e-6} for x in (2**20, 2**24, 2**28)]
    out.write_text(json.dumps({"rows": rows}))
    prof = tmp_path / "h100-sxm.yaml"
    shutil.copy(ROOT / "profiles" / "hardware" / "h100-sxm.yaml", prof)
    before = prof.read_text().splitlines()
    trace = tmp_path / "summary-moe-mbs1.json"   # gpu_trace.py's name: the case whose op calls the count divides
    trace.write_text(json.dumps(TRACE))
    assert fit.main([str(out), "--gpu", str(prof), "--trace", str(trace), "--write"]) == 0
    after = prof.read_text().splitlines()
    changed = [b for a, b in zip(before, after) if a != b]
    assert len(before) == len(after) and len(changed) == 6   # membound, host launch, kernels per call; their sources
    gpu = load_gpu_profile(prof)
    assert gpu.host_launch_s == pytest.approx(0.36 / 5497, rel=1e-2)
    assert gpu.kernels_per_op_call == pytest.approx(5497 / (3 * 948), rel=1e-2)   # 237 op calls x 4 micro-batches
    assert gpu.backward_launch_ratio == 2.0 and "held" in gpu.sources["kernels_per_op_call"]
    assert "fit_kernel_rates.py" in gpu.sources["membound_eff"] and "5497" in gpu.sources["host_launch_s"]
    assert not list(tmp_path.glob("*.fitcheck.yaml"))


def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys):
    empty = tmp_path / "rates.json"
    empty.write_text(json.dumps({"rows": []}))
    assert fit.main([str(empty), "--gpu", "h100-sxm"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--membound" in err
    assert fit.main([str(empty), "--gpu", "no-such-gpu"]) == 2


def _summaries(tmp_path, counts: dict[str, int]) -> list[Path]:
    paths = []
    for case, n in counts.items():
        paths.append(tmp_path / f"summary-{case}.json")
        paths[-1].write_text(json.dumps({"kernel_launches": n}))
    return paths


def test_kernel_counts_fit_k_and_the_backward_ratio_where_a_recompute_case_separates_them(tmp_path):
    prof = ROOT / "profiles" / "hardware" / "h100-sxm.yaml"
    none = fit.traced_calls(_summaries(tmp_path, {"llama-mbs1": 1})[0], prof)
    full = fit.traced_calls(_summaries(tmp_path, {"llama-mbs1-full": 1})[0], prof)
    assert none[1] == 0 and 0 < full[1] < full[0] and full[0] == none[0]   # full re-runs the forward less its tail
    k, ratio = 2.1, 1.7   # counts a program with these constants would launch
    counts = {c: round(k * (f * (1 + ratio) + r)) for c, (f, r) in (("llama-mbs1", none), ("llama-mbs1-full", full))}
    got_k, got_ratio, how = fit.launch_counts(_summaries(tmp_path, counts), prof, 2.0)
    assert got_k == pytest.approx(k, rel=1e-3) and got_ratio == pytest.approx(ratio, rel=1e-2) and "fitted" in how
    got_k, got_ratio, _ = fit.launch_counts(_summaries(tmp_path, {"llama-mbs1": counts["llama-mbs1"]}), prof, 2.0)
    assert got_ratio is None and got_k == pytest.approx(k * (1 + ratio) / 3, rel=1e-3)   # one case: k at ratio 2


def test_a_trace_not_named_for_a_case_is_one_line(tmp_path, capsys):
    rates = tmp_path / "rates.json"
    rates.write_text(json.dumps({"rows": [{"kind": "membound", "bytes": 2**20 * m, "time_s": 1e-6 * m}
                                          for m in (1, 4, 16)]
                                + [{"kind": "launch", "mode": "autograd", "host_launch_s": 1e-5}]}))
    odd = tmp_path / "moe.json"
    odd.write_text(json.dumps({"kernel_launches": 10}))
    assert fit.main([str(rates), "--gpu", "h100-sxm", "--count-trace", str(odd)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "summary-<case>.json" in err
