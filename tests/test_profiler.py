"""`autopar profile`: timing, curve fitting, a tiny model end to end, and atomic writes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from autopar.core.cluster import ClusterSpec, LinkClass
from autopar.core.gpu import GpuProfile
from autopar.core.strategy import Strategy
from autopar.cost_models.compute import OpTimer, op_signature
from autopar.cost_models.layer_cost import PricingContext, price_layer
from autopar.cost_models.templates import build_templates
from autopar.profiles.hw import load_gpu_profile
from autopar.profiles.intake import preset
from autopar.profiles.profiler import profile_device
from autopar.profiles.profiler_sweep import Point, efficiency, fit_curve
from autopar.profiles.profiler_timing import Clock, measure, spread_of

SEQ = 32


@pytest.fixture(scope="module")
def tiny_run():
    """One real profile of gpt-tiny at seq 32 with a small budget (shared by several tests)."""
    torch.set_num_threads(1)
    lines: list[str] = []
    run = profile_device(preset("gpt-tiny"), SEQ, 1, "fp32", "cpu", 1, 4.0, "cpu-test", "pytest", lines.append)
    return run, lines


def _cluster(ranks: int = 1) -> ClusterSpec:
    link = LinkClass(bw_gbps=1.0, latency_s=1e-5)
    return ClusterSpec(gpu="cpu", nodes=1, gpus_per_node=ranks, intra_node=link, inter_node=link)


# ----- timing ---------------------------------------------------------------------------
def test_spread_is_iqr_over_median():
    assert spread_of([1.0, 2.0]) == 0.0                      # too few samples
    assert spread_of([10.0] * 5) == 0.0
    assert spread_of([1.0, 2.0, 3.0, 4.0, 5.0]) == pytest.approx((4 - 2) / 3)


def test_measure_stops_when_stable_and_respects_budget():
    x = torch.randn(64, 64)
    m = measure(lambda: x @ x, Clock("cpu", 1), budget_s=0.5)
    assert m.median_s > 0 and m.samples >= 3
    t0 = time.perf_counter()
    measure(lambda: time.sleep(0.002), Clock("cpu", 2), budget_s=0.05)  # wall clock with 2 threads
    assert time.perf_counter() - t0 < 1.0


# ----- curves ----------------------------------------------------------------------------
def _profile_with(curves: dict, peak: float, bw: float) -> GpuProfile:
    base = load_gpu_profile("h100-sxm").model_dump()
    base.update(peak_tflops={"fp32": peak / 1e12}, mem_bw_gbps=bw / 1e9, **curves)
    return GpuProfile.model_validate(base)


def test_fitted_curves_reproduce_their_points():
    """The efficiency of a point is defined so that OpTimer gives back its fwd + bwd time."""
    gemm = Point("matmul", "g", 2e8, 2e8, 1e5, fwd_s=2e-3, bwd_s=4.4e-3, bwd_flops=4e8)
    ew = Point("membound", "e", 4e6, 1e6, 4e6, fwd_s=1e-4, bwd_s=1.5e-4)
    peak, bw = 1.5e11, 2e11
    prof = _profile_with({"matmul_eff": fit_curve([gemm], peak, bw), "membound_eff": fit_curve([ew], peak, bw),
                          "attention_eff": [[1.0, 0.5]]}, peak, bw)
    t = OpTimer(gpu=prof, dtype="fp32")
    f, b = t.gemm_fb(1000, 1000, 100, 1, 2.0)
    assert f + b == pytest.approx(gemm.total_s, rel=1e-3)
    assert 3 * t.membound(4e6) == pytest.approx(ew.total_s, rel=1e-3)
    assert 0 < efficiency(gemm, peak, bw) <= 1


def test_fit_curve_buckets_by_median():
    pts = [Point("matmul", str(e), x, x, 1, x / 1e11 / e, 2 * x / 1e11 / e, 2 * x)
           for x, e in ((1e6, 0.2), (1.1e6, 0.3), (1.2e6, 0.4), (1e8, 0.8))]
    curve = fit_curve(pts, 1e11, 1e11)
    assert len(curve) == 2 and curve[0][1] == pytest.approx(0.3) and curve[1][1] == pytest.approx(0.8)


# ----- a tiny model end to end -----------------------------------------------------------------
def test_tiny_profile_is_a_loadable_gpu_profile(tiny_run):
    run, lines = tiny_run
    prof = GpuProfile.model_validate(run.profile)
    assert prof.cores and prof.threads_per_rank == 1 and not prof.fused_elementwise
    assert prof.meta["measured"] and prof.meta["dtype"] == "fp32" and prof.meta["torch"] == torch.__version__
    assert {"device", "date", "threads", "command", "clock"} <= set(prof.meta)
    assert "fp32" in prof.peak_tflops and prof.mem_bw_gbps > 0
    assert any("4 layers share 1 signature: timed once" in line for line in lines)


def test_every_block_op_is_measured_and_hit_at_its_shape(tiny_run):
    run, _ = tiny_run
    prof = GpuProfile.model_validate(run.profile)
    block = next(t for t in build_templates(preset("gpt-tiny"), SEQ, "fp32", fuse=False) if t.kind == "block")
    assert all(op.sig in prof.measured_ops for op in block.ops)
    timer = OpTimer(gpu=prof, dtype="fp32")
    cost = price_layer(block, Strategy.parse("dp=1").resolve(1, 1), PricingContext(_cluster(), timer, 4, 64, SEQ))
    assert cost.source_counts["measurement"] == len(block.ops) and cost.source_counts["fit"] == 0
    assert cost.fwd_s == pytest.approx(sum(prof.measured_ops[op.sig][0] for op in block.ops))
    bigger = price_layer(block, Strategy.parse("dp=1,mbs=2").resolve(1, 2),
                         PricingContext(_cluster(), OpTimer(gpu=prof, dtype="fp32"), 4, 64, SEQ))
    assert bigger.source_counts["fit"] > 0  # other shapes: the fitted curves


def test_signature_tells_ops_apart():
    a = op_signature("linear", [[1, 8, 64]], [[1, 8, 64]], "float32", "wq")
    b = op_signature("linear", [[1, 8, 64]], [[1, 8, 256]], "float32", "w1")
    c = op_signature("other", [[1, 8, 64]], [[1, 8, 64]], "float32", "reshape_3")
    assert a != b and c.startswith("other/reshape:")


# ----- the command ---------------------------------------------------------------------------
def test_cli_profile_writes_a_profile(run_cli, tmp_path):
    out = tmp_path / "cpu-mine.json"
    code, stdout, err = run_cli("profile", "gpt-tiny", "--seq-len", "16", "--budget-s", "3", "--out", str(out),
                                "--alias", "mine")
    assert code == 0, err
    prof = load_gpu_profile(out)
    assert prof.name == "cpu-mine" and prof.aliases == ["mine"]
    assert "timed once" in stdout and "wrote" in stdout


def test_cli_profile_bad_input(run_cli, tmp_path):
    code, _, err = run_cli("profile", "gpt-tiny", "--dtype", "int8", "--budget-s", "1", "--out",
                           str(tmp_path / "x.json"))
    assert code == 2 and err.startswith("error: --dtype") and len(err.strip().splitlines()) == 1
    code, _, err = run_cli("profile", "gpt-tiny", "--device", "tpu", "--out", str(tmp_path / "x.json"))
    assert code == 2 and "--device" in err


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT])
def test_killing_profile_midway_keeps_the_previous_file(tmp_path, sig):
    """Kill `autopar profile` once it is timing: the previous profile stays byte-identical
    and no temporary file is left next to it."""
    out = tmp_path / "cpu-prev.json"
    previous = b'{"previous": "profile"}\n'
    out.write_bytes(previous)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, "-m", "autopar", "profile", "gpt-tiny", "--seq-len", "16",
                             "--budget-s", "60", "--out", str(out)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=env,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # CI may ignore it
    try:
        for line in proc.stdout:
            if " sweep " in line:  # ops timed, sweeps running: midway
                break
        proc.send_signal(sig)
        proc.wait(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == (130 if sig == signal.SIGINT else -signal.SIGKILL)  # 130: "error: interrupted"
    assert out.read_bytes() == previous
    assert [p.name for p in tmp_path.iterdir()] == [out.name]


def test_write_is_atomic_when_interrupted(tmp_path, monkeypatch):
    """An exception while the new file is written leaves the old one and no temp file."""
    from autopar import fileio

    out = tmp_path / "p.json"
    out.write_text("old")

    class Boom(Exception):
        pass

    def fail_replace(*a):
        raise Boom

    monkeypatch.setattr(fileio.os, "replace", fail_replace)
    with pytest.raises(Boom):
        fileio.write_atomic(out, json.dumps({"new": 1}))
    assert out.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["p.json"]


def test_shipped_cpu_profile_is_measured():
    prof = load_gpu_profile("cpu")
    assert prof.meta.get("measured") and prof.cores and prof.threads_per_rank == 1
    assert prof.measured_ops and prof.comm_fits
    assert "autopar profile" in prof.sources["matmul_eff"]
    assert Path(load_gpu_profile("cpu-placeholder").name) == Path("cpu")
