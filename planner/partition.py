"""Stage partition: which layers each pipeline rank runs, and their recompute, by dynamic programming.

For one strategy (all degrees and knobs fixed) the cost model's step time is

``T = A * max_r P_r + B * sum_r P_r + K + max_r D_r + max_r O_r``

with ``P_r`` the forward + backward time of rank ``r`` per micro-batch (recompute
included), ``D_r`` its exposed data-parallel gradient time, ``O_r`` its optimizer step, and
``(A, B, K)`` from the schedule (``pipeline.step_time``): 1F1B / GPipe ``(m - 1, 1,
2(m + p - 2) p2p)``; interleaved ``(m, (p - 1)/(v p), 2(p - 1) p2p)``; no pipeline ``(m, 0, 0)``.

Layout. ``v`` chunks per rank (``v = 1`` unless interleaved); the layers form ``v``
periods of ``C = L / v`` layers and rank ``r`` holds the same ``c_r`` consecutive positions
``[o_r, o_r + c_r)`` of every period, ``o_r = c_0 + ... + c_{r-1}``. With ``v = 1`` this is
every contiguous partition; with ``v > 1`` each rank's chunks are equally long (Megatron-Core
requires all chunks equal; this allows ranks to differ: the search prices this DP only for the stacks that run
any split, ``stack_split.partition`` lists the others' splits). The embedding and the output layer sit
on the ranks ``pipeline.end_ranks`` names (rank 0 and rank ``p - 1`` for these layouts), as in
``CostModel``. V-shaped schedules (rank ``r`` holds stages ``r`` and ``2p - 1 - r``, both ends on
rank 0) are not this layout: the search takes their even split (``search._v_shaped``).

Per rank, the recompute that minimises ``P_r`` under its memory budget is optimal for the
whole step where ``B >= 1`` (1F1B, GPipe; no pipeline: ``A = m``): ``T`` grows by at least ``B``
per second added to ``P_r``, ``D_r`` shrinks by at most that second (a longer last backward hides
more gradient traffic). Interleaved (``B < 1``) could trade recompute for hidden gradient sync; the
DP ignores that (an approximation there). So each rank is priced once per layer set (``recompute.choose``)
and the DP runs over ranks with states = offset ``o`` in the period, keeping the Pareto set of
``(max P, sum P, max D, max O)``: ``T`` is non-decreasing in each, so the Pareto labels are
exact. Labels whose lower bound reaches ``upper`` (the k-th best step time found so far)
are dropped, and no rank takes more layers than ``upper`` allows, which keeps the DP small.
"""

from __future__ import annotations

from dataclasses import dataclass

from autopar.core.strategy import Strategy
from autopar.cost_models import fsdp
from autopar.cost_models.estimate import CostModel, RankReport
from autopar.cost_models.layer_cost import RECOMPUTE_MODES, LayerCost
from autopar.cost_models.memory import bytes_per_param, warmup_gradient_bytes
from autopar.cost_models.pipeline import bubble_share, end_ranks, in_flight_microbatches, weight_grad_fraction
from autopar.planner import recompute as rc
from autopar.planner import stage_dp
from autopar.planner.recompute import cannot_fit
from autopar.techniques.pipeline import V_SHAPED, ZERO_BUBBLE

INF = float("inf")


@dataclass
class RankEval:
    """One rank holding a layer set, with its best recompute (None = does not fit)."""

    P: float
    fwd: float
    D: float
    O: float
    mem_bytes: float
    choice: rc.RecomputeChoice | None
    group_ids: tuple[int, ...]

    @property
    def feasible(self) -> bool:
        return self.choice is not None


@dataclass
class PartitionResult:
    step_time_s: float
    counts: list[int]                      # layers per period on each rank
    stages: list[tuple[int, int]]          # virtual stages in model order (rank = index % pp)
    layer_recompute: list[str]
    ranks: list[RankEval]


class RankPricer:
    """Prices rank ``r`` holding positions ``[o, o + c)`` of every period; identical layer sets
    (same counts of each distinct ``LayerCost``) are priced once."""

    def __init__(self, cm: CostModel, s: Strategy, modes: tuple[str, ...] = RECOMPUTE_MODES,
                 costs: dict | None = None, shared: dict | None = None):
        self.cm, self.s, self.modes = cm, s, tuple(k for k in RECOMPUTE_MODES if k in modes)
        self.costs = costs or cm.layer_costs(s)
        shared = {} if shared is None else shared       # caches that outlive one strategy
        self._frontiers = shared.setdefault("frontiers", {})
        self._syncs = shared.setdefault("grad_sync", {})
        if s.schedule in V_SHAPED:   # ``layers`` below is the looped layout, not the V the program runs
            raise ValueError(f"schedule={s.schedule}: the partition prices looped layouts; V-shaped schedules take "
                             "the even split (search._v_shaped)")
        self.L, self.p, self.v = cm.num_layers, s.pp, s.vpp
        self.ends = end_ranks(s.pp, s.vpp, s.schedule)   # the ranks holding the embedding and the output layer
        self.C = self.L // self.v
        self.m = s.num_micro_batches
        self.per_unit = fsdp.per_unit(cm, s)   # FSDP's per-layer traffic: D is zero3_time, whatever the recompute
        # the layout of the layer kinds, shared by every strategy priced with these costs and modes
        key = ("layout", id(self.costs), self.modes)
        lay = shared.get(key)
        if lay is None or lay.costs is not self.costs:
            lay = shared[key] = _Layout(self.costs, self.L, self.modes)
        self.groups, self.prefix, self.base, self.first = lay.groups, lay.prefix, lay.base, lay.first
        self._counts = lay.counts.setdefault(self.v, {})   # (o, c) -> counts, for this period length
        self._base_times = lay.base_times.setdefault(self.v, {})
        self._coef: tuple[float, float, float] | None = None
        self._zb = shared.setdefault("zb_sums", {})
        self._z3: list[float] | None = None
        self._opt: dict[tuple, float] = {}
        self._budgets: dict[tuple, tuple] = {}
        self._by_pos: dict[tuple, RankEval] = {}
        self._by_sig: dict[tuple, RankEval] = {}
        self._fixed_D: dict[tuple, float] = {}          # by (o, c)
        self.dp_memo: dict = {}                         # the stage DP's arrays (stage_dp._by_count)
        self._fixed_D_by_set: dict[tuple, float] = {}   # by (counts, first and last layer costs)
        self._z3_edges: dict[tuple, float] = {}

    # ----- layer sets --------------------------------------------------------------------
    def layers(self, o: int, c: int) -> list[int]:
        return [k * self.C + o + i for k in range(self.v) for i in range(c)]

    def holds_ends(self, r: int) -> tuple[bool, bool]:
        """Whether rank ``r`` holds the input embedding and the output layer (``pipeline.end_ranks``)."""
        return r == self.ends[0], r == self.ends[1]

    def extras(self, r: int) -> list[LayerCost]:
        """The embedding and output layers' costs rank ``r`` holds (``holds_ends``)."""
        return [self.costs[k] for k, on in zip(("embedding", "output"), self.holds_ends(r)) if on and self.costs[k]]

    def counts(self, o: int, c: int) -> tuple[int, ...]:
        out = self._counts.get((o, c))
        if out is None:
            out = self._counts[o, c] = tuple(sum(pre[k * self.C + o + c] - pre[k * self.C + o] for k in range(self.v))
                                             for pre in self.prefix)
        return out

    def base_time(self, o: int, c: int) -> float:
        """Forward + backward of the layers with the fastest allowed recompute (extras excluded)."""
        out = self._base_times.get((o, c))
        if out is None:
            out = self._base_times[o, c] = sum(n * t for n, t in zip(self.counts(o, c), self.base))
        return out

    def edge_time(self, r: int) -> float:
        """Forward + backward of the embedding / output layer the rank holds, without recompute."""
        return sum(e.time("none") for e in self.extras(r))

    def fixed_D(self, o: int, c: int) -> float:
        """``D`` of a rank holding ``[o, o + c)`` where it does not depend on the rank's recompute
        (FSDP's per-unit gathers and scatters, ``zero3_time``, as ``_price`` prices it), else 0 (a floor)."""
        out = self._fixed_D.get((o, c))
        if out is None:
            out = self._fixed_D[o, c] = self._fixed_D_of(o, c)
        return out

    def _fixed_D_of(self, o: int, c: int) -> float:
        if not self.per_unit:
            return 0.0
        cnt, last = self.counts(o, c), (self.v - 1) * self.C + o + c - 1
        key = (cnt, id(self.costs[o]), id(self.costs[last]))     # all zero3_time reads of the layers
        out = self._fixed_D_by_set.get(key)
        if out is None:
            out = self._fixed_D_by_set[key] = self.zero3_time(cnt, self.layers(o, c))
        return out

    def coefficients(self) -> tuple[float, float, float]:
        """``coefficients(cm, s)``, worked out once per strategy (the zero-bubble sums once per pricing)."""
        if self._coef is None:
            self._coef = coefficients(self.cm, self.s, self._zb)
        return self._coef

    # ----- one rank ------------------------------------------------------------------------
    def evaluate(self, r: int, o: int, c: int) -> RankEval:
        key = (r, o, c)
        if key not in self._by_pos:
            cnt = self.counts(o, c)
            sig = (r, cnt)
            if sig not in self._by_sig:
                self._by_sig[sig] = self._price(r, self.layers(o, c), cnt)
            self._by_pos[key] = self._by_sig[sig]
        return self._by_pos[key]

    def priced_at(self, r: int, o: int, c: int) -> RankEval | None:
        """``evaluate(r, o, c)`` where this rank's layer set is priced already, else None."""
        hit = self._by_pos.get((r, o, c))
        if hit is None:
            hit = self._by_sig.get((r, self.counts(o, c)))
            if hit is not None:
                self._by_pos[r, o, c] = hit
        return hit

    def _budget(self, r: int, parts: list[LayerCost], cnt: tuple[int, ...] | None = None) -> tuple[dict, float, float]:
        """(the rank's memory without recompute by kind, what its layers' activations may take,
        its in-flight micro-batches). With one kind of layer every layer set of one size lists the
        same costs, so the budget is worked out once per (rank, counts) (``can_hold`` asks, the DP
        asks again)."""
        if cnt is None or len(self.groups) != 1:
            return self._plain_budget(r, parts)
        if (r, cnt) not in self._budgets:
            self._budgets[r, cnt] = self._plain_budget(r, parts)
        return self._budgets[r, cnt]

    def _plain_budget(self, r: int, parts: list[LayerCost]) -> tuple[dict, float, float]:
        cm, s = self.cm, self.s
        extra = self.extras(r)
        in_flight = in_flight_microbatches(r, self.p, self.m, s.schedule, self.v)
        plain = cm.rank_memory(s, parts, ["none"] * len(parts), extra, in_flight, *self.holds_ends(r)).memory
        extra_act = sum(e.act_bytes["none"] for e in extra)
        fixed = sum(plain.values()) - plain["activations"] - plain["recompute_workspace"]
        overhead = plain.get("framework_overhead", 0.0)
        # a rank warming up every micro-batch peaks before its gradients exist (warmup_only_activations)
        reuse = warmup_gradient_bytes(s, cm.ctx.runtime, plain) if in_flight >= self.m else 0.0
        return plain, cm.usable_mem_bytes + overhead - fixed + reuse - in_flight * extra_act, in_flight

    def may_fit(self, r: int, c: int) -> bool:
        """``cannot_fit`` is false for rank ``r`` holding ``c`` positions of every period: true of
        every rank ``evaluate`` finds feasible (its first budget is this one), read without the
        recompute frontiers. For a model of one kind of layer, where any offset holds the same."""
        cm, s = self.cm, self.s
        parts = [self.costs[i] for i in self.layers(0, c)]
        plain, budget, in_flight = self._budget(r, parts, self.counts(0, c))
        temps = plain.get("logits_and_temporaries", 0.0)
        return not cannot_fit([(self.groups[0], len(parts))], self.modes, in_flight, budget,
                              _per_work(cm, s, parts, temps), self._frontiers)

    def _price(self, r: int, layers: list[int], cnt: tuple[int, ...]) -> RankEval:
        extra = self.extras(r)
        parts = [self.costs[i] for i in layers]
        plain, budget, in_flight = self._budget(r, parts, cnt)
        groups = [(g, n) for g, n in zip(self.groups, cnt) if n]
        ids = tuple(id(g) for g, _ in groups)
        fwd = sum(g.fwd_s * n for g, n in groups) + sum(e.fwd_s for e in extra)
        temps = plain.get("logits_and_temporaries", 0.0)
        choice, mem = self._fitting_choice(r, layers, groups, in_flight, budget, extra, temps, sum(plain.values()))
        if choice is None:
            return RankEval(INF, fwd, INF, INF, INF, None, ids)
        P = sum(g.time("none") * n for g, n in groups) + sum(e.time("none") for e in extra) + choice.extra_s
        report = RankReport(r, layers, fwd, P - fwd, choice.extra_s, {}, {}, in_flight)
        D = self.zero3_time(cnt, layers) if self.per_unit else self.dp_time(groups, P - fwd, fwd, *self.holds_ends(r))
        O = self._optimizer(report, cnt)
        return RankEval(P, fwd, D, O, mem, choice, ids)

    def _fitting_choice(self, r: int, layers: list[int], groups, in_flight: float, budget: float, extra,
                        temps: float, plain: float):
        """``rc.choose`` within ``budget``, then the chosen modes priced by ``CostModel.rank_memory``
        itself: its phase peaks (ZeRO-1's reduce bucket, pipeline ranks that warm up every micro-batch)
        are not linear in the choice, so the budget tightens by the excess until the exact peak fits.
        ``plain``: the rank's memory without recompute. Returns (choice or None, the rank's memory)."""
        cm, s = self.cm, self.s
        parts = [self.costs[i] for i in layers]
        usable = cm.usable_mem_bytes + cm.gpu.framework_overhead_bytes
        workspace = _per_work(cm, s, parts, temps)
        for _ in range(4):
            if cannot_fit(groups, self.modes, in_flight, budget, workspace, self._frontiers):
                return None, INF
            choice = rc.choose(groups, in_flight, budget, self.modes, self._frontiers, workspace)
            if choice is None:
                return None, INF
            if _all_none(choice):   # ``plain``: the same call, no recompute
                mem = plain
            else:
                modes = rc.assign([[i for i in layers if self.costs[i] is g] for g, _ in groups], choice)
                chosen = [modes[i] for i in layers]
                mem = sum(cm.rank_memory(s, parts, chosen, extra, in_flight, *self.holds_ends(r)).memory.values())
            if mem <= usable:
                return choice, mem
            budget -= mem - usable
        return None, INF

    def _optimizer(self, report: RankReport, cnt: tuple[int, ...]) -> float:
        """``CostModel.optimizer_time`` of the rank, priced once per layer count for one kind of layer."""
        if len(self.groups) != 1:
            return self.cm.optimizer_time(self.s, report, self.costs)
        if cnt not in self._opt:
            self._opt[cnt] = self.cm.optimizer_time(self.s, report, self.costs)
        return self._opt[cnt]

    def dp_time(self, groups: list[tuple[LayerCost, int]], bwd: float, fwd: float = 0.0, first: bool = False,
                last: bool = False) -> float:
        """``CostModel.dp_time`` below ZeRO-3, with each gradient collective priced once per
        size and group (ranks of other strategies often reduce the same bytes); ``bwd`` / ``fwd``:
        one micro-batch's backward / forward on the rank (``overlap.grad_sync_exposed``); ``first`` / ``last``: the
        rank holding the input embedding / the output layer (``extras``; ``fsdp.end_sync_bytes``)."""
        s, gbytes, costs = self.s, bytes_per_param(self.cm.dtype)[1], self.costs
        ends, edge = fsdp.end_sync_bytes(self.cm, s, costs["embedding"] if first else None,
                                         costs["output"] if last else None, gbytes)
        dense = sum(g.params_dense * n for g, n in groups) * gbytes + ends
        expert = sum(g.params_expert * n for g, n in groups) * gbytes
        hide = bool(self.m)
        return fsdp.step_sync_exposed(self.cm, s, self._sync, dense, expert, bwd * hide, fwd * hide, edge)

    def _sync(self, size: float, n: int, stride: int) -> float:
        key = (size, n, stride, self.s.zero_stage in (1, 2))
        if key not in self._syncs:
            self._syncs[key] = self.cm.grad_sync_time(size, n, stride, self.s)
        return self._syncs[key]

    def zero3_time(self, cnt: tuple[int, ...], layers: list[int]) -> float:
        """``CostModel._zero3_exposed``: each distinct layer priced once, the step's edges once per rank."""
        cm, s = self.cm, self.s
        if s.dp * s.cp <= 1 or not layers:
            return 0.0
        if self._z3 is None:
            self._z3 = [cm.zero3_layer_exposed(s, self.costs[i]) for i in self.first]
        ends = (self.costs[layers[0]], self.costs[layers[-1]])
        key = (id(ends[0]), id(ends[1]))    # the two layers' costs (alive in self.costs): what the edges read
        edges = self._z3_edges.get(key)
        if edges is None:
            edges = self._z3_edges[key] = cm.zero3_edge_time(s, *ends)
        return sum(n * d for n, d in zip(cnt, self._z3)) * fsdp.unit_syncs_per_step(cm, s) + edges

    def assignment(self, r: int, o: int, c: int) -> dict[int, str]:
        ev = self.evaluate(r, o, c)
        layers = self.layers(o, c)
        by_group = [[i for i in layers if id(self.costs[i]) == g] for g in ev.group_ids]
        return rc.assign(by_group, ev.choice)


def _per_work(cm: CostModel, s: Strategy, parts: list[LayerCost], temps: float):
    """``CostModel.workspace_excess`` of one rank's layers as a function of the largest working set,
    each value worked out once: ``cannot_fit`` and ``choose`` ask it for the same few caps, and each
    call reads every layer of the rank (a ZeRO-3 rank's largest block)."""
    seen: dict[float, float] = {}

    def workspace(work: float) -> float:
        if work not in seen:
            seen[work] = cm.workspace_excess(s, parts, work, temps)
        return seen[work]
    return workspace


def _all_none(choice: rc.RecomputeChoice) -> bool:
    """Every layer of the choice runs without recompute."""
    return all(n == 0 for counts in choice.counts for k, n in zip(choice.modes, counts) if k != "none")


# ----- the step-time objective -----------------------------------------------------------
def coefficients(cm: CostModel, s: Strategy, sums: dict | None = None) -> tuple[float, float, float]:
    """``(A, B, K)`` of ``T = A max P + B sum P + K + max D + max O`` (``pipeline.step_time``).
    ``sums``: a cache of the zero-bubble sums by pricing (they depend on the layer costs only)."""
    p2p = cm.p2p_time(s) if s.pp > 1 else 0.0
    share = 1.0
    if s.schedule in ZERO_BUBBLE:   # the W share of the blocks' backward, summed over the model
        costs = cm.layer_costs(s)
        hit = sums.get(id(costs)) if sums is not None else None
        if hit is None or hit[0] is not costs:
            hit = (costs, *_fbw(cm, costs))
            if sums is not None:
                sums[id(costs)] = hit
        share = bubble_share(s.schedule, *hit[1:])
    A, B, K = schedule_coefficients(s.pp, s.num_micro_batches, s.schedule, s.vpp, p2p, share)
    return A, B, K + cm.stack.step_overhead_s   # the stack's fixed per-step host time (CostModel.estimate)


def _fbw(cm: CostModel, costs: dict) -> tuple[float, float, float]:
    """The blocks' forward, backward and weight-gradient sums (``pipeline.bubble_share``)."""
    blocks = [costs[i] for i in range(cm.num_layers)]
    f, b = sum(c.fwd_s for c in blocks), sum(c.bwd_s for c in blocks)
    w = sum(c.bwd_s * weight_grad_fraction(cm.blocks[i].ops) for i, c in enumerate(blocks))
    return f, b, w


def schedule_coefficients(p: int, m: int, schedule: str, v: int, p2p: float,
                          share: float = 0.0) -> tuple[float, float, float]:
    """``share``: a zero-bubble schedule's bubble relative to 1F1B's (``pipeline.bubble_share``;
    the default 0 gives the lower bound the search needs)."""
    if p == 1:
        return float(m), 0.0, 0.0
    if schedule in ZERO_BUBBLE:
        return float(m), (p - 1) / (v * p) * share, 2 * (p - 1) * p2p
    if schedule == "interleaved":
        return float(m), (p - 1) / (v * p), 2 * (p - 1) * p2p
    return float(m - 1), 1.0, 2 * (m + p - 2) * p2p


def evaluate_counts(pr: RankPricer, counts: list[int]) -> tuple[float, list[RankEval]]:
    """Step time of one layout (layers per period on each rank); INF when a rank does not fit."""
    A, B, K = pr.coefficients()
    evs, o = [], 0
    for r, c in enumerate(counts):
        evs.append(pr.evaluate(r, o, c))
        o += c
    if not all(e.feasible for e in evs):
        return INF, evs
    P = [e.P for e in evs]
    return A * max(P) + B * sum(P) + K + max(e.D for e in evs) + max(e.O for e in evs), evs


def can_hold(pr: RankPricer) -> bool:
    """False only when no layout fits: with one kind of layer, the most positions each rank can
    hold (``may_fit``, found by bisection: more layers on a rank only need more memory, the
    assumption the DP's own cut-off rests on) add up to less than the period. Memory-tight
    configurations are then refused without pricing a rank's recompute."""
    if pr.p == 1 or len(pr.groups) != 1:
        return True
    room, top = 0, pr.C - pr.p + 1
    for r in range(pr.p):
        lo, hi = 0, top            # may_fit(r, lo) holds (lo = 0: nothing held); find the largest
        while lo < hi:
            mid = (lo + hi + 1) // 2
            lo, hi = (mid, hi) if pr.may_fit(r, mid) else (lo, mid - 1)
        room += lo
        if room >= pr.C:
            return True
    return False


def balanced_counts(C: int, p: int) -> list[int]:
    base, rest = divmod(C, p)
    return [base + (1 if r < rest else 0) for r in range(p)]


def partition(cm: CostModel, s: Strategy, modes: tuple[str, ...] = RECOMPUTE_MODES, upper: float = INF,
              costs: dict | None = None, shared: dict | None = None, tight: bool = True) -> PartitionResult | None:
    """The fastest layout and per-layer recompute of a resolved strategy, or None when nothing
    fits or nothing beats ``upper``. ``costs``: ``cm.layer_costs`` of the strategy, if at hand;
    ``shared``: caches to reuse across strategies of one search; ``tight``: memory may not hold
    every layout, so ``can_hold`` is worth asking first (the answer is the same either way)."""
    pr = RankPricer(cm, s, modes, costs, shared)
    if pr.L % pr.v or pr.C < pr.p or (tight and not can_hold(pr)):
        return None
    if pr.p == 1:
        counts = [pr.C]
    else:
        bound = upper
        if upper == INF:  # a first feasible layout bounds the DP; otherwise the caller's bound does
            bound, _ = evaluate_counts(pr, balanced_counts(pr.C, pr.p))
        # INF when the balanced layout does not fit either: an unbalanced one still may (the DP unbounded)
        counts = stage_dp.dp(pr, bound)
        if counts is None:
            return None
    t, evs = evaluate_counts(pr, counts)
    if t == INF or t >= upper:
        return None
    return result(pr, counts, t, evs)


def result(pr: RankPricer, counts: list[int], t: float, evs: list[RankEval]) -> PartitionResult:
    """The layout ``counts`` as stages and per-layer recompute (also read by ``stack_split.partition``)."""
    offs = [sum(counts[:r]) for r in range(pr.p)]
    stages = [(k * pr.C + offs[r], k * pr.C + offs[r] + counts[r]) for k in range(pr.v) for r in range(pr.p)]
    modes: dict[int, str] = {}
    for r in range(pr.p):
        modes.update(pr.assignment(r, offs[r], counts[r]))
    return PartitionResult(t, list(counts), stages, [modes[i] for i in range(pr.L)], evs)


class _Layout:
    """The distinct layer costs of a pricing in model order (groups), prefix counts of each, the
    fastest allowed time of each, and their first layers; with the per-layout caches of counts."""

    def __init__(self, costs: dict, L: int, modes: tuple[str, ...]):
        self.costs = costs   # kept: the cache key holds its id
        distinct: dict[int, LayerCost] = {}
        for i in range(L):
            distinct.setdefault(id(costs[i]), costs[i])
        self.groups = list(distinct.values())
        gid = {id(c): g for g, c in enumerate(self.groups)}
        self.prefix = [[0] * (L + 1) for _ in self.groups]   # prefix[g][i]: layers < i of group g
        for i in range(L):
            for g in range(len(self.groups)):
                self.prefix[g][i + 1] = self.prefix[g][i] + (gid[id(costs[i])] == g)
        self.base = [min(c.time(k) for k in modes) for c in self.groups]   # fastest allowed
        self.first = [next(i for i in range(L) if gid[id(costs[i])] == g) for g in range(len(self.groups))]
        self.counts: dict[int, dict] = {}       # by vpp: (o, c) -> layers of each group
        self.base_times: dict[int, dict] = {}   # by vpp: (o, c) -> base time
