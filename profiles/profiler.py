"""``autopar profile``: time a model's ops and fit the device's efficiency curves.

``profile_device(...)`` returns a measured hardware profile as a dict that *is* a
``GpuProfile`` (``load_gpu_profile`` reads it): peaks and curves fitted to this device, the
measured op table (``measured_ops``: op signature -> [forward s, backward s, spread]) and
``meta`` (device, torch version, dtype, threads, date, command). Steps:

1. capture the model (identical blocks form one group: repeated layers are timed once) and
   time every distinct op signature forward and backward (``profiler_ops``, ``profiler_timing``);
2. sweep GEMM, memory-bound and attention shapes (``profiler_sweep``);
3. fit the curves from the sweep points plus the model's own ops.

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
from autopar.profiles.profiler_sweep import Point, fit_curve, peak_bandwidth, peak_flops, run_sweep
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
    left = budget_s - (time.perf_counter() - t0)
    for curve, share in SWEEP_SHARES.items():
        points += run_sweep(curve, DTYPES[dtype], device, clock, max(left * share, 1.0), engine, log)
    run.profile = _assemble(points, mops, dtype, device, threads, name, command, overhead, clock, engine,
                            seq_len, micro_batch, spec)
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
    if not any(p.curve == "matmul" for p in points) or not any(p.curve == "membound" for p in points):
        raise InputError("--budget-s: too small to time any GEMM or memory-bound sweep point; raise it")
    peak, bw = peak_flops(points), peak_bandwidth(points)
    curves = {c: fit_curve([p for p in points if p.curve == c], peak, bw, 4 if c == "matmul" else 2,
                           monotone=c != "membound") for c in ("matmul", "membound", "attention")}
    if not curves["attention"]:
        curves["attention"] = curves["matmul"]
    info = device_info(device, threads)
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    how = f"measured by `{command}` on {info['device']}, {date}"
    counts = {c: sum(p.curve == c for p in points) for c in curves}
    return {
        "name": name,
        "description": f"measured: {info['device']}, {info['threads']} thread(s) per rank, torch {info['torch']}, "
                       f"{dtype}",
        "peak_tflops": {dtype: round(peak / 1e12, 5)},
        "mem_capacity_bytes": info["mem_bytes"],
        "mem_bw_gbps": round(bw / 1e9, 3),
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
                 "python": platform.python_version()},
    }


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
