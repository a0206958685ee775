"""Host CPU overheads of a training step on CPU ranks, the two fields of a CPU profile that the
per-op measurements of ``autopar profile`` cannot see.

``op_overhead_s``: a whole forward + backward of a model (one process, one thread, process CPU
time) takes longer than the sum of its ops priced one by one: module calls, autograd graph
bookkeeping, fresh allocations. The excess is a fixed cost per micro-batch (it does not grow
with the micro-batch: measured at micro-batch 1 and 2, the intercept of the line through the
two residuals), spread over the model's captured ops.

``shared_core_sync_s``: ranks that share cores are time-sliced, so a blocking collective (or a
pipeline send/receive) waits until its members are scheduled together. Measured with ``nproc``
ranks (default: twice the cores) in groups of two, each iteration a ~2 ms matmul chunk then a
1 KiB all-reduce in the group, against the same loop without the all-reduce: the extra wall
time per collective (the message's own alpha-beta cost, a few tens of us, is in the
collective fits).

``dtensor_call_overhead_s``: see below.

A tensor-parallel module call (``ColwiseParallel`` / ``RowwiseParallel`` linear) does the local
matmul plus Python work: sharding propagation, input/output redistribution, DTensor wrapping.
On a GPU the host runs ahead of the kernels and this hides; on CPU ranks it is paid in full
(about as much as the matmul itself for a small model). Measured here, in a child process on a
``fake`` process group (collectives are no-ops, so only the host work remains): forward +
backward of a DTensor linear minus the plain linear of the same local shape, median over
samples, process CPU time, one thread, averaged over column- and row-parallel, square and
4x-wide linears.

    python benchmarks/host_overhead.py --profile profiles/hardware/cpu.json

updates (atomically) the profile's ``dtensor_call_overhead_s`` and its ``sources`` entry.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HIDDEN, SEQ, TP, SAMPLES = 256, 128, 2, 30

CHILD = r'''
import statistics, sys, time, torch, torch.distributed as dist
from torch import nn
from torch.testing._internal.distributed.fake_pg import FakeStore
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module
h, s, tp, n = (int(x) for x in sys.argv[1:5])
dist.init_process_group("fake", rank=0, world_size=tp, store=FakeStore())
torch.set_num_threads(1)
mesh = init_device_mesh("cpu", (tp,))
def cpu(fn):
    for _ in range(3):
        fn()
    ts = []
    for _ in range(n):
        t = time.process_time(); fn(); ts.append(time.process_time() - t)
    return statistics.median(ts)
out = []
for kind, (i, o) in (("col", (h, h)), ("row", (h, h)), ("col", (h, 4 * h)), ("row", (4 * h, h))):
    dt = nn.Linear(i, o)
    parallelize_module(dt, mesh, ColwiseParallel() if kind == "col" else RowwiseParallel())
    local_in = i // tp if kind == "row" else i
    x = torch.randn(1, s, local_in, requires_grad=True)
    plain = nn.Linear(local_in, o // tp if kind == "col" else o)
    out.append(cpu(lambda: dt(x).sum().backward()) - cpu(lambda: plain(x).sum().backward()))
print(statistics.mean(out))
dist.destroy_process_group()
'''


SYNC_CHILD = r'''
import datetime, os, time, torch, torch.distributed as dist
dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=120))
torch.set_num_threads(1)
r, w = dist.get_rank(), dist.get_world_size()
groups = [dist.new_group([i, i + 1]) for i in range(0, w - 1, 2)]
g = groups[min(r // 2, len(groups) - 1)]
a, b, t = torch.randn(256, 256), torch.randn(256, 1024), torch.ones(256)
def loop(coll, n=150):
    dist.barrier()
    t0 = time.perf_counter()
    for _ in range(n):
        for _ in range(8):
            a @ b
        if coll:
            dist.all_reduce(t, group=g)
    dist.barrier()
    return (time.perf_counter() - t0) / n
loop(True, 20)
res = [loop(c) for c in (False, True) * 4]
if r == 0:  # median of the paired differences: a burst of other load hits one pair
    print(sorted(res[i + 1] - res[i] for i in range(0, len(res), 2))[len(res) // 4])
dist.destroy_process_group()
'''


def measure_shared_core_sync(nproc: int) -> float:
    """Seconds of wall time one blocking collective costs when ``nproc`` ranks share the cores."""
    import tempfile

    with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as fh:
        fh.write(SYNC_CHILD)
    try:
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                              f"--nproc-per-node={nproc}", fh.name], capture_output=True, text=True,
                             timeout=600, env=env)
    finally:
        os.unlink(fh.name)
    nums = [ln for ln in res.stdout.splitlines() if ln.strip() and ln.strip()[0] in "-0123456789"]
    if res.returncode != 0 or not nums:
        raise RuntimeError(f"sync child failed: {(res.stderr.strip().splitlines() or ['?'])[-1]}")
    return max(0.0, float(nums[-1]))


def measure(samples: int = SAMPLES) -> float:
    """Seconds of host CPU one tensor-parallel linear call adds (forward + backward)."""
    res = subprocess.run([sys.executable, "-c", CHILD, str(HIDDEN), str(SEQ), str(TP), str(samples)],
                         capture_output=True, text=True, timeout=600)
    lines = [ln for ln in res.stdout.splitlines() if ln.strip()]
    if res.returncode != 0 or not lines:
        raise RuntimeError(f"host overhead child failed: {(res.stderr.strip().splitlines() or ['?'])[-1]}")
    return max(0.0, float(lines[-1]))


def measure_op_overhead(profile: Path, model: str, seq_len: int) -> float:
    """Seconds per captured op and micro-batch that a real forward + backward of ``model`` spends
    beyond the cost model's price of its ops (uncontended, from ``profile``)."""
    import torch

    from autopar.codegen.runtime import lm_loss
    from autopar.core.strategy import Strategy
    from autopar.cost_models.session import Inputs, build_cost_model
    from autopar.profiles.models import build_model

    torch.set_num_threads(1)
    cm, spec, _, seq = build_cost_model(Inputs(model=model, gpu=str(profile), nodes=1, gpus_per_node=1,
                                               seq_len=seq_len, dtype="fp32"))
    cm.gpu.op_overhead_s = 0.0  # price the ops alone (a re-run must not subtract its own last result)
    net = build_model(spec, "cpu")
    net.init_weights(0)
    ops = sum(len(t.ops) * max(1, len(t.indices or [])) for t in cm.templates)
    sizes, residual = (1, 2, 3, 4), []
    for mbs in sizes:
        x = torch.randint(0, spec.vocab, (mbs, seq + 1))
        measured = _cpu_min(lambda x=x: lm_loss(net(x[:, :-1]), x[:, 1:]).backward())
        costs = cm.layer_costs(Strategy.parse(f"dp=1,mbs={mbs}").resolve(1, mbs))
        residual.append(measured - sum(c.fwd_s + c.bwd_s for c in costs.values() if c is not None))
    mx, my = statistics.fmean(sizes), statistics.fmean(residual)  # least-squares line: residual vs mbs
    slope = sum((a - mx) * (b - my) for a, b in zip(sizes, residual)) / sum((a - mx) ** 2 for a in sizes)
    return max(0.0, my - slope * mx) / ops


def _cpu_min(fn, samples: int = 15) -> float:
    """Fastest of ``samples`` runs in process CPU time (other load only ever adds: cache and
    memory-bandwidth contention, frequency drops)."""
    fn()
    times = []
    for _ in range(samples):
        t0 = time.process_time()
        fn()
        times.append(time.process_time() - t0)
    return min(times)


def update_profile(path: Path, values: dict[str, float], how: dict[str, str]) -> None:
    from autopar.core.gpu import GpuProfile
    from autopar.fileio import write_atomic

    data = json.loads(path.read_text())
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    for key, value in values.items():
        data[key] = float(f"{value:.4g}")
        data.setdefault("sources", {})[key] = f"{how[key]}; measured by `python benchmarks/host_overhead.py " \
                                             f"--profile {path}` at {stamp}"
    GpuProfile.model_validate(data)  # still a valid profile
    write_atomic(path, json.dumps(data, indent=1) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--profile", type=Path, required=True, help="measured CPU profile JSON to update")
    ap.add_argument("--samples", type=int, default=SAMPLES)
    ap.add_argument("--model", default="gpt-small", help="model whose forward + backward gives op_overhead_s")
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--nproc", type=int, default=None, help="ranks for shared_core_sync_s (default 2 x cores)")
    args = ap.parse_args()
    t0 = time.perf_counter()
    nproc = args.nproc or 2 * (os.cpu_count() or 1)
    values = {"dtensor_call_overhead_s": measure(args.samples),
              "op_overhead_s": measure_op_overhead(args.profile, args.model, args.seq_len),
              "shared_core_sync_s": measure_shared_core_sync(nproc)}
    how = {"dtensor_call_overhead_s": f"DTensor tp={TP} linear forward+backward minus the plain local linear "
                                      f"(h={HIDDEN}, s={SEQ}, column/row, h->h and h->4h), fake process group, "
                                      "process CPU time",
           "op_overhead_s": f"{args.model} seq {args.seq_len} forward+backward (1 process, 1 thread, process CPU "
                            "time) minus its priced ops, per-micro-batch intercept of micro-batches 1 and 2, per "
                            "captured op",
           "shared_core_sync_s": f"{nproc} ranks on {os.cpu_count()} cores in pairs, ~2 ms matmul chunks with vs "
                                 "without a 1 KiB all-reduce per chunk, extra wall time per collective"}
    update_profile(args.profile, values, how)
    print(", ".join(f"{k} = {v * 1e6:.0f} us" for k, v in values.items()) +
          f" ({time.perf_counter() - t0:.0f} s); wrote {args.profile}")


if __name__ == "__main__":
    main()
