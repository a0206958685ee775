"""``autopar profile-comm``: measure collectives between N local ranks and fit alpha-beta.

The parent starts N worker processes (``python -m autopar.profiles.comm_profiler``, one per
rank, gloo on CPU / nccl on CUDA; no ``multiprocessing.spawn``, which would re-run the CLI's
``__main__``). For every kind (all_reduce, all_gather, reduce_scatter, all_to_all, p2p) and
group size 2..N the ranks time message sizes 1 KiB, 4 KiB, ... up to ``max_bytes`` until the
slot's share of the budget would run out; sizes follow ``cost_models.comm`` (all-gather: the
gathered output, reduce-scatter: the full input, all-to-all: what one rank sends in total,
p2p: one message, measured as half a ping-pong). A point's time is the fastest of 5 samples
(taken in passes over all sizes), each the slowest rank's mean over enough calls to last ~30 ms.
Every decision to go on is agreed by an all-reduce (MIN) so ranks never diverge and hang.

The fit ``time = alpha + beta * S`` minimises relative error (rows weighted by 1/t), so the
latency term is not drowned by the largest messages; one size (the second largest) is held
out of a second fit to report how well the fit predicts a size it has not seen.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

KINDS = ("all_reduce", "p2p", "all_gather", "reduce_scatter", "all_to_all")  # most used first: the last
# slots get what the first ones left
MIN_BYTES = 1024
STEP = 4
SAMPLES = 5
ALWAYS_BYTES = 2**20


@dataclass
class CommPoint:
    kind: str
    group: int
    bytes: int
    time_s: float


@dataclass
class KindFit:
    kind: str
    group: int
    alpha_s: float
    beta_s_per_byte: float
    r2: float
    points: int
    held_out_bytes: int | None = None
    held_out_error: float | None = None   # (predicted - measured) / measured, fit without that size


@dataclass
class CommRun:
    points: list[CommPoint]
    fits: list[KindFit] = field(default_factory=list)
    wall_s: float = 0.0
    backend: str = "gloo"
    nproc: int = 2


# ----- fitting (pure) ---------------------------------------------------------------------
def fit_alpha_beta(sizes: list[float], times: list[float]) -> tuple[float, float, float]:
    """Least squares of t = alpha + beta*S on relative error, alpha and beta >= 0; returns
    (alpha, beta, r2) with r2 of the fit on the raw times."""
    w = [1.0 / t for t in times]
    a11 = sum(wi * wi for wi in w)
    a12 = sum(wi * wi * s for wi, s in zip(w, sizes))
    a22 = sum((wi * s) ** 2 for wi, s in zip(w, sizes))
    b1 = sum(wi * wi * t for wi, t in zip(w, times))
    b2 = sum(wi * wi * s * t for wi, s, t in zip(w, sizes, times))
    det = a11 * a22 - a12 * a12
    alpha, beta = ((b1 * a22 - b2 * a12) / det, (a11 * b2 - a12 * b1) / det) if det > 0 else (-1.0, -1.0)
    if alpha < 0 or beta < 0:  # constrained: one term alone
        beta_only = b2 / a22 if a22 else 0.0
        alpha_only = b1 / a11 if a11 else 0.0
        alpha, beta = (0.0, beta_only) if _rel_sse(0.0, beta_only, sizes, times) < \
            _rel_sse(alpha_only, 0.0, sizes, times) else (alpha_only, 0.0)
    mean = sum(times) / len(times)
    tot = sum((t - mean) ** 2 for t in times)
    res = sum((alpha + beta * s - t) ** 2 for s, t in zip(sizes, times))
    return alpha, beta, (1 - res / tot) if tot > 0 else 1.0


def _rel_sse(alpha: float, beta: float, sizes, times) -> float:
    return sum(((alpha + beta * s - t) / t) ** 2 for s, t in zip(sizes, times))


def fit_points(points: list[CommPoint]) -> list[KindFit]:
    """One fit per (kind, group size) with at least two sizes, plus its held-out error."""
    out = []
    for kind, group in sorted({(p.kind, p.group) for p in points}):
        pts = sorted((p for p in points if p.kind == kind and p.group == group), key=lambda p: p.bytes)
        if len(pts) < 2:
            continue
        alpha, beta, r2 = fit_alpha_beta([p.bytes for p in pts], [p.time_s for p in pts])
        fit = KindFit(kind, group, alpha, beta, r2, len(pts))
        if len(pts) >= 4:
            held = pts[-2]
            rest = [p for p in pts if p is not held]
            a, b, _ = fit_alpha_beta([p.bytes for p in rest], [p.time_s for p in rest])
            fit.held_out_bytes = held.bytes
            fit.held_out_error = (a + b * held.bytes - held.time_s) / held.time_s
        out.append(fit)
    return out


def link_class(fits: list[KindFit], nproc: int, how: str) -> dict:
    """intra_node LinkClass fields from the all-reduce fit of the largest group: ring
    all-reduce = 2(n-1)/n * S/B + 2(n-1)*alpha (cost_models.comm.ring_all_reduce_time)."""
    usable = [f for f in fits if f.kind == "all_reduce" and f.beta_s_per_byte > 0 and f.points >= 4]
    ar = max(usable, key=lambda f: f.group, default=None)
    if ar is None:
        return {}
    n = ar.group
    bw = 2 * (n - 1) / n / ar.beta_s_per_byte / 1e9
    return {"bw_gbps": float(f"{bw:.4g}"), "latency_s": float(f"{ar.alpha_s / (2 * (n - 1)):.4g}"),
            "source": f"ring all-reduce model fitted to all_reduce over {n} ranks, {how}"}


# ----- the parent ----------------------------------------------------------------------
def profile_comm(nproc: int, backend: str, budget_s: float, max_bytes: int, log=print,
                 timeout_s: float = 300.0) -> CommRun:
    """Start ``nproc`` ranks, measure, fit; raises RuntimeError when a rank fails."""
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="autopar-comm-") as tmp:
        out = Path(tmp) / "points.json"
        plan = json.dumps({"backend": backend, "budget_s": budget_s, "max_bytes": max_bytes, "out": str(out)})
        port = _free_port()
        procs = [_start_rank(r, nproc, port, plan, Path(tmp)) for r in range(nproc)]
        pump = threading.Thread(target=_relay, args=(procs[0], log), daemon=True)
        pump.start()
        _wait(procs, timeout_s + budget_s, Path(tmp))
        pump.join(timeout=5)
        if not out.is_file():
            raise RuntimeError("profile-comm: rank 0 wrote no results")
        raw = json.loads(out.read_text())
    points = [CommPoint(**p) for p in raw]
    return CommRun(points, fit_points(points), time.perf_counter() - t0, backend, nproc)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_rank(rank: int, world: int, port: int, plan: str, tmp: Path) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "autopar.profiles.comm_profiler", "--rank", str(rank), "--world", str(world),
           "--port", str(port), "--plan", plan]
    with open(tmp / f"rank{rank}.err", "w") as err:  # a file, not a pipe: a chatty rank never blocks
        return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE if rank == 0 else subprocess.DEVNULL,
                                stderr=err, text=True)


def _relay(proc: subprocess.Popen, log) -> None:
    for line in proc.stdout:
        log(line.rstrip())


def _wait(procs: list[subprocess.Popen], timeout_s: float, tmp: Path) -> None:
    """Wait for every rank; on a failure, an interrupt or the timeout stop the others."""
    deadline = time.monotonic() + timeout_s
    try:
        while any(p.poll() is None for p in procs):
            if any(p.poll() not in (None, 0) for p in procs) or time.monotonic() > deadline:
                break
            time.sleep(0.1)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
        for p in procs:
            p.wait()
    bad = [i for i, p in enumerate(procs) if p.returncode != 0]
    if bad:
        err = (tmp / f"rank{bad[0]}.err").read_text().strip().splitlines()
        raise RuntimeError(f"profile-comm: rank {bad[0]} exited with {procs[bad[0]].returncode}: "
                           f"{err[-1] if err else 'no output'}")


# ----- the worker (one per rank) ------------------------------------------------------------
def _worker(rank: int, world: int, port: int, plan: dict) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    device = "cuda" if plan["backend"] == "nccl" else "cpu"
    if device == "cuda":
        torch.cuda.set_device(rank % torch.cuda.device_count())
    dist.init_process_group(plan["backend"], init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=120))
    groups = {g: dist.new_group(list(range(g))) for g in range(2, world + 1)}
    slots = [(k, g) for k in KINDS for g in groups if k != "p2p" or g == 2]
    dist.barrier()
    deadline = time.time() + plan["budget_s"]  # one machine: every rank reads the same clock
    points = []
    for i, (kind, g) in enumerate(slots):
        if rank < g:  # a slot gets an even share of what is left (earlier slots may end early)
            points += _slot(kind, g, groups[g], rank, deadline, len(slots) - i, plan["max_bytes"], device)
    dist.barrier()
    if rank == 0:
        from autopar.fileio import write_atomic

        write_atomic(plan["out"], json.dumps(points))
    dist.destroy_process_group()


def _slot(kind: str, g: int, group, rank: int, deadline: float, slots_left: int, max_bytes: int,
          device: str) -> list[dict]:
    """Sizes x4 from 1 KiB (always up to ALWAYS_BYTES, for a usable fit) while the next size's
    predicted cost fits the slot's share of the budget; one sample per size on the way up, the
    other SAMPLES-1 in later passes over all sizes, so a burst of load elsewhere on the machine
    hits one sample of several sizes rather than every sample of one size."""
    import torch.distributed as dist

    dist.barrier(group=group)  # the slot's clock starts when all its ranks are here
    start, size, sizes = time.perf_counter(), MIN_BYTES, []
    budget_s = max(0.0, deadline - time.time()) / slots_left
    while size <= max_bytes:
        op = _make_op(kind, _actual_bytes(size, g) // 4, g, group, rank, device)
        op()                                            # warm-up: buffers, connections
        probe = _slowest(_timed(op, 1, group, device), group, device)
        reps = max(1, min(50, int(0.03 / max(probe, 1e-6))))  # the same on every rank: probe is agreed
        sizes.append((size, op, reps, [_slowest(_timed(op, reps, group, device), group, device)]))
        later = sum((SAMPLES - 1) * max(s[3][0], 0.03) for s in sizes)
        go = size * STEP <= ALWAYS_BYTES or \
            time.perf_counter() - start + later + _predicted_cost(sizes[-1][3][0] * STEP) < budget_s
        if not _agree(go, group, device):
            break
        size *= STEP
    for _ in range(SAMPLES - 1):
        for _, op, reps, samples in sizes:
            samples.append(_slowest(_timed(op, reps, group, device), group, device))
    out = []
    for size, _, _, samples in sizes:  # fastest sample: other processes only ever add time
        out.append({"kind": kind, "group": g, "bytes": _actual_bytes(size, g), "time_s": min(samples)})
        if rank == 0:
            print(f"{kind} over {g} ranks, {_human(size)}: {min(samples) * 1e3:.3f} ms", flush=True)
    return out


def _predicted_cost(t: float) -> float:
    """Seconds to measure a size whose call takes ``t``: warm-up, probe and SAMPLES samples of
    at least 30 ms; doubled because large messages grow faster than linearly (fresh buffers)."""
    return 2 * (2 * t + SAMPLES * max(t, 0.03))


def _agree(flag: bool, group, device: str) -> bool:
    import torch
    import torch.distributed as dist

    t = torch.tensor([1 if flag else 0], dtype=torch.int32, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN, group=group)
    return bool(t.item())


def _actual_bytes(size: int, g: int) -> int:
    return (size // 4) // g * g * 4


def _timed(op, reps: int, group, device: str) -> float:
    import torch
    import torch.distributed as dist

    dist.barrier(group=group)
    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        op()
    if device == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / reps


def _slowest(t: float, group, device: str) -> float:
    import torch
    import torch.distributed as dist

    x = torch.tensor([t], dtype=torch.float64, device=device)
    dist.all_reduce(x, op=dist.ReduceOp.MAX, group=group)
    return float(x.item())


def _make_op(kind: str, numel: int, g: int, group, rank: int, device: str):
    import torch
    import torch.distributed as dist

    def buf(n):
        return torch.ones(max(n, 1), dtype=torch.float32, device=device)

    if kind == "all_reduce":
        x = buf(numel)
        return lambda: dist.all_reduce(x, group=group)
    if kind == "all_gather":
        out, x = buf(numel), buf(numel // g)
        return lambda: dist.all_gather_into_tensor(out, x, group=group)
    if kind == "reduce_scatter":
        x, out = buf(numel), buf(numel // g)
        return lambda: dist.reduce_scatter_tensor(out, x, group=group)
    if kind == "all_to_all":
        x, out = buf(numel), buf(numel)
        return lambda: dist.all_to_all_single(out, x, group=group)
    return _ping_pong(buf(numel), rank)


def _ping_pong(x, rank: int):
    """One message = half a round trip between ranks 0 and 1."""
    import torch.distributed as dist

    def op():
        if rank == 0:
            dist.send(x, 1)
            dist.recv(x, 1)
        else:
            dist.recv(x, 0)
            dist.send(x, 0)

    return op


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}"
        n /= 1024
    return f"{n:.0f} GiB"


def fit_rows(run: CommRun) -> list[dict]:
    """CommFit fields (cost_models.comm) of every fit, link class intra_node (one machine)."""
    return [{"kind": f.kind, "group_size": f.group, "link": "intra_node", "alpha_s": float(f"{f.alpha_s:.4g}"),
             "beta_s_per_byte": float(f"{f.beta_s_per_byte:.4g}"), "r2": round(min(f.r2, 1.0), 4),
             "source": "measured"} for f in run.fits]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="one rank of `autopar profile-comm` (not for direct use)")
    ap.add_argument("--rank", type=int, required=True)
    ap.add_argument("--world", type=int, required=True)
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--plan", required=True)
    a = ap.parse_args(argv)
    _worker(a.rank, a.world, a.port, json.loads(a.plan))


if __name__ == "__main__":
    main()

