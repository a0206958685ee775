"""A measured GPU profile: the peak and curves reach the large-matrix regime (model ops count),
``--extend`` keeps the best peak and refits over both runs' points, and MFU stays against the
GPU type's datasheet peak when predictions come from a measured profile."""

from __future__ import annotations

import json

import pytest

from autopar.core.gpu import GpuProfile
from autopar.core.strategy import Strategy
from autopar.cost_models.compute import OpTimer
from autopar.cost_models.session import Inputs, build_cost_model
from autopar.profiles.hw import load_gpu_profile
from autopar.profiles.profiler import fit_all, points_meta, refit, stored_points
from autopar.profiles.profiler_sweep import (
    Point,
    SweepLimits,
    attention_shapes,
    efficiency,
    gemm_shapes,
    gpu_limits,
    membound_cases,
)


def _gpu_measured(tmp_path, peak_tflops: float = 67.74) -> str:
    """A measured profile of an H100 (no CPU cores) whose fitted peak is far below the datasheet."""
    data = load_gpu_profile("h100-sxm").model_dump()
    data.update(name="h100-fake-measured", aliases=[], peak_tflops={"bf16": peak_tflops}, cores=None,
                meta={"measured": True, "device": "NVIDIA H100 80GB HBM3"}, measured_ops={})
    path = tmp_path / "prof.json"
    path.write_text(json.dumps(data))
    return str(path)


def _estimate(**inp):
    cm, _, cluster, _ = build_cost_model(Inputs(model="gpt-tiny", seq_len=32, **inp))
    return cm.estimate(Strategy(dp=cluster.world, micro_batch=1, global_batch=cluster.world))


def test_mfu_uses_datasheet_peak_with_measured_gpu_profile(tmp_path):
    e = _estimate(gpu="h100-sxm", gpus_per_node=1, dtype="bf16", profile=_gpu_measured(tmp_path))
    assert e.peak_flops == pytest.approx(989.4e12)
    plain = _estimate(gpu="h100-sxm", gpus_per_node=1, dtype="bf16")
    assert plain.peak_flops == pytest.approx(989.4e12)


def test_mfu_fp8_basis_is_bf16_datasheet(tmp_path):
    e = _estimate(gpu="h100-sxm", gpus_per_node=1, dtype="fp8")
    assert e.peak_flops == pytest.approx(989.4e12)


def test_mfu_cpu_profile_keeps_its_own_peak():
    e = _estimate(gpu="cpu", gpus_per_node=1, dtype="fp32")
    assert e.peak_flops == pytest.approx(OpTimer(load_gpu_profile("cpu"), "fp32").peak)
    assert GpuProfile.model_validate(load_gpu_profile("cpu").model_dump()).cores is not None


# ----- the peak and curves of a measured GPU profile (gpu_truth bug 1) ---------------------
def _sweep_points(best: float = 100e12, t0: float = 8e-6) -> list[Point]:
    """A GPU-like sweep that never leaves the launch-bound regime: t = t0 + flops / best, up to 2.1 GFLOP,
    and elementwise ops at 3 TB/s."""
    pts = []
    for e in range(6, 37):
        x = 2.0 * 10 ** (e / 4)
        if x > 2.2e9:
            break
        fwd = t0 + x / best
        pts.append(Point("matmul", "sweep", x, x, x / 100, fwd, 2 * fwd, 2 * x))
    for e in range(10, 28):
        b = 2.0**e
        fwd = 5e-6 + b / 3e12
        pts.append(Point("membound", "sweep", b, 0.0, b, fwd, 2 * fwd))
    return pts


def _model_gemm(m: int, n: int, k: int, rate: float) -> Point:
    x = 2.0 * m * n * k
    fwd = x / rate
    return Point("matmul", f"linear {m}x{n}x{k}", x, x, 2 * (m * k + n * k + m * n), fwd, 2 * fwd, 2 * x,
                 from_model=True)


def _gpu_profile(points: list[Point]) -> GpuProfile:
    peak, bw, curves = fit_all(points)
    data = load_gpu_profile("h100-sxm").model_dump()
    data.update(name="fit", peak_tflops={"bf16": peak / 1e12}, mem_bw_gbps=bw / 1e9, matmul_eff=curves["matmul"],
                membound_eff=curves["membound"], attention_eff=curves["attention"], meta={"measured": True},
                measured_ops={}, stacks={}, gpu_constants={})
    return GpuProfile.model_validate(data)


def test_peak_counts_model_ops_and_untimed_2x_shape_scales():
    """Timed model GEMMs 7x faster than the sweep's best: the peak is theirs, and an untimed GEMM of twice
    the work (mbs 2) prices within 15% of twice the timed one (it was 20x slow on the H100)."""
    model = _model_gemm(4096, 4096, 4096, 700e12)
    prof = _gpu_profile(_sweep_points() + [model, _model_gemm(4096, 14336, 4096, 720e12)])
    assert prof.peak_tflops["bf16"] == pytest.approx(720, rel=1e-3)
    t = OpTimer(gpu=prof, dtype="bf16")
    f, b = t.gemm_fb(8192, 4096, 4096, 1, 2.0)
    assert f + b == pytest.approx(2 * model.total_s, rel=0.15)
    f4, b4 = t.gemm_fb(16384, 4096, 4096, 1, 2.0)  # past the largest timed point: flat, time ~ work
    assert (f4 + b4) / (f + b) == pytest.approx(2.0, rel=0.05)


def test_curve_never_grows_faster_than_work():
    prof = _gpu_profile(_sweep_points() + [_model_gemm(4096, 4096, 4096, 700e12)])
    t = OpTimer(gpu=prof, dtype="bf16")
    sizes = [2**i for i in range(6, 16)]
    times = [sum(t.gemm_fb(m, 4096, 4096, 1, 2.0)) for m in sizes]
    assert all(t2 <= 2 * t1 * 1.0001 for t1, t2 in zip(times, times[1:]))


def test_gpu_sweep_reaches_large_matrices_cpu_lists_unchanged():
    lim = gpu_limits(700e12)  # an H100's 4096^3 rate
    assert lim.big and (8192, 8192, 8192) in gemm_shapes(lim) and (32, 16384, 128) in attention_shapes(lim)
    assert max(r * w for _, r, w in membound_cases(lim)) == 2**27
    assert gpu_limits(1e11) == SweepLimits()  # a slow device keeps the CPU sizes
    cpu = SweepLimits()
    assert (len(gemm_shapes(cpu)), len(membound_cases(cpu)), len(attention_shapes(cpu))) == (159, 112, 51)
    assert max(2.0 * m * n * k for m, n, k in gemm_shapes(cpu)) <= 2.2e9


def test_extend_keeps_best_peak_and_refits_over_both_runs(tmp_path):
    """The second model's profile (slower GEMMs only) no longer replaces the first's peak (106 -> 68 on
    the H100), and the refitted curve holds both models' shapes."""
    first = {"peak_tflops": {"bf16": 0.0}, "mem_bw_gbps": 0.0, "meta": {"points": points_meta(
        _sweep_points() + [_model_gemm(4096, 4096, 4096, 700e12)])}}
    second = {"peak_tflops": {"bf16": 0.0}, "mem_bw_gbps": 0.0, "meta": {"points": points_meta(
        _sweep_points(60e12) + [_model_gemm(4096, 2048, 2048, 450e12)])}}
    for prof in (first, second):
        peak, bw, _ = fit_all(stored_points(prof))
        prof.update(peak_tflops={"bf16": peak / 1e12}, mem_bw_gbps=bw / 1e9)
    merged = refit(json.loads(json.dumps(second)), first)
    assert merged["peak_tflops"]["bf16"] == pytest.approx(first["peak_tflops"]["bf16"], rel=1e-3)
    xs = [x for x, _ in merged["matmul_eff"]]
    assert min(xs) < 1e6 and max(xs) > 1e11 and len(merged["meta"]["points"]) == 2 * len(first["meta"]["points"])


def test_extend_of_a_profile_without_points_reads_its_curves():
    """A profile written before meta.points: its curve points come back at its own peak, so the refit keeps
    that peak as a floor and its curve values."""
    old = {"peak_tflops": {"bf16": 100.0}, "mem_bw_gbps": 3000.0, "matmul_eff": [[1e6, 0.01], [1e9, 0.5]],
           "membound_eff": [[1e6, 0.2], [1e8, 0.9]], "attention_eff": [[1e7, 0.1]]}
    pts = stored_points(old)
    assert len(pts) == 5
    for p in pts:
        assert efficiency(p, 100e12, 3000e9) == pytest.approx(dict(map(tuple, old[f"{p.curve}_eff"]))[p.x])
    new = {"peak_tflops": {"bf16": 50.0}, "mem_bw_gbps": 1000.0, "meta": {"points": points_meta(_sweep_points(40e12))}}
    merged = refit(new, old)
    assert merged["peak_tflops"]["bf16"] >= 100.0 and merged["mem_bw_gbps"] >= 3000.0


def test_sweep_builds_tensors_only_for_cases_it_times(monkeypatch):
    """A GPU-sized list on a slow device: cases that cannot finish are skipped before their (GB) tensors
    exist, and the loop stops at the budget."""
    import torch

    from autopar.profiles import profiler_sweep as sw
    from autopar.profiles.profiler_timing import Clock

    made = []
    real = sw._gemm_case
    monkeypatch.setattr(sw, "_gemm_case", lambda *a: made.append(a[0]) or real(*a))
    pts = sw.run_sweep("matmul", torch.float32, "cpu", Clock("cpu", 1), 0.5, 0.0, None, gpu_limits(700e12))
    assert 0 < len(pts) == len(made) and max(2.0 * m * n * k for m, n, k in made) < 1e11
