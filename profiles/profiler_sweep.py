"""Sweeps that fit a device's efficiency curves, and the fit itself.

Each sweep point is one op timed forward and backward (``profiler_timing``); a point becomes
``(x, eff)`` on a curve the way ``cost_models.compute.OpTimer`` reads it back, so that the
curve reproduces the measured forward + backward time of the point:

- GEMM (``nn.functional.linear`` with bias, x = 2mnk): OpTimer prices forward = flops /
  (peak * eff) and backward = forward * bwd_flops / fwd_flops, so eff = (fwd + bwd FLOPs) /
  ((fwd + bwd seconds) * peak).
- memory bound (add, mul, gelu, silu, softmax, layer_norm, copy of a transposed tensor; x =
  bytes read + written as the graph counts them): backward = 2 x forward, so eff =
  3 * bytes / ((fwd + bwd seconds) * bandwidth).
- attention (causal SDPA, x = its forward FLOPs 4*b*h*s^2*d): backward = 2.5 x forward.

Per curve, points are bucketed by quarter (matmul) or half decades of x and the median
efficiency of each bucket kept (at the bucket's median x). GEMM and attention curves are made
non-decreasing (isotonic fit: their dips are noise); the memory-bound curve is kept as measured,
because on CPU it really falls past ~32 MB (fresh buffers come from mmap and page-fault).
The GEMM peak is the best FLOP/s of the sweep cases *and* the model's own linears (on a GPU the
model's 4096^3 GEMM runs at 739 TFLOP/s where a CPU-sized sweep never left the launch-bound
regime: 106); the bandwidth peak is the best elementwise bytes/s of the sweep cases (a model op
can be a copy the capture counted that ran as a view, so model ops join the memory-bound curve
only below that peak). Past the largest timed point a curve stays flat (``EffCurve.at`` clamps):
time grows with the work, never faster.

Sizes (``sweep_limits``): on CPU the largest GEMM / attention case is 2.2 GFLOP and elementwise
2^23 elements; on a GPU a first timing of a 4096^3 GEMM sets the GEMM limit (the FLOPs it runs in
``GPU_GEMM_TARGET_S``, up to 8192^3-class GEMMs), attention reaches seq 16k at d=128 and
elementwise 2^27 elements (past the 50 MB L2), within the budget.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from statistics import median
from typing import Callable

import torch
import torch.nn.functional as F

from autopar.profiles.profiler_timing import Clock, grad_runner, measure, time_fwd_bwd

BWD_RATIO = {"matmul": 2.0, "membound": 2.0, "attention": 2.5}   # what OpTimer assumes per curve
MAX_GEMM_FLOPS = 2.2e9   # CPU: efficiencies have flattened out well before (~1e8)
GPU_MAX_GEMM_FLOPS = 1.2e12   # 2 * 8192^3 = 1.1e12: H100 cuBLAS is flat from there (764 TFLOP/s at 8192^3)
GPU_GEMM_TARGET_S = 2e-3   # the largest GEMM: about this long forward at the first timing's rate


@dataclass(frozen=True)
class SweepLimits:
    """The largest case of each sweep: GEMM and attention FLOPs, elementwise log2(elements)."""

    gemm_flops: float = MAX_GEMM_FLOPS
    attention_flops: float = MAX_GEMM_FLOPS
    membound_log2: int = 23

    @property
    def big(self) -> bool:
        """Beyond the CPU sizes: the sweeps add the large shapes (CPU lists stay as they were)."""
        return self.gemm_flops > MAX_GEMM_FLOPS


@dataclass
class Point:
    """One timed op: ``x`` on its curve, forward FLOPs, bytes moved, forward and backward seconds."""

    curve: str          # matmul | membound | attention
    label: str
    x: float
    flops: float
    bytes_rw: float
    fwd_s: float
    bwd_s: float
    bwd_flops: float = 0.0
    from_model: bool = False   # an op of the profiled model (else a sweep case)

    @property
    def total_s(self) -> float:
        return self.fwd_s + self.bwd_s


# ----- the sweeps -----------------------------------------------------------------------
def sweep_limits(device: str, dtype: torch.dtype, clock: Clock) -> SweepLimits:
    """CPU: the fixed CPU sizes. GPU: sized from a first timing of a 4096^3 GEMM (``gpu_limits``)."""
    if not device.startswith("cuda"):
        return SweepLimits()
    a = torch.randn(4096, 4096, dtype=dtype, device=device)
    t = measure(lambda: a @ a, clock, 0.2, min_samples=3).median_s
    return gpu_limits(2.0 * 4096**3 / t)


def gpu_limits(gemm_flops_per_s: float) -> SweepLimits:
    """The largest GEMM runs ~``GPU_GEMM_TARGET_S`` forward at the measured rate (at least the CPU
    size, at most ``GPU_MAX_GEMM_FLOPS``); causal attention 4x that (seq 16k x 32 heads x d 128 at
    the cap), elementwise up to 2^27 elements."""
    gemm = min(GPU_MAX_GEMM_FLOPS, max(MAX_GEMM_FLOPS, gemm_flops_per_s * GPU_GEMM_TARGET_S))
    return SweepLimits(gemm, 4 * gemm, 27) if gemm > MAX_GEMM_FLOPS else SweepLimits()


def gemm_shapes(lim: SweepLimits = SweepLimits()) -> list[tuple[int, int, int]]:
    """Transformer-like linears: m tokens x (n, k) in {(h, h), (4h, h), (h, 4h)}, powers of two,
    ordered round-robin over quarter-decade FLOP buckets so a cut budget still spans sizes."""
    ms = (16, 32, 64, 128, 256, 512, 1024, 2048, 4096) + ((8192, 16384) if lim.big else ())
    hs = (32, 64, 128, 256, 512, 1024, 2048) + ((4096, 8192) if lim.big else ())
    shapes = {(m, n, k) for m in ms for h in hs for n, k in ((h, h), (4 * h, h), (h, 4 * h))
              if 2 * m * n * k <= lim.gemm_flops}
    return _round_robin(sorted(shapes), CASE_SIZE["matmul"])


def membound_cases(lim: SweepLimits = SweepLimits()) -> list[tuple[str, int, int]]:
    """(op, rows, width): widths of hidden sizes, 2^8 .. 2^23 elements (2^27 on a GPU)."""
    ops = ("add", "mul", "gelu", "silu", "softmax", "layer_norm", "copy")
    cases = []
    for i, e in enumerate(range(8, lim.membound_log2 + 1)):
        for j, op in enumerate(ops):
            width = (64, 256, 768, 1024)[(i + j) % 4]
            numel = 2**e
            cases.append((op, max(1, numel // width), min(width, numel)))
    return _round_robin(cases, CASE_SIZE["membound"])


def attention_shapes(lim: SweepLimits = SweepLimits()) -> list[tuple[int, int, int]]:
    """(b*h, s, d) of causal SDPA (on a GPU up to seq 16384 and d 128)."""
    seqs = (32, 64, 128, 256, 512, 1024) + ((2048, 4096, 8192, 16384) if lim.big else ())
    dims = (16, 32, 64) + ((128,) if lim.big else ())
    shapes = [(bh, s, d) for bh in (4, 12, 32) for s in seqs for d in dims
              if 4 * bh * s * s * d <= lim.attention_flops]
    return _round_robin(shapes, CASE_SIZE["attention"])


# the size each list is ordered by (GEMM / attention FLOPs, elementwise elements)
CASE_SIZE: dict[str, Callable] = {"matmul": lambda s: 2.0 * s[0] * s[1] * s[2], "membound": lambda c: c[1] * c[2],
                                  "attention": lambda c: 4.0 * c[0] * c[1] ** 2 * c[2]}


def _round_robin(items: list, size: Callable) -> list:
    buckets: dict[int, list] = {}
    for it in sorted(items, key=size):
        buckets.setdefault(round(4 * math.log10(size(it))), []).append(it)
    lists = [b[len(b) // 2:] + b[:len(b) // 2][::-1] for _, b in sorted(buckets.items())]  # middle aspect first
    out = []
    for i in range(max(len(b) for b in lists)):
        out += [b[i] for b in lists if i < len(b)]
    return out


def run_sweep(curve: str, dtype: torch.dtype, device: str, clock: Clock, budget_s: float, engine_s: float,
              progress: Callable[[str], None] | None = None, lim: SweepLimits = SweepLimits()) -> list[Point]:
    """Time as many sweep points of ``curve`` as fit in ``budget_s`` (wall clock)."""
    cases = {"matmul": gemm_shapes, "membound": membound_cases, "attention": attention_shapes}[curve](lim)
    make = {"matmul": _gemm_case, "membound": _membound_case, "attention": _attention_case}[curve]
    deadline = time.perf_counter() + budget_s
    points: list[Point] = []
    biggest = (0.0, 0.0)  # (size, wall seconds) of the largest case so far: skip cases that cannot finish
    for i, case in enumerate(cases):
        left, size = deadline - time.perf_counter(), CASE_SIZE[curve](case)
        if left <= 0:
            break
        if size > biggest[0] > 0 and biggest[1] * size / biggest[0] > left:
            continue  # decided before its tensors exist: a GPU list's largest cases hold GBs
        point, call, wrt = make(case, dtype, device)
        t0 = time.perf_counter()
        _time_case(point, call, wrt, clock, min(left, max(0.3, budget_s / 15)), engine_s)
        if size >= biggest[0]:
            biggest = (size, time.perf_counter() - t0)
        points.append(point)
        if progress:
            progress(f"{curve} sweep {i + 1}/{len(cases)}: {point.label}")
    return points


def _time_case(point: Point, call, wrt, clock: Clock, budget_s: float, engine_s: float) -> Point:
    fwd, fwd_bwd = grad_runner(call, wrt)
    t = time_fwd_bwd(fwd, fwd_bwd, clock, budget_s, engine_s, rel_tol=0.05, min_samples=3)
    point.fwd_s, point.bwd_s = t.fwd_s, t.bwd_s
    return point


def _gemm_case(shape, dtype, device):
    m, n, k = shape
    x = torch.randn(m, k, dtype=dtype, device=device, requires_grad=True)
    w = torch.randn(n, k, dtype=dtype, device=device, requires_grad=True)
    b = torch.randn(n, dtype=dtype, device=device, requires_grad=True)
    es = x.element_size()
    p = Point("matmul", f"linear {m}x{n}x{k}", 2.0 * m * n * k, 2.0 * m * n * k + m * n,
              es * (m * k + n * k + n + m * n), 0.0, 0.0, 4.0 * m * n * k + m * n)
    return p, (lambda: F.linear(x, w, b)), [x, w, b]


def _membound_case(case, dtype, device):
    op, rows, width = case
    kw = dict(dtype=dtype, device=device)
    a = torch.randn(rows, width, **kw, requires_grad=True)
    b = torch.randn(rows, width, **kw, requires_grad=True)
    w, bias = torch.ones(width, **kw, requires_grad=True), torch.zeros(width, **kw, requires_grad=True)
    t = torch.randn(width, rows, **kw).t().detach().requires_grad_(True)  # a transposed view
    calls = {"add": (lambda: a + b, [a, b], 3), "mul": (lambda: a * b, [a, b], 3),
             "gelu": (lambda: F.gelu(a), [a], 2), "silu": (lambda: F.silu(a), [a], 2),
             "softmax": (lambda: torch.softmax(a, -1), [a], 2),
             "layer_norm": (lambda: F.layer_norm(a, (width,), w, bias), [a, w, bias], 2),
             "copy": (lambda: t.contiguous(), [t], 2)}
    call, wrt, tensors = calls[op]
    nbytes = tensors * a.numel() * a.element_size() + (2 * width * a.element_size() if op == "layer_norm" else 0)
    return Point("membound", f"{op} {rows}x{width}", nbytes, a.numel(), nbytes, 0.0, 0.0), call, wrt


def _attention_case(shape, dtype, device):
    bh, s, d = shape
    q, k, v = (torch.randn(1, bh, s, d, dtype=dtype, device=device, requires_grad=True) for _ in range(3))
    flops = 4.0 * bh * s * s * d
    p = Point("attention", f"sdpa {bh}x{s}x{d}", flops, flops, 4 * bh * s * d * q.element_size(), 0.0, 0.0,
              2.5 * flops)
    return p, (lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True)), [q, k, v]


# ----- from points to curves ----------------------------------------------------------------
def peak_flops(points: list[Point]) -> float:
    """Best GEMM FLOP/s measured (sweep cases and the model's own linears), forward alone or
    forward + backward."""
    rates = [r for p in points if p.curve == "matmul" and p.fwd_s > 0
             for r in (p.flops / p.fwd_s, (p.flops + p.bwd_flops) / p.total_s)]
    return max(rates)


def peak_bandwidth(points: list[Point]) -> float:
    """Best elementwise bytes/s measured (forward alone or the 3x-bytes forward + backward)."""
    rates = [r for p in points if p.curve == "membound" and p.fwd_s > 0 and not p.from_model
             for r in (p.bytes_rw / p.fwd_s, 3 * p.bytes_rw / p.total_s)]
    return max(rates)


def efficiency(p: Point, peak: float, bw: float) -> float:
    """The curve value that makes OpTimer reproduce this point's forward + backward time."""
    if p.curve == "membound":
        return (1 + BWD_RATIO["membound"]) * p.bytes_rw / (p.total_s * bw)
    work = p.flops + (p.bwd_flops or BWD_RATIO[p.curve] * p.flops)
    return work / (p.total_s * peak)


def fit_curve(points: list[Point], peak: float, bw: float, per_decade: int = 4,
              monotone: bool = False) -> list[list[float]]:
    """Median efficiency per 1/per_decade-decade bucket of x, as EffCurve points; ``monotone``
    makes it non-decreasing (pool adjacent violators) where a dip can only be noise."""
    buckets: dict[int, list[Point]] = {}
    for p in points:
        if p.from_model and p.curve == "membound" and efficiency(p, peak, bw) > 1:
            continue  # faster than any sweep case: a copy the capture counted that ran as a view
        if p.total_s > 0 and p.x > 0:
            buckets.setdefault(round(per_decade * math.log10(p.x)), []).append(p)
    out: list[list[float]] = []
    for _, pts in sorted(buckets.items()):
        x = float(f"{median(p.x for p in pts):.4g}")
        eff = min(1.0, max(1e-6, median(efficiency(p, peak, bw) for p in pts)))
        if not out or x > out[-1][0]:
            out.append([x, eff])
    effs = _isotonic([e for _, e in out]) if monotone else [e for _, e in out]
    return [[x, float(f"{e:.4g}")] for (x, _), e in zip(out, effs)]


def _isotonic(ys: list[float]) -> list[float]:
    """Least-squares non-decreasing fit (pool adjacent violators, equal weights)."""
    blocks: list[list[float]] = []  # [mean, count]
    for y in ys:
        blocks.append([y, 1.0])
        while len(blocks) > 1 and blocks[-2][0] > blocks[-1][0]:
            m2, n2 = blocks.pop()
            m1, n1 = blocks.pop()
            blocks.append([(m1 * n1 + m2 * n2) / (n1 + n2), n1 + n2])
    return [m for m, n in blocks for _ in range(int(n))]
