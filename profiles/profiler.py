"""``autopar profile``: time a model's ops and fit the device's efficiency curves.

``profile_device(...)`` returns a measured hardware profile as a dict that *is* a
``GpuProfile`` (``load_gpu_profile`` reads it): peaks and curves fitted to this device, the
measured op table (``measured_ops``: op signature -> [forward s, backward s, spread]) and
``meta`` (device, torch version, dtype, threads, date, command). Steps:

1. capture the model (identical blocks form one group: repeated layers are timed once) and
   time every distinct op signature forward and backward (``profiler_ops``, ``profiler_timing``);
2. sweep GEMM, memory-bound and attention shapes (``profiler_sweep``; sized for the device);
3. fit the peaks and curves from the sweep points plus the model's own ops.

Every timed point is kept in ``meta.points``: ``autopar profile --extend`` refits the peaks and
curves over the union of both runs' points (``refit``), so a second model never lowers the peak
the first one measured.

The budget is wall-clock seconds for steps 1-2 together: ops get up to ``OPS_SHARE`` of it,
the sweeps the rest (and whatever the ops left).
"""

from __future__ import annotations

import datetime
import os
import platform
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from autopar.core.model_spec import ModelSpec
from autopar.errors import InputError
from autopar.profiles.graph import DTYPES
from autopar.profiles.profiler_ops import ModelOps, OpSample, model_ops
from autopar.profiles.profiler_sweep import (
    BWD_RATIO,
    Point,
    SweepLimits,
    fit_curve,
    peak_bandwidth,
    peak_flops,
    run_sweep,
    sweep_limits,
)
from autopar.profiles.profiler_timing import Clock, engine_overhead, grad_runner, time_fwd_bwd

OPS_SHARE = 0.45
SWEEP_SHARES = {"matmul": 0.4, "membound": 0.35, "attention": 0.25}
MEMBOUND_KINDS = ("add", "mul", "gelu", "silu", "softmax", "layernorm", "rmsnorm", "dropout", "other")
Log = Callable[[str], None]


@dataclass
class ProfileRun:
    """What the command prints and writes."""

    profile: dict
    lines: list[str] = field(default_factory=list)
    op_rows: list[tuple[str, int, float, float, float]] = field(default_factory=list)  # sig, n, fwd, bwd, spread
    wall_s: float = 0.0


def check_device(device: str) -> str:
    if device == "cpu":
        return device
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise InputError(f"--device {device}: CUDA is not available here; use --device cpu")
        return device
    raise InputError(f"--device: '{device}' is not cpu or cuda")


def profile_device(spec: ModelSpec, seq_len: int, micro_batch: int, dtype: str, device: str, threads: int,
                   budget_s: float, name: str, command: str, log: Log = print) -> ProfileRun:
    t0 = time.perf_counter()
    if dtype not in DTYPES:
        raise InputError(f"--dtype: '{dtype}' is not one of {', '.join(DTYPES)}")
    device = check_device(device)
    if device == "cpu":
        torch.set_num_threads(threads)
    overhead = _resident_bytes(device)
    clock = Clock(device, threads if device == "cpu" else 0)
    engine = engine_overhead(clock, device)
    log(f"clock: {clock.kind}; autograd start-up {engine * 1e6:.1f} us per backward call (subtracted)")
    run = ProfileRun(profile={})
    mops = model_ops(spec, seq_len, micro_batch, dtype, device)
    _log_groups(mops, log, run)
    points = _time_ops(mops, clock, budget_s * OPS_SHARE, engine, log, run)
    lim = sweep_limits(device, DTYPES[dtype], clock)
    if lim.big:
        log(f"sweep sizes: GEMMs up to {lim.gemm_flops:.3g} FLOP, attention {lim.attention_flops:.3g}, "
            f"elementwise 2^{lim.membound_log2} elements")
    left = budget_s - (time.perf_counter() - t0)
    for curve, share in SWEEP_SHARES.items():
        points += run_sweep(curve, DTYPES[dtype], device, clock, max(left * share, 1.0), engine, log, lim)
    run.profile = _assemble(points, mops, dtype, device, threads, name, command, overhead, clock, engine,
                            seq_len, micro_batch, spec)
    run.profile["meta"]["sweep_limits"] = _limits_meta(lim)
    run.wall_s = time.perf_counter() - t0
    run.profile["meta"]["profile_wall_s"] = round(run.wall_s, 1)
    return run


def _log_groups(mops: ModelOps, log: Log, run: ProfileRun) -> None:
    for g in mops.groups:
        layers = f"{g.count} layers share 1 signature: timed once" if g.count > 1 else "1 layer"
        line = f"{g.name}: {layers} ({g.ops} ops, {g.distinct} distinct op signatures)"
        run.lines.append(line)
        log(line)
    total = sum(g.distinct for g in mops.groups)
    line = f"{len(mops.samples)} distinct op signatures to time ({total} per group, shared ones timed once)"
    run.lines.append(line)
    log(line)
    for s in mops.skipped:
        log(f"skipped: {s}")


def _time_ops(mops: ModelOps, clock: Clock, budget_s: float, engine: float, log: Log,
              run: ProfileRun) -> list[Point]:
    """Time each distinct op; its timing becomes a measured entry and a curve point."""
    deadline = time.perf_counter() + budget_s
    todo = [s for s in mops.samples if s.call is not None]
    points = []
    for i, s in enumerate(todo):
        per_op = max(0.5, (deadline - time.perf_counter()) / (len(todo) - i))
        fwd, fwd_bwd = grad_runner(s.call, s.wrt)
        t = time_fwd_bwd(fwd, fwd_bwd, clock, per_op, engine)
        s.timing = t
        run.op_rows.append((s.sig, s.instances, t.fwd_s, t.bwd_s, t.spread))
        log(f"op {i + 1}/{len(todo)} {s.sig}: fwd {t.fwd_s * 1e6:.1f} us, bwd {t.bwd_s * 1e6:.1f} us, "
            f"spread {100 * t.spread:.1f}% (x{s.instances} in the model)")
        p = _as_point(s, t.fwd_s, t.bwd_s)
        if p is not None:
            points.append(p)
    return points


def _as_point(s: OpSample, fwd: float, bwd: float) -> Point | None:
    """A model op as a curve point (the curves then fit the model's own shapes too)."""
    op = s.op
    if op.gemm_mnk and op.kind == "linear" and op.gemm_batch == 1:
        m, n, k = op.gemm_mnk
        curve, x = "matmul", 2.0 * m * n * k
    elif op.kind == "sdpa":
        curve, x = "attention", op.fwd_flops
    elif op.kind in MEMBOUND_KINDS and not op.gemm_mnk:
        curve, x = "membound", op.bytes_rw
    else:
        return None
    return Point(curve, s.sig, x, op.fwd_flops, op.bytes_rw, fwd, bwd, op.bwd_flops, from_model=True)


def _measured_table(mops: ModelOps, dtype: str) -> dict[str, list[float]]:
    """Whole ops by op signature, and GEMMs also per call by (m, n, k) (any strategy that
    produces that local GEMM hits it)."""
    table: dict[str, list[float]] = {}
    for s in mops.samples:
        t = s.timing
        if t is None:
            continue
        table[s.sig] = [_r(t.fwd_s), _r(t.bwd_s), round(t.spread, 4)]
        if s.gemm_sig:
            b = s.op.gemm_batch
            table.setdefault(s.gemm_sig, [_r(t.fwd_s / b), _r(t.bwd_s / b), round(t.spread, 4)])
    return table


def _r(x: float) -> float:
    return float(f"{x:.4g}")


def _assemble(points, mops, dtype, device, threads, name, command, overhead, clock, engine,
              seq_len, micro_batch, spec) -> dict:
    if not any(p.curve == "matmul" for p in points) or not any(p.curve == "membound" and not p.from_model
                                                                for p in points):
        raise InputError("--budget-s: too small to time any GEMM or memory-bound sweep point; raise it")
    peak, bw, curves = fit_all(points)
    info = device_info(device, threads)
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    how = f"measured by `{command}` on {info['device']}, {date}"
    counts = {c: sum(p.curve == c for p in points) for c in curves}
    return {
        "name": name,
        "description": f"measured: {info['device']}, {info['threads']} thread(s) per rank, torch {info['torch']}, "
                       f"{dtype}",
        "peak_tflops": {dtype: _peak_tflops(peak)},
        "mem_capacity_bytes": info["mem_bytes"],
        "mem_bw_gbps": _bw_gbps(bw),
        "framework_overhead_bytes": overhead,
        "usable_mem_fraction": 0.9,
        "fused_elementwise": False,  # ops were timed one by one, as eager PyTorch runs them
        "matmul_eff": curves["matmul"],
        "membound_eff": curves["membound"],
        "attention_eff": curves["attention"],
        "sources": _sources(how, counts, info, device),
        "cores": info["cores"] if device == "cpu" else None,
        "threads_per_rank": threads if device == "cpu" else 1,
        "measured_ops": _measured_table(mops, dtype),
        "meta": {"measured": True, "device": info["device"], "torch": torch.__version__, "dtype": dtype,
                 "threads": threads if device == "cpu" else None, "date": date, "command": command,
                 "clock": clock.kind, "autograd_startup_s": _r(engine), "model": spec.name,
                 "seq_len": seq_len, "micro_batch": micro_batch, "sweep_points": counts,
                 "python": platform.python_version(), "points": points_meta(points)},
    }


def fit_all(points: list[Point], floor: tuple[float, float] = (0.0, 0.0)) -> tuple[float, float, dict]:
    """(GEMM peak FLOP/s, bandwidth bytes/s, the three curves) of a set of timed points; ``floor``:
    peaks measured before whose points are gone (a profile written before ``meta.points``)."""
    peak, bw = max(peak_flops(points), floor[0]), max(peak_bandwidth(points), floor[1])
    curves = {c: fit_curve([p for p in points if p.curve == c], peak, bw, 4 if c == "matmul" else 2,
                           monotone=c != "membound") for c in ("matmul", "membound", "attention")}
    if not curves["attention"]:
        curves["attention"] = curves["matmul"]
    return peak, bw, curves


def _peak_tflops(peak: float) -> float:
    return round(peak / 1e12, 5)


def _bw_gbps(bw: float) -> float:
    return round(bw / 1e9, 3)


def _limits_meta(lim: SweepLimits) -> dict:
    return {"gemm_flops": _r(lim.gemm_flops), "attention_flops": _r(lim.attention_flops),
            "membound_elements": 2**lim.membound_log2}


def _sources(how: str, counts: dict, info: dict, device: str) -> dict[str, str]:
    cap = ("RAM (/proc/meminfo MemTotal) split over one rank per core" if device == "cpu"
           else "torch.cuda.get_device_properties().total_memory")
    return {
        "peak_tflops": f"best GEMM FLOP/s (linear forward, or forward + backward) {how}",
        "mem_bw_gbps": f"best elementwise bytes/s (forward, or 3x bytes over forward + backward) {how}",
        "mem_capacity_bytes": f"{cap}; {how}",
        "framework_overhead_bytes": f"resident memory after import torch, before the model; {how}",
        "usable_mem_fraction": "estimate: 10% reserve for the Python heap and allocator slack",
        "matmul_eff": f"median per quarter decade of {counts['matmul']} timed linears (sweep + model ops) {how}",
        "membound_eff": f"median per half decade of {counts['membound']} timed elementwise/norm ops {how}",
        "attention_eff": f"median per half decade of {counts['attention']} timed causal SDPA calls {how}",
    }


def device_info(device: str, threads: int) -> dict:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    if device.startswith("cuda"):
        props = torch.cuda.get_device_properties(torch.device(device))
        return {"device": props.name, "cores": cores, "threads": 1, "torch": torch.__version__,
                "mem_bytes": int(props.total_memory)}
    return {"device": f"{_cpu_model()} ({cores} cores)", "cores": cores, "threads": threads,
            "torch": torch.__version__, "mem_bytes": _mem_total() // max(1, cores // threads)}


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "CPU"


def _mem_total() -> int:
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 8 * 2**30


def _resident_bytes(device: str) -> int:
    if device.startswith("cuda"):
        torch.cuda.init()
        free, total = torch.cuda.mem_get_info()
        return int(total - free)
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return 512 * 2**20


POINT_FIELDS = ("curve", "x", "flops", "bytes_rw", "fwd_s", "bwd_s", "bwd_flops", "from_model")


def points_meta(points: list[Point]) -> list[list]:
    """Every timed point as ``POINT_FIELDS`` (4 significant digits): what ``refit`` reads back."""
    return [[p.curve, _r(p.x), _r(p.flops), _r(p.bytes_rw), _r(p.fwd_s), _r(p.bwd_s), _r(p.bwd_flops),
             int(p.from_model)] for p in points if p.total_s > 0]


def stored_points(prof: dict) -> list[Point]:
    """The timed points of a measured profile: ``meta.points``, or for a profile written before they
    were kept, one point per curve point that reproduces it (``curve_point``)."""
    rows = prof.get("meta", {}).get("points")
    if rows:
        return [Point(r[0], "stored", *map(float, r[1:7]), from_model=bool(r[7])) for r in rows]
    peak, bw = next(iter(prof["peak_tflops"].values())) * 1e12, prof["mem_bw_gbps"] * 1e9
    return [curve_point(c, x, eff, peak, bw) for c in ("matmul", "membound", "attention")
            for x, eff in prof.get(f"{c}_eff") or []]


def curve_point(curve: str, x: float, eff: float, peak: float, bw: float) -> Point:
    """A point whose ``efficiency`` at (``peak``, ``bw``) is ``eff`` (backward = BWD_RATIO x forward)."""
    ratio = BWD_RATIO[curve]
    total = (1 + ratio) * x / (eff * (bw if curve == "membound" else peak))
    fwd = total / (1 + ratio)
    if curve == "membound":
        return Point(curve, "curve", x, 0.0, x, fwd, total - fwd)
    return Point(curve, "curve", x, x, 0.0, fwd, total - fwd, ratio * x)


def refit(prof: dict, old: dict) -> dict:
    """``prof`` with peaks and curves refitted over its points and ``old``'s (``--extend``): the
    best peak of both runs, curves through both models' shapes. A profile of another dtype is left."""
    if set(prof["peak_tflops"]) != set(old.get("peak_tflops", {})):
        return prof
    points = stored_points(prof) + stored_points(old)
    floor = (next(iter(old["peak_tflops"].values())) * 1e12, old["mem_bw_gbps"] * 1e9)
    peak, bw, curves = fit_all(points, floor)
    dtype = next(iter(prof["peak_tflops"]))
    prof.update(peak_tflops={dtype: _peak_tflops(peak)}, mem_bw_gbps=_bw_gbps(bw), matmul_eff=curves["matmul"],
                membound_eff=curves["membound"], attention_eff=curves["attention"])
    prof["meta"]["points"] = points_meta(points)
    prof["meta"]["sweep_points"] = {c: sum(p.curve == c for p in points) for c in curves}
    return prof
