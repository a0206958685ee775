"""The CPU profile's step time against one process, normalized for the machine's load.

    python benchmarks/cpu_step_physics.py MODEL MBS [MBS ...] [--seq-len 128]

For each micro-batch: one process, one thread (the profile's clock: ``time.process_time``),
``MODEL`` trained with AdamW on random tokens (the emitted program's model and loss, no ranks);
the step's CPU time against ``autopar estimate`` on one cpu rank, in total and by op class
(gemm: mm/addmm/bmm, attention: SDPA, other: every other aten op and the host time around them,
priced as membound ops plus the per-op overhead), the classes measured in one more step under a
dispatch mode that reads the CPU clock around every aten op (gemm and attention: inside those ops;
other: the step's CPU time less those two).

Load. Other processes on the machine slow even the CPU time of an op (a busy sibling hyperthread,
evicted caches). Before each row the script re-times reference points of the profile's own sweeps
(``profiles.profiler_sweep``: two GEMMs, two elementwise ops, one SDPA), at sizes the curves hold,
and prints ``machine`` = measured / profile time for them (1.0 on the machine the profile was
measured on, idle). ``norm`` = measured / (predicted x machine): what the physics misses, load
factored out. Prints figures only (no assertion): docs/validation.md quotes them.
"""

from __future__ import annotations

import argparse
import collections
import statistics
import time

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from autopar.codegen import runtime as rt
from autopar.core.strategy import Strategy
from autopar.cost_models.layer_cost import _attention_performed, _op_time, runtime_ops, shards_for
from autopar.cost_models.session import Inputs, build_cost_model
from autopar.profiles import profiler_sweep as sw
from autopar.profiles.profiler_timing import Clock

REFERENCE = {"matmul": [(1024, 1024, 256), (2048, 512, 512)], "membound": [("add", 1024, 1024), ("mul", 4096, 256)],
             "attention": [(12, 256, 64)]}
CLASSES = ("gemm", "attention", "other")


def machine_factor(cm) -> float:
    """Median of measured / profile time over the reference sweep points (see module docstring)."""
    makers = {"matmul": sw._gemm_case, "membound": sw._membound_case, "attention": sw._attention_case}
    peak, bw = cm.gpu.peak_tflops["fp32"] * 1e12, cm.gpu.mem_bw_gbps * 1e9
    ratios = []
    for curve, cases in REFERENCE.items():
        for case in cases:
            point, call, wrt = makers[curve](case, torch.float32, "cpu")
            sw._time_case(point, call, wrt, Clock("cpu", 1), 1.0, 0.0)
            ratios.append(cm.gpu.eff(curve, point.x) / sw.efficiency(point, peak, bw))
    return statistics.median(ratios)


class OpClock(TorchDispatchMode):
    """CPU seconds inside aten ops, by class."""

    def __init__(self):
        super().__init__()
        self.s = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        t0 = time.process_time()
        out = func(*args, **(kwargs or {}))
        self.s[_op_class(func.overloadpacket.__name__)] += time.process_time() - t0
        return out


def _op_class(name: str) -> str:
    if name in ("mm", "addmm", "bmm", "baddbmm"):
        return "gemm"
    return "attention" if "scaled_dot_product" in name else "other"


def priced_classes(cm, s: Strategy) -> dict[str, float]:
    """The estimate's compute seconds per step by op class (``layer_cost._op_time``; other: membound ops
    and the per-op overhead)."""
    sh, out, ops = shards_for(s), collections.Counter(), 0
    for t in cm.templates:
        n = max(1, len(t.indices))
        for op in runtime_ops(t, cm.ctx.runtime, cm.ctx.dtype_bytes):
            f, b = _op_time(op, s, sh, cm.ctx, _attention_performed(t, s, cm.ctx))
            out["other" if op.kind == "membound" else op.kind] += (f + b) * n
            ops += n
    out["other"] += ops * cm.gpu.op_overhead_s * cm.ctx.timer.contention
    return {k: out[k] * s.num_micro_batches for k in CLASSES}


def measure(model_name: str, mbs: int, seq: int) -> tuple[float, dict[str, float]]:
    """CPU seconds of one training step (median of 3 after 2) and, from one more, by op class."""
    spec = build_cost_model(Inputs(model=model_name, gpu="cpu", seq_len=seq, dtype="fp32"))[1]
    model = rt.build_meta_model(spec)
    rt.materialize([model], spec, 0, torch.device("cpu"))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x, y = (torch.randint(0, spec.vocab, (mbs, seq)) for _ in range(2))

    def step():
        rt.lm_loss(model(x), y).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    times = []
    for i in range(5):
        t0 = time.process_time()
        step()
        times.append(time.process_time() - t0) if i >= 2 else None
    total = statistics.median(times)
    clock = OpClock()
    with clock:
        step()
    by = {k: clock.s[k] for k in CLASSES[:2]}
    by["other"] = max(0.0, total - sum(by.values()))
    return total, by


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("mbs", type=int, nargs="+")
    ap.add_argument("--seq-len", type=int, default=128)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    cm = build_cost_model(Inputs(model=args.model, gpu="cpu", seq_len=args.seq_len, dtype="fp32"))[0]
    print(f"{args.model} seq {args.seq_len}, 1 process, 1 thread, process CPU time; profile {cm.gpu.name}")
    print("| mbs | machine | pred s | meas s | meas/pred | norm | " + " | ".join(f"{c} pred/meas s" for c in CLASSES)
          + " |")
    print("|---" * (6 + len(CLASSES)) + "|")
    for mbs in args.mbs:
        factor = machine_factor(cm)
        s = Strategy(dp=1, micro_batch=mbs, global_batch=mbs)
        pred = cm.estimate(s).step_time_s
        priced = priced_classes(cm, s)
        total, by = measure(args.model, mbs, args.seq_len)
        cells = " | ".join(f"{priced[c]:.3g}/{by[c]:.3g}" for c in CLASSES)
        print(f"| {mbs} | {factor:.2f} | {pred:.3g} | {total:.3g} | {total / pred:.2f} | {total / (pred * factor):.2f} "
              f"| {cells} |", flush=True)


if __name__ == "__main__":
    main()
