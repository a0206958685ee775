"""Pipeline schedules: step time from per-stage times, in closed form and by simulation.

Inputs are per *micro-batch* times of each pipeline rank: forward ``f[i]``, backward
``b[i]`` (backward includes any recomputed forward) and the point-to-point transfer
time of one boundary activation ``p2p``. For the interleaved schedule each rank holds
``v`` model chunks and ``f[i]``/``b[i]`` are the rank's totals over its chunks.

Closed forms (used by the search, O(p)):

- GPipe and 1F1B (Narayanan et al. SC21, Sec. 2.2; PipeDream-Flush): with equal stages
  ``T = (m + p - 1)(f + b)``, i.e. a bubble of ``(p-1)/m``. With unequal stages the
  steady state runs at the slowest stage and fill/drain passes each stage once:
  ``T = (m - 1)·max_i(f_i + b_i) + Σ_i (f_i + b_i)``.
- Interleaved 1F1B (SC21 Sec. 2.2.2): the bubble shrinks by ``v``:
  ``T = m·max_i(f_i + b_i) + (p - 1)/v · mean_i(f_i + b_i)``.

Communication assumptions: 1F1B and GPipe exchange activations with blocking
send/recv (Megatron-LM's default), so ``p2p`` is paid per micro-batch on the critical
path in both directions; interleaved 1F1B overlaps p2p with compute in the steady
state (Megatron's ``overlap_p2p_comm``) and pays it only in fill and drain, ``v`` times
per boundary. ``simulate`` replays the schedule op by op to check the closed forms
and to draw timelines.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

Schedule = Literal["gpipe", "1f1b", "interleaved"]


@dataclass
class PipelineTime:
    step_time_s: float
    busy_s: float            # compute time of the slowest rank (no bubble)
    bubble_s: float          # step_time - busy - exposed p2p
    p2p_s: float             # exposed point-to-point time
    events: list[tuple] = field(default_factory=list)  # (rank, kind, mb, chunk, start, end) from simulate()


def step_time(f: list[float], b: list[float], m: int, schedule: Schedule, v: int = 1,
              p2p: float = 0.0) -> PipelineTime:
    """Closed-form step time of one optimizer step (see module docstring)."""
    p = len(f)
    per = [fi + bi for fi, bi in zip(f, b)]
    slow = max(per)
    busy = m * slow
    if p == 1:
        return PipelineTime(busy, busy, 0.0, 0.0)
    if schedule == "interleaved":
        exposed = 2 * (p - 1) * p2p
        total = m * slow + (p - 1) / v * (sum(per) / p) + exposed
    else:
        exposed = 2 * (m + p - 2) * p2p
        total = (m - 1) * slow + sum(per) + exposed
    return PipelineTime(total, busy, total - busy - exposed, exposed)


def in_flight_microbatches(rank: int, p: int, m: int, schedule: Schedule, v: int = 1) -> float:
    """Micro-batches whose activations a pipeline rank holds at its peak.

    GPipe: all ``m`` (every forward runs before any backward). 1F1B: rank ``i`` (0-based)
    holds ``min(p - i, m)`` (Narayanan et al. SC21, Sec. 2.2.1). Interleaved 1F1B: the
    first rank warms up with ``(p - 1)·2 + (v - 1)·p + 1`` chunk forwards before its first
    backward (Megatron-LM ``get_num_warmup_microbatches``) — expressed here in units of
    full micro-batches (``v`` chunks = one micro-batch of the rank's layers).
    """
    if p == 1:
        return 1.0
    if schedule == "gpipe":
        return float(m)
    if schedule == "1f1b":
        return float(min(p - rank, m))
    warm_chunks = min((p - rank - 1) * 2 + (v - 1) * p + 1, m * v)
    return warm_chunks / v


def simulate(f: list[float], b: list[float], m: int, schedule: Schedule, v: int = 1,
             p2p: float = 0.0) -> PipelineTime:
    """Replay the schedule op by op (ranks run their op lists in order; an op starts when
    its rank is free and its input has arrived). ``f``/``b`` are per-rank totals; each
    chunk of an interleaved rank takes ``f[i]/v``."""
    p = len(f)
    order = [_rank_order(r, p, m, schedule, v) for r in range(p)]
    fc = [x / v for x in f]
    bc = [x / v for x in b]
    done: dict[tuple, float] = {}
    free = [0.0] * p
    pos = [0] * p
    events = []
    blocking = schedule != "interleaved"
    remaining = sum(len(o) for o in order)
    while remaining:
        progressed = False
        for r in range(p):
            while pos[r] < len(order[r]):
                kind, mb, chunk = order[r][pos[r]]
                ready = _ready_time(kind, mb, chunk, r, p, v, done, p2p)
                if ready is None:
                    break
                start = max(free[r], ready)
                dur = fc[r] if kind == "F" else bc[r]
                if blocking and _has_peer(kind, r, chunk, p, v):
                    dur += p2p  # blocking send of the produced activation / gradient
                end = start + dur
                done[(kind, mb, _virtual(r, chunk, p))] = end
                events.append((r, kind, mb, chunk, start, end))
                free[r] = end
                pos[r] += 1
                remaining -= 1
                progressed = True
        if not progressed:
            raise RuntimeError("pipeline schedule deadlocked (bug in the op order)")
    total = max(free)
    busy = m * max(fi + bi for fi, bi in zip(f, b))
    return PipelineTime(total, busy, max(total - busy, 0.0), 0.0, events)


def _virtual(rank: int, chunk: int, p: int) -> int:
    return chunk * p + rank


def _has_peer(kind: str, rank: int, chunk: int, p: int, v: int) -> bool:
    vs = _virtual(rank, chunk, p)
    return vs < p * v - 1 if kind == "F" else vs > 0


def _ready_time(kind, mb, chunk, rank, p, v, done, p2p):
    vs = _virtual(rank, chunk, p)
    if kind == "F":
        if vs == 0:
            return 0.0
        t = done.get(("F", mb, vs - 1))
        return None if t is None else t + (p2p if rank > 0 or chunk > 0 else 0.0)
    if vs == p * v - 1:
        return done.get(("F", mb, vs))
    t = done.get(("B", mb, vs + 1))
    return None if t is None else t + p2p


def _rank_order(rank: int, p: int, m: int, schedule: Schedule, v: int) -> list[tuple]:
    """The op list (kind, micro-batch, chunk) one rank executes."""
    if schedule == "gpipe":
        return [("F", i, 0) for i in range(m)] + [("B", i, 0) for i in range(m)]
    if schedule == "1f1b":
        warm = min(p - rank - 1, m)
        ops = [("F", i, 0) for i in range(warm)]
        for i in range(m - warm):
            ops += [("F", warm + i, 0), ("B", i, 0)]
        ops += [("B", i, 0) for i in range(m - warm, m)]
        return ops
    return _interleaved_order(rank, p, m, v)


def _interleaved_order(rank: int, p: int, m: int, v: int) -> list[tuple]:
    """Megatron-LM interleaved 1F1B: micro-batches run in groups of ``p`` per chunk."""
    total = m * v

    def fwd(k):  # k-th forward op of this rank -> (mb, chunk)
        group, within = divmod(k, p * v)
        return group * p + within % p, within // p

    def bwd(k):
        mb, chunk = fwd(k)
        return mb, v - 1 - chunk

    warm = min((p - rank - 1) * 2 + (v - 1) * p, total)
    ops = [("F", *fwd(k)) for k in range(warm)]
    for k in range(total - warm):
        ops.append(("F", *fwd(warm + k)))
        ops.append(("B", *bwd(k)))
    ops += [("B", *bwd(k)) for k in range(total - warm, total)]
    return ops
