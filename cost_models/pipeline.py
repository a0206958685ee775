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
- Zero bubble (Qi et al., ICLR 2024, "Zero Bubble Pipeline Parallelism"): backward splits into
  the input gradient ``B`` (on the critical path) and the weight gradient ``W`` (``w_i`` of
  ``b_i``, deferred into the bubbles). Per chunk the bubble is ``(p - 1)(F + B - W)`` for the
  looped schedule (ZB-H1; ``zb_interleaved``, ``v`` chunks) and ``(p - 1)(F + B - 2W)`` for the
  V-shaped ones (ZB-V; ``zbv``, ``dualpipev``, two chunks): with per-rank totals
  ``T = m·max_i(f_i + b_i) + (p - 1)/v · mean_i(max(0, f_i + b_i - k w_i))``, ``k = 2`` looped,
  ``k = 3`` V-shaped. ``w`` comes from the captured graph (``weight_grad_fraction``).

Communication assumptions: 1F1B and GPipe exchange activations with blocking
send/recv (Megatron-LM's default), so ``p2p`` is paid per micro-batch on the critical
path in both directions; interleaved 1F1B overlaps p2p with compute in the steady
state (Megatron's ``overlap_p2p_comm``) and pays it only in fill and drain, ``v`` times
per boundary. ``simulate`` replays the schedule op by op to check the closed forms
and to draw timelines.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from autopar.core.strategy import Schedule
from autopar.memo import IdentityMemo
from autopar.techniques.pipeline import V_SHAPED, ZERO_BUBBLE, stage_rank


@dataclass
class PipelineTime:
    step_time_s: float
    busy_s: float            # compute time of the slowest rank (no bubble)
    bubble_s: float          # step_time - busy - exposed p2p
    p2p_s: float             # exposed point-to-point time
    events: list[tuple] = field(default_factory=list)  # (rank, kind, mb, chunk, start, end) from simulate()


def end_ranks(pp: int, vpp: int, schedule: str) -> tuple[int, int]:
    """(the pipeline rank holding the first virtual stage, with the input embedding; the rank holding the last,
    with the final norm and the output layer): ``techniques.pipeline.stage_rank`` of stages ``0`` and
    ``pp * vpp - 1``, the placement the program runs (``codegen.runtime_pp.split_stages``). Rank ``pp - 1`` holds the
    output under one stage per rank and looped schedules; rank 0 holds both ends under the V-shaped ones."""
    return stage_rank(0, pp, schedule), stage_rank(pp * vpp - 1, pp, schedule)


def step_time(f: list[float], b: list[float], m: int, schedule: Schedule, v: int = 1,
              p2p: float = 0.0, w: list[float] | None = None) -> PipelineTime:
    """Closed-form step time of one optimizer step (see module docstring); ``w``: the
    weight-gradient part of each rank's backward (zero-bubble schedules)."""
    p = len(f)
    per = [fi + bi for fi, bi in zip(f, b)]
    slow = max(per)
    busy = m * slow
    if p == 1:
        return PipelineTime(busy, busy, 0.0, 0.0)
    if schedule in ZERO_BUBBLE:
        k = 3 if schedule in V_SHAPED else 2
        fill = [max(0.0, x - k * wi) for x, wi in zip(per, w or [0.0] * p)]
        exposed = 2 * (p - 1) * p2p   # torch's zero-bubble runtime posts sends/receives asynchronously
        total = m * slow + (p - 1) / v * (sum(fill) / p) + exposed
    elif schedule == "interleaved":
        exposed = 2 * (p - 1) * p2p
        total = m * slow + (p - 1) / v * (sum(per) / p) + exposed
    else:
        exposed = 2 * (m + p - 2) * p2p
        total = (m - 1) * slow + sum(per) + exposed
    return PipelineTime(total, busy, total - busy - exposed, exposed)


def bubble_share(schedule: str, f: float, b: float, w: float) -> float:
    """The bubble of a zero-bubble schedule as a share of 1F1B's (``step_time``), from a rank's
    forward ``f``, backward ``b`` and its weight-gradient part ``w``; 1 for the other schedules."""
    if schedule not in ZERO_BUBBLE or f + b <= 0:
        return 1.0
    k = 3 if schedule in V_SHAPED else 2
    return max(0.0, f + b - k * w) / (f + b)


def weight_grad_fraction(ops) -> float:
    """Share of a layer's backward FLOPs that is weight-gradient work (W): a GEMM with a weight
    (not a batched activation x activation product) computes dX and dW of equal FLOPs, so W is
    half of its backward; every other op's backward is input-gradient work. ``ops``: the
    template's captured ``OpTerm``s (memoized by identity: a template's ops do not change)."""
    def compute() -> float:
        total = sum(o.bwd_flops for o in ops)
        weight = sum(o.bwd_flops / 2 for o in ops if o.kind == "gemm" and not o.batched)
        return weight / total if total > 0 else 0.0

    return _WFRAC.get((), (ops,), compute)


_WFRAC = IdentityMemo(4096)   # weight_grad_fraction by the ops list


def in_flight_microbatches(rank: int, p: int, m: int, schedule: Schedule, v: int = 1) -> float:
    """Micro-batches whose activations a pipeline rank holds at its peak.

    GPipe: all ``m`` (every forward runs before any backward). 1F1B: rank ``i`` (0-based)
    holds ``min(p - i, m)`` (Narayanan et al. SC21, Sec. 2.2.1). ZB-V: ``p`` on every rank
    (Qi et al. 2024, Sec. 6; torch's ``ScheduleZBVZeroBubble`` warm-up). Looped zero bubble: ``p`` on
    every rank (a micro-batch's activations live until its deferred W). Interleaved 1F1B: the
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
    if schedule == "zbv":  # ZB-V: 2(p-r)-1 + r first-chunk and r+1 second-chunk forwards, p on every rank
        return float(min(p, m))
    if schedule == "dualpipev":  # DeepSeek-V3 (2024) Table 2: DualPipe holds PP + 1 micro-batches
        return float(min(p + 1, m))
    if schedule == "zb_interleaved":  # activations live until the deferred weight pass W: torch's
        # ScheduleInterleavedZeroBubble order keeps p*v chunks between F and W on every rank (contract sweep)
        return float(min(p, m))
    return _looped_warmup(rank, p, m, v)


def _looped_warmup(rank: int, p: int, m: int, v: int) -> float:
    """Interleaved 1F1B warm-up in micro-batches (Megatron-LM ``get_num_warmup_microbatches``)."""
    warm_chunks = min((p - rank - 1) * 2 + (v - 1) * p + 1, m * v)
    return warm_chunks / v


def simulate(f: list[float], b: list[float], m: int, schedule: Schedule, v: int = 1,
             p2p: float = 0.0, w: list[float] | None = None) -> PipelineTime:
    """Replay the schedule op by op (ranks run their op lists in order; an op starts when
    its rank is free and its input has arrived). ``f``/``b`` are per-rank totals; each
    chunk of an interleaved rank takes ``f[i]/v``. Zero-bubble schedules: ``_simulate_zb``."""
    if schedule in ZERO_BUBBLE and len(f) > 1:
        return _simulate_zb(f, b, w or [0.0] * len(f), m, schedule, v, p2p)
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


# ----- zero bubble ----------------------------------------------------------------------------
class _ZB:
    """State of a zero-bubble replay: per virtual stage the next forward / backward micro-batch,
    per rank its free time, forwards outstanding and deferred weight-gradient work."""

    def __init__(self, f, b, w, m, schedule, v, p2p):
        self.p, self.m, self.n, self.p2p = len(f), m, len(f) * v, p2p
        self.rank = [stage_rank(j, self.p, schedule) for j in range(self.n)]
        self.cost = {"F": [x / v for x in f], "B": [(x - y) / v for x, y in zip(b, w)], "W": [y / v for y in w]}
        # micro-batches a rank holds: started on its first local stage, backward there not yet run
        self.first = [min(j for j in range(self.n) if self.rank[j] == r) for r in range(self.p)]
        held = [_looped_warmup(r, self.p, m, v) if schedule == "zb_interleaved"  # its forwards outstanding,
                else in_flight_microbatches(r, self.p, m, schedule, v) for r in range(self.p)]  # not memory
        self.limit = [-(-x // 1) for x in held]
        self.next = {"F": [0] * self.n, "B": [0] * self.n}
        self.done: dict[tuple, float] = {}
        self.free, self.out, self.pending = [0.0] * self.p, [0] * self.p, [[] for _ in range(self.p)]
        self.events: list[tuple] = []

    def ready(self, kind: str, j: int) -> float | None:
        """When the next ``kind`` op of stage ``j`` has its input (None: not yet known / none left)."""
        mb = self.next[kind][j]
        if mb >= self.m:
            return None
        if kind == "F":
            if j == 0:
                return 0.0
            t = self.done.get(("F", mb, j - 1))
            return None if t is None else t + (self.p2p if self.rank[j - 1] != self.rank[j] else 0.0)
        if ("F", mb, j) not in self.done:
            return None
        if j == self.n - 1:
            return self.done[("F", mb, j)]
        t = self.done.get(("B", mb, j + 1))
        return None if t is None else t + (self.p2p if self.rank[j + 1] != self.rank[j] else 0.0)

    def choice(self, r: int) -> tuple[float, int, int, str, int] | None:
        """This rank's next op: the earliest-ready backward, else forward (within the memory
        limit), else deferred W when nothing else can start at once (it fills the bubble)."""
        opts = []
        for j in (j for j in range(self.n) if self.rank[j] == r):
            for pri, kind in ((0, "B"), (1, "F")):
                t = self.ready(kind, j)
                if t is not None and (kind == "B" or j != self.first[r] or self.out[r] < self.limit[r]):
                    opts.append((max(t, self.free[r]), pri, -j, kind, j))
        if self.pending[r] and (not opts or min(opts)[0] > self.free[r]):
            opts.append((self.free[r], 2, 0, "W", self.pending[r][0][1]))
        return min(opts) if opts else None

    def run(self, r: int, start: float, kind: str, j: int) -> None:
        if kind == "W":
            mb, j = self.pending[r].pop(0)
        else:
            mb = self.next[kind][j]
            self.next[kind][j] += 1
            if j == self.first[r]:
                self.out[r] += 1 if kind == "F" else -1
            if kind == "B":
                self.pending[r].append((mb, j))
        end = start + self.cost[kind][r]
        self.done[(kind, mb, j)] = end
        self.free[r] = end
        self.events.append((r, kind, mb, j, start, end))


def _simulate_zb(f, b, w, m, schedule, v, p2p) -> PipelineTime:
    """Greedy zero-bubble replay: at each step the rank whose next op can start earliest runs it
    (backward before forward, forwards capped at the schedule's in-flight count, W only when
    nothing else is ready); leftover W runs at the end."""
    st = _ZB(f, b, w, m, schedule, v, p2p)
    todo = 3 * m * st.n
    while todo:
        picks = [(c, r) for r in range(st.p) if (c := st.choice(r)) is not None]
        if not picks:
            raise RuntimeError("zero-bubble replay deadlocked (bug in the op rules)")
        (start, _, _, kind, j), r = min(picks)
        st.run(r, start, kind, j)
        todo -= 1
    total = max(st.free)
    busy = m * max(fi + bi for fi, bi in zip(f, b))
    return PipelineTime(total, busy, max(total - busy, 0.0), 0.0, st.events)


def shared_makespan(work: list[float], cores: int, threads: int = 1) -> float:
    """Time for jobs of ``work`` CPU-seconds each, started together, to finish on ``cores`` cores
    shared fairly (processor sharing: every unfinished job runs at min(threads, cores / jobs))."""
    left, t = sorted(w for w in work if w > 0), 0.0
    while left:
        rate = min(threads, cores / len(left))
        dt = left[0] / rate
        t += dt
        left = [w - rate * dt for w in left[1:] if w - rate * dt > 1e-15]
    return t
