"""Timing one op forward and backward on the local device: warm-up, repeat until the spread is
small or the op's time budget runs out, keep the median and the spread.

Clock. On CPU with one thread the clock is the process CPU time (``time.process_time``): other
processes on a shared machine then slow the wall clock but not the measurement, and with one
intra-op thread the op runs entirely in this process (autograd runs CPU backward in the calling
thread). With more threads it is the wall clock; on CUDA, events around the work with a
synchronize (kernels are asynchronous).

Backward. ``fwd+bwd`` is timed on leaf inputs with ``torch.autograd.grad`` (no accumulation into
``.grad``) and the forward median is subtracted. Every ``autograd.grad`` call pays a fixed
engine start-up (about 12-15 us on this CPU) that a real backward pays once per step, not once per
op: ``engine_overhead`` measures it and the op timings subtract it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from statistics import median, quantiles
from typing import Callable

import torch

MIN_SAMPLES = 5
MAX_SAMPLES = 40
SAMPLE_TARGET_S = 1e-3   # tiny ops run several calls per sample so the clock's resolution does not matter


@dataclass
class Clock:
    """``now()`` for CPU (process CPU time or wall clock); ``elapsed(fn)`` for one sample."""

    device: str = "cpu"
    threads: int = 1

    @property
    def kind(self) -> str:
        if self.device.startswith("cuda"):
            return "cuda events"
        return "process CPU time" if self.threads == 1 else "wall clock"

    def elapsed(self, fn: Callable[[], object], calls: int = 1) -> float:
        """Seconds per call of ``fn`` over ``calls`` back-to-back calls."""
        if self.device.startswith("cuda"):
            return self._cuda(fn, calls)
        now = time.process_time if self.threads == 1 else time.perf_counter
        t0 = now()
        for _ in range(calls):
            fn()
        return (now() - t0) / calls

    def _cuda(self, fn, calls: int) -> float:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
        for _ in range(calls):
            fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / 1e3 / calls


@dataclass
class Measured:
    """Median seconds per call, relative spread (IQR / median) and the number of samples."""

    median_s: float
    spread: float
    samples: int


def measure(fn: Callable[[], object], clock: Clock, budget_s: float, rel_tol: float = 0.03,
            min_samples: int = MIN_SAMPLES) -> Measured:
    """Warm up, then sample until IQR/median < ``rel_tol`` (with >= ``min_samples``) or the
    budget (wall clock) is spent; at least 3 samples whatever the budget."""
    deadline = time.perf_counter() + budget_s
    first = clock.elapsed(fn)            # warm-up: allocator, oneDNN primitive creation, caches
    calls = max(1, min(1000, int(SAMPLE_TARGET_S / max(first, 1e-9))))
    if first < 20 * SAMPLE_TARGET_S:     # a second warm-up unless one call is long anyway
        clock.elapsed(fn, calls)
    samples: list[float] = []
    while len(samples) < MAX_SAMPLES:
        samples.append(clock.elapsed(fn, calls))
        if len(samples) >= 3 and time.perf_counter() > deadline:
            break
        if len(samples) >= min_samples and spread_of(samples) < rel_tol:
            break
    return Measured(median(samples), spread_of(samples), len(samples))


def spread_of(samples: list[float]) -> float:
    """Interquartile range over median (0 for fewer than 3 samples)."""
    if len(samples) < 3:
        return 0.0
    q1, mid, q3 = quantiles(samples, n=4, method="inclusive")
    return (q3 - q1) / mid if mid > 0 else 0.0


@dataclass
class OpTiming:
    fwd_s: float
    bwd_s: float
    spread: float
    samples: int


def time_fwd_bwd(fwd: Callable[[], object], fwd_bwd: Callable[[], object] | None, clock: Clock,
                 budget_s: float, engine_s: float = 0.0, rel_tol: float = 0.03,
                 min_samples: int = MIN_SAMPLES) -> OpTiming:
    """Forward median, and backward = median(fwd+bwd) - forward - engine start-up (>= 0)."""
    f = measure(fwd, clock, budget_s / 3 if fwd_bwd else budget_s, rel_tol, min_samples)
    if fwd_bwd is None:
        return OpTiming(f.median_s, 0.0, f.spread, f.samples)
    fb = measure(fwd_bwd, clock, budget_s * 2 / 3, rel_tol, min_samples)
    bwd = max(fb.median_s - f.median_s - engine_s, 0.05 * f.median_s)
    return OpTiming(f.median_s, bwd, max(f.spread, fb.spread), f.samples + fb.samples)


def grad_runner(call: Callable[[], object], wrt: list[torch.Tensor]):
    """(forward closure, forward+backward closure or None) of ``call()``; the backward
    differentiates the outputs that require grad w.r.t. ``wrt`` (inputs and parameters)."""
    if not wrt:
        return call, None
    probe = _tensors(call())
    outs_idx = [i for i, t in enumerate(probe) if t.requires_grad]
    if not outs_idx:
        return call, None
    grads = [torch.randn_like(probe[i]) for i in outs_idx]

    def fwd_bwd():
        outs = _tensors(call())
        return torch.autograd.grad([outs[i] for i in outs_idx], wrt, grads, allow_unused=True)

    return call, fwd_bwd


def _tensors(value) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (tuple, list)):
        return [t for v in value for t in _tensors(v)]
    return []


def engine_overhead(clock: Clock, device: str = "cpu") -> float:
    """Fixed cost of one ``autograd.grad`` call: a 1-op graph minus the per-op share of a
    20-op chain (what a node costs inside a real backward)."""
    x = torch.ones(1, device=device, requires_grad=True)
    g = torch.ones(1, device=device)

    def chain(n: int):
        y = x
        for _ in range(n):
            y = y * 1.0
        return y

    runs = []
    for _ in range(3):  # the first run still pays one-time autograd set-up: keep the smallest
        one = measure(lambda: torch.autograd.grad(chain(1), x, g), clock, 0.2).median_s
        many = measure(lambda: torch.autograd.grad(chain(20), x, g), clock, 0.2).median_s
        runs.append(max(one - (many - one) / 19, 0.0))
    return min(runs)
