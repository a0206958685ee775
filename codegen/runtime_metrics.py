"""What the emitted programs log: per interval loss, learning rate, gradient norm, tokens/s,
TFLOP/s per GPU, MFU and peak memory, with the plan's predictions beside them; optionally a
JSONL file and ``torch.profiler`` traces of chosen steps.

FLOP basis (the one ``autopar estimate`` uses, ``cost_models/report.FLOPS_BASIS``):
``mfu = model_flops_per_step / (step_time_s * world * peak_flops_per_gpu)`` with model FLOPs
= forward + backward, no recompute; ``tflops_per_gpu = hardware_flops_per_step / step_time_s
/ world / 1e12`` with hardware FLOPs counting the recomputed forward. The figures per step
come from the plan (``predictions``), so measured and predicted MFU differ only by the time.
"""

from __future__ import annotations

import contextlib
import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist


def mfu(model_flops_per_step: float, step_time_s: float, world: int, peak_flops_per_gpu: float) -> float:
    """``estimate``'s model FLOPs utilisation (nan when the plan carries no FLOP figures)."""
    if not (model_flops_per_step and peak_flops_per_gpu and step_time_s > 0):
        return math.nan
    return model_flops_per_step / step_time_s / world / peak_flops_per_gpu


def tflops_per_gpu(hardware_flops_per_step: float, step_time_s: float, world: int) -> float:
    if not (hardware_flops_per_step and step_time_s > 0):
        return math.nan
    return hardware_flops_per_step / step_time_s / world / 1e12


@dataclass
class FlopBasis:
    """Per-step figures of the plan (``predictions``) the measured ones are computed with."""

    model_flops_per_step: float = 0.0
    hardware_flops_per_step: float = 0.0
    peak_flops_per_gpu: float = 0.0
    pred_step_time_s: float = math.nan
    pred_mfu: float = math.nan
    pred_peak_mem_bytes: float = math.nan


class MetricsLogger:
    """Collects the steps of a logging interval and prints one line per interval on rank 0.

    The loss stays a device tensor until the interval ends (one all-reduce and one host
    sync per interval, none per micro-batch); the gradient norm printed is the last step's."""

    def __init__(self, log_every: int, tokens_per_step: int, world: int, basis: FlopBasis,
                 metrics_file: str | None = None, device: torch.device | None = None):
        self.log_every, self.tokens, self.world, self.basis = max(1, log_every), tokens_per_step, world, basis
        self.device = device or torch.device("cpu")
        self.rank0 = not dist.is_initialized() or dist.get_rank() == 0
        self.file = open(metrics_file, "a") if metrics_file and self.rank0 else None  # noqa: SIM115
        self._reset()

    def _reset(self) -> None:
        self.losses, self.times, self.peak = [], [], -1

    def record(self, step: int, loss_sum: torch.Tensor, holds_loss: bool, lr: float, grad_norm: torch.Tensor,
               step_time_s: float, peak_bytes: int, last: bool = False) -> dict | None:
        """Add one step; at the end of an interval (or ``last``) reduce, print and return the row."""
        local = loss_sum.detach().to(self.device, torch.float64) if holds_loss else \
            torch.zeros((), dtype=torch.float64, device=self.device)
        self.losses.append(local.reshape(()))
        self.times.append(step_time_s)
        self.peak = max(self.peak, peak_bytes)
        if step % self.log_every and not last:
            return None
        row = self._row(step, lr, grad_norm)
        self._reset()
        if self.rank0:
            print(" ".join(f"{k}={_fmt(v)}" for k, v in row.items()), flush=True)
            if self.file:
                self.file.write(json.dumps(row) + "\n")
                self.file.flush()
        return row

    def _row(self, step: int, lr: float, grad_norm: torch.Tensor) -> dict:
        # the ranks holding distinct tokens of the last stage add up the global loss
        sums = torch.stack(self.losses)
        if dist.is_initialized():
            dist.all_reduce(sums)
        peak = torch.tensor([self.peak], dtype=torch.int64, device=self.device)
        if dist.is_initialized():
            dist.all_reduce(peak, op=dist.ReduceOp.MAX)  # the rank closest to running out
        t = sum(self.times) / len(self.times)
        b = self.basis
        return {
            "step": step, "loss": float(sums.mean()) / self.tokens, "lr": lr, "grad_norm": float(grad_norm),
            "step_time_s": t, "tokens_per_s": self.tokens / t,
            "tflops_per_gpu": tflops_per_gpu(b.hardware_flops_per_step, t, self.world),
            "mfu": mfu(b.model_flops_per_step, t, self.world, b.peak_flops_per_gpu),
            "peak_mem_bytes": int(peak.item()),
            "pred_step_time_s": b.pred_step_time_s, "pred_mfu": b.pred_mfu,
            "pred_peak_mem_bytes": b.pred_peak_mem_bytes,
        }

    def close(self) -> None:
        if self.file:
            self.file.close()


def _fmt(v) -> str:
    if isinstance(v, int):
        return str(v)
    return f"{v:.7g}"


class StepProfiler:
    """``torch.profiler`` around the chosen steps; one Chrome trace per step and rank
    (``trace_step<N>_rank<R>.json``, open in Perfetto or chrome://tracing)."""

    def __init__(self, steps: set[int], out_dir: str | Path):
        self.steps, self.out_dir = steps, Path(out_dir)

    @contextlib.contextmanager
    def step(self, step: int):
        if step not in self.steps:
            yield
            return
        from torch.profiler import ProfilerActivity, profile

        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
        with profile(activities=acts, record_shapes=True) as prof:
            yield
        self.out_dir.mkdir(parents=True, exist_ok=True)
        rank = dist.get_rank() if dist.is_initialized() else 0
        prof.export_chrome_trace(str(self.out_dir / f"trace_step{step}_rank{rank}.json"))


def parse_step_list(text: str) -> set[int]:
    """``--profile-steps 5,6`` -> {5, 6}; ``''`` -> none."""
    return {int(x) for x in text.split(",") if x.strip()}
