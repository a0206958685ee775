"""What the search knows before it partitions a configuration: step-time lower bounds, the memory
floors (``memory_floor.Floor``) and the one pricing per intra-stage sharding they read (``Space``, the
search's state).

Every bound here stays at or under the price the partition DP (``partition``) and the estimate
(``CostModel.estimate``) give the configuration, whatever its layout and recompute: the search
drops a configuration when its bound reaches the k-th best plan found, so a bound that overshot
would change the answer (``tests/test_planner.py`` checks the search against exhaustive
enumeration and against ``search(..., exhaustive=True)``).
"""

from __future__ import annotations

import heapq
from collections import Counter
from dataclasses import dataclass
from functools import lru_cache
from operator import attrgetter, mul, sub

from autopar.cost_models import fsdp
from autopar.cost_models.comm import collective_time
from autopar.cost_models.cp_cost import gathered_exposed
from autopar.cost_models.estimate import (
    OPTIMIZER_BYTES_PER_PARAM,
    CostModel,
    even_stages,
    offload_step_time,
)
from autopar.cost_models.fsdp import exposed_sync, gathers_per_unit, syncs_once_per_step, unit_syncs_per_step
from autopar.cost_models.layer_cost import shared_core_sync
from autopar.cost_models.memory import bytes_per_param, grads_freed_before_activation_peak
from autopar.cost_models.moe_cost import ring_exposed
from autopar.cost_models.pipeline import end_ranks, in_flight_microbatches, weight_grad_fraction
from autopar.planner import partition as part
from autopar.planner.memory_floor import Floor, floor_terms, min_in_flight  # noqa: F401 (groups, tests read them here)
from autopar.planner.probes import pricing_key, probe  # noqa: F401  (re-exported: the search's modules read them here)
from autopar.planner.space import (
    Constraints,
    Knobs,
    KnobSet,
    SearchStats,
    Sharding,
    knob_set,
)
from autopar.techniques import pipeline
from autopar.techniques.dp_program import whole_backward


def grads_freed(sp: "Space", sh: Sharding, schedule: str, vpp: int) -> bool:
    """Whether some rank's activation peak may come before its gradients exist: the program frees
    them (``memory.grads_freed_before_activation_peak``) and the first rank (the most in flight)
    warms up with every micro-batch (``memory.warmup_only_activations``)."""
    m = sp.gb // (sh.dp * sh.mbs)
    key = (sh.pp, m, schedule, vpp)   # all it reads (the probe's pp, schedule and micro-batch count)
    if key not in sp.freed:
        sp.freed[key] = in_flight_microbatches(0, sh.pp, m, schedule, vpp) >= m and \
            grads_freed_before_activation_peak(probe(sh, sp.gb, schedule=schedule, vpp=vpp), sp.cm.ctx.runtime)
    return sp.freed[key]


def curves_monotone(cm: CostModel) -> bool:
    """Per-unit op time never grows with size when every efficiency curve is non-decreasing
    and no measured op table overrides them: then a bigger micro-batch never costs more per
    sequence (collectives too: latency + size / bandwidth)."""
    g = cm.timer.gpu
    curves = (g.matmul_eff.root, g.membound_eff.root, g.attention_eff.root)
    return not cm.timer.measured and all(b[1] >= a[1] for c in curves for a, b in zip(c, c[1:]))


@dataclass
class Priced:
    """One pricing of an intra-stage sharding (``layer_costs``) and the sums the bounds use."""

    costs: dict
    total: float        # forward + backward of every layer without recompute, per micro-batch
    total_no_cp: float  # the same without context-parallel exposure (bounds smaller micro-batches)
    min_block: float    # the fastest transformer block
    params: tuple[float, float]   # (dense, expert) parameters of the blocks on their ranks
    rc: list[dict]      # per block template: extra backward time of one layer per recompute mode
    fbw: tuple[float, float, float]   # blocks' forward, backward and weight-gradient sums (bubble share)
    min_dense: float    # parameters of the smallest block (dense, on its rank): every rank holds one
    max_block: float    # the slowest transformer block
    edges: tuple[float, float]    # embedding and output layer times (on the ranks pipeline.end_ranks names)
    base: list[float]   # every block's time with the fastest allowed recompute, in model order
    min_block_no_cp: float   # the fastest block without context-parallel exposure (bounds smaller micro-batches)
    fwds: tuple = ()    # (forward seconds of a block, blocks with it): the windows of a context-parallel ring


class Space:
    """State of one search: caches keyed by sharding, the work queue, the stats."""

    def __init__(self, cm: CostModel, cons: Constraints, gb: int):
        self.cm, self.cons, self.gb, self.stats = cm, cons, gb, SearchStats()
        self.usable = float(cm.usable_mem_bytes)
        self.floors: dict[tuple, Floor] = {}
        self.prices: dict[Sharding, Priced] = {}
        self.queue: list[tuple] = []
        self.pushes = 0           # tie-breaker: equal bounds leave the queue in insertion order
        self.shared: dict = {}    # caches the partition DP reuses across configurations
        self.knob_cache: dict = {}
        self.rule_error: str | None = None
        # the optimizer step streams at best at the highest HBM efficiency of the profile
        self.opt_bw = cm.timer.bw * max(e for _, e in cm.timer.gpu.membound_eff.root)
        self.wfrac = {id(t): weight_grad_fraction(t.ops) for t in cm.templates if t.kind == "block"}
        self.syncs: dict[tuple, float] = {}   # gradient-sync floors by (dp group, tp, zero 1/2)
        self.p2ps: dict[tuple, float] = {}
        self.freed: dict[tuple, bool] = {}    # grads_freed by (pp, micro-batches, schedule, vpp)
        self.memo: dict[tuple, float] = {}    # bound terms by the values they read (optimizer, cp ring)
        self.knob_sets: dict[int, KnobSet] = {}   # knob_options lists (shared by rows) summarised once
        self.by_sh: dict[tuple, object] = {}      # floor and pricing by the sharding itself (the same objects)
        self.floor_acts: dict[tuple, tuple] = {}  # floor_terms' activation terms by Shards
        self.floor_memo: dict[tuple, object] = {}  # every floor's Floor.memo (states by parameters and groups)

    def knobs(self, knobs: list) -> KnobSet:
        ks = self.knob_sets.get(id(knobs))
        if ks is None or ks.knobs is not knobs:
            ks = self.knob_sets[id(knobs)] = knob_set(knobs)
        return ks

    def warm(self, sh: Sharding, ks: KnobSet) -> bool:
        """``grads_freed`` for some schedule of the row (it reads pp, the micro-batch count and the schedules)."""
        key = ("warm", sh.pp, self.gb // (sh.dp * sh.mbs), id(ks))   # ks: its pairs, kept alive by ``knob_sets``
        hit = self.memo.get(key)
        if hit is None:
            hit = self.memo[key] = any(grads_freed(self, sh, *x) for x in ks.pairs)
        return hit

    def push(self, lb: float, kind: str, *payload) -> None:
        self.pushes += 1
        heapq.heappush(self.queue, (lb, self.pushes, kind, payload))

    def floor(self, sh: Sharding) -> Floor:
        hit = self.by_sh.get(("floor", sh))   # by the sharding itself first: most calls ask again for one
        if hit is None:
            key = (sh.tp, sh.cp, sh.ep, sh.etp, sh.sp, sh.mbs)
            if key not in self.floors:
                self.floors[key] = floor_terms(self.cm, sh, self.cons.modes, self.floor_acts, self.floor_memo, self.gb)
            hit = self.by_sh["floor", sh] = self.floors[key]
        return hit

    def priced(self, sh: Sharding) -> Priced:
        hit = self.by_sh.get(("priced", sh))
        if hit is None:
            hit = self.by_sh["priced", sh] = self._priced(sh)
        return hit

    def _priced(self, sh: Sharding) -> Priced:
        key = pricing_key(sh)
        if key not in self.prices:
            costs = self.cm.layer_costs(probe(key, self.gb))
            self.stats.layer_pricings += 1
            wfrac = [self.wfrac[id(self.cm.blocks[i])] for i in range(self.cm.num_layers)]
            self.prices[key] = priced_terms(self.cm, costs, self.cons.modes, wfrac)
        return self.prices[key]

    def p2p(self, sh: Sharding) -> float:
        """``CostModel.p2p_time`` of the sharding (what it reads: pp, mbs, cp, tp, sp)."""
        if sh.pp == 1:
            return 0.0
        key = (sh.pp, sh.mbs, sh.cp, sh.tp, sh.sp)
        if key not in self.p2ps:
            self.p2ps[key] = self.cm.p2p_time(probe(sh, self.gb))
        return self.p2ps[key]



def priced_terms(cm: CostModel, costs: dict, modes: tuple[str, ...], wfrac: list[float]) -> Priced:
    """The sums ``Priced`` holds, of one ``layer_costs`` pricing; ``wfrac``: each block's weight-gradient
    share. Each distinct LayerCost's times are read once (identical layers share one): the sums run
    over the same values in the same order, so they are the same floats."""
    blocks = [costs[i] for i in range(cm.num_layers)]
    base = modes[0]   # the fastest recompute allowed: every block pays at least it
    at_base: dict[int, tuple[float, float]] = {}   # id -> (time at base, cp exposure)
    for c in blocks:
        if id(c) not in at_base:
            at_base[id(c)] = (c.time(base), c.comm_s.get("cp", 0.0))
    times = [at_base[id(c)][0] for c in blocks]
    cps = [at_base[id(c)][1] for c in blocks]
    edge_costs = [c for c in (costs["embedding"], costs["output"]) if c]
    total = sum(times) + sum(c.time("none") for c in edge_costs)
    no_cp = total - sum(cps + [c.comm_s.get("cp", 0.0) for c in edge_costs])
    rc = [{m: costs[t.indices[0]].time(m) - costs[t.indices[0]].time(base) for m in modes}
          for t in cm.templates if t.kind == "block"]
    fwds, bwds = list(map(attrgetter("fwd_s"), blocks)), list(map(attrgetter("bwd_s"), blocks))
    fbw = (sum(fwds), sum(bwds), sum(map(mul, bwds, wfrac)))
    dense = list(map(attrgetter("params_dense"), blocks))
    edges = tuple(c.time("none") if c else 0.0 for c in (costs["embedding"], costs["output"]))
    return Priced(costs, total, no_cp, min(times), (sum(dense), sum(map(attrgetter("params_expert"), blocks))), rc,
                  fbw, min(dense), max(times), edges, times, min(map(sub, times, cps)), tuple(Counter(fwds).items()))


def cp_exposure_floor(sp: Space, sh: Sharding, lo: Priced | None, b_lo: int) -> float:
    """Context-parallel ring exposure of every block per micro-batch at ``sh.mbs >= b_lo``, without
    pricing that micro-batch: each ring step moves ``mbs * s / cp`` tokens' K and V
    (``layer_cost._layer_comm``) and hides behind at most the block's whole forward, which per
    sequence takes no longer than at ``b_lo`` (non-decreasing efficiency curves); the exposure
    (``moe_cost.ring_exposed``) only falls as that window grows. ``lo`` is not read (None) under
    ``--runtime torch``: its gathered K/V have no window."""
    if sh.cp <= 1:
        return 0.0
    if sp.cm.ctx.runtime == "torch":   # autopar's gathered K/V: blocking, no window (cost_models.cp_cost)
        key = ("cp-gather", sh.mbs, sh.cp, sh.tp, sp.cm.num_layers)   # every block gathers
        if key not in sp.memo:
            sp.memo[key] = key[-1] * gathered_exposed(sh.mbs, sh.cp, sh.tp, sp.cm.ctx, shared_core_sync(sp.cm.ctx))
        return sp.memo[key]
    key = ("cp", sh.mbs, sh.cp, sh.tp, lo.fwds, b_lo)   # what it reads (lo: its blocks' forwards)
    if key not in sp.memo:
        cm, scale = sp.cm, sh.mbs / b_lo
        kv = sh.mbs * cm.ctx.seq_len / sh.cp * cm.ctx.kv_bytes_per_token / sh.tp
        step = collective_time("p2p", kv, sh.cp, sh.tp, cm.cluster, fits=cm.ctx.fits).time_s
        sp.memo[key] = sum(n * ring_exposed(sh.cp, step, f * scale) for f, n in lo.fwds)
    return sp.memo[key]


def pipeline_bound(sp: Space, sh: Sharding, k: Knobs, total: float, p2p: float = 0.0,
                    peak: float = 0.0, share: float = 0.0, sync: float = 0.0) -> float:
    """``T = A max P + B sum P + K + max D`` (``partition``) with the slowest rank at its floor
    ``peak`` (``peak_floor``; at least the mean) and ``sum P >= total``. ``share``: a zero-bubble
    schedule's bubble relative to 1F1B's (``partition.coefficients``; 0 where it is not known
    yet). ``sync``: the gradient synchronisation of the rank holding the most layers, of which
    one micro-batch's forward and backward hide at most ``max P`` (``partition.RankPricer.dp_time``,
    ``overlap.grad_sync_exposed``): ``A·x + max(0, sync - x)`` over ``x >= peak`` is least at
    ``x = peak`` for ``A >= 1`` and at ``x = max(peak, sync)`` below, so the floor stands in with
    ``min(1, A)`` of the excess. The stack's per-step overhead is a constant of every step."""
    m = sp.gb // (sh.dp * sh.mbs)
    A, B, K = part.schedule_coefficients(sh.pp, m, k.schedule, k.vpp, p2p, share)
    peak = max(total / sh.pp, peak)
    exposed = max(0.0, sync - peak) * min(1.0, A)
    return A * peak + B * total + K + exposed + sp.cm.stack.step_overhead_s


def held_layers(sp: Space, sh: Sharding, k: Knobs) -> int:
    """Layers on the most loaded rank, at least: some rank holds ``ceil(C / pp)`` positions of each
    of the ``v`` periods of ``C = layers / v`` layers (V-shaped: ``ceil(layers / pp)``)."""
    L = sp.cm.num_layers
    return -(-L // sh.pp) if k.schedule in pipeline.V_SHAPED else k.vpp * -(-(L // k.vpp) // sh.pp)


def peak_floor(sp: Space, sh: Sharding, k: Knobs, pr: Priced) -> float:
    """Lower bound of the slowest rank's time per micro-batch (``max P``), every layer at its
    fastest allowed recompute. V-shaped schedules use the even split (``_v_shaped``): exact per
    rank. Looped: the rank holding the embedding (and the one holding the output layer) takes
    ``n`` layers, ``v | n``; it is at least ``edge + n * fastest block`` and the other ranks'
    mean is at least ``(total - edge - n * slowest block) / (pp - 1)``; the minimum over ``n``
    of the larger of the two bounds ``max P``."""
    # all it reads (``pr`` lives in ``sp.prices``): the schedule only where V-shaped (looped ones share a floor)
    key = ("peak", id(pr), sh.pp, k.schedule if k.schedule in pipeline.V_SHAPED else "", k.vpp)
    if key not in sp.memo:
        sp.memo[key] = _peak_floor(sp, sh, k, pr)
    return sp.memo[key]


def _peak_floor(sp: Space, sh: Sharding, k: Knobs, pr: Priced) -> float:
    p, v = sh.pp, k.vpp
    held = held_layers(sp, sh, k) * pr.min_block
    if p == 1:
        return held
    if k.schedule in pipeline.V_SHAPED:
        per = [sum(pr.base[i] for i in layers) for layers in v_rank_layers(sp.cm.num_layers, p, v, k.schedule)]
        for r, edge in zip(end_ranks(p, v, k.schedule), pr.edges):   # rank 0 holds both ends
            per[r] += edge
        return max(max(per), held)
    base_total = pr.total
    out = held
    for edge in pr.edges:
        out = max(out, edge_rank_floor(edge, base_total - edge, pr.min_block, pr.max_block, p, v,
                                        sp.cm.num_layers // v))
    return out


@lru_cache(maxsize=256)
def v_rank_layers(L: int, p: int, v: int, schedule: str) -> tuple[tuple[int, ...], ...]:
    """Each rank's layers, in model order, under the even split of a V-shaped schedule (``search._v_shaped``)."""
    stages = even_stages(L, p * v)
    return tuple(tuple(i for j in pipeline.rank_stages(r, p, v, schedule) for i in range(*stages[j])) for r in range(p))


def edge_rank_floor(edge: float, rest: float, lo: float, hi: float, p: int, v: int, C: int) -> float:
    """``min over n = v c, 1 <= c <= C - p + 1`` of ``max(edge + n lo, (rest - n hi) / (p - 1))``:
    the first term grows with ``n``, the second falls, so the minimum sits next to where they cross."""
    def f(c: int) -> float:
        return max(edge + v * c * lo, (rest - v * c * hi) / (p - 1))
    cross = (rest - (p - 1) * edge) / (v * ((p - 1) * lo + hi)) if (p - 1) * lo + hi > 0 else 1.0
    c0 = min(max(int(cross), 1), C - p + 1)
    return min(f(c) for c in {c0, min(c0 + 1, C - p + 1)})


def optimizer_floor(sp: Space, sh: Sharding, k: Knobs, pr: Priced) -> float:
    """``CostModel.optimizer_time`` of the mean rank (its cost grows at least linearly with
    the shard, so the most loaded rank pays at least this)."""
    key = ("opt", pr.params, sh.dp * sh.cp, sh.edp, sh.pp, k.zero, k.offload)
    if key not in sp.memo:
        sp.memo[key] = _optimizer_floor(sp, sh, k, pr)
    return sp.memo[key]


def _optimizer_floor(sp: Space, sh: Sharding, k: Knobs, pr: Priced) -> float:
    dense, expert = pr.params
    if k.offload:   # CPUOffloadPolicy shards at any ZeRO stage; at least one gather and one reduction per step
        return offload_step_time((dense / (sh.dp * sh.cp) + expert / sh.edp) / sh.pp, sp.cm.dtype, sp.cm.gpu)
    local = (dense / (sh.dp * sh.cp if k.zero >= 1 else 1) + expert / (sh.edp if k.zero >= 1 else 1)) / sh.pp
    return local * OPTIMIZER_BYTES_PER_PARAM / sp.opt_bw


def grad_sync_floor(sp: Space, sh: Sharding, k: Knobs, pr: Priced) -> tuple[float, float]:
    """Below ZeRO-3 (``partition.RankPricer.dp_time``): (the last bucket every rank synchronises
    after its last backward, ``min(fsdp.last_bucket_bytes, its dense gradient bytes)``; the whole dense
    gradient synchronisation of the rank holding the most layers). Every rank holds at least the
    smallest block and collective times grow with the size. Under ``fsdp.syncs_after_backward`` (nothing
    hides it): (that whole synchronisation, 0)."""
    n = sh.dp * sh.cp
    if gathers_per_unit(sp.cm.ctx.runtime, k.zero, k.offload) or n <= 1 or pr.min_dense <= 0:  # FSDP: no step-end sync
        return 0.0, 0.0
    gbytes = bytes_per_param(sp.cm.dtype)[1]
    last = fsdp.last_bucket_bytes(probe(sh, sp.gb, k), sp.cm.dtype)
    sizes = (min(last, pr.min_dense * gbytes), held_layers(sp, sh, k) * pr.min_dense * gbytes)
    out = []
    for size in sizes:
        key = (size, n, sh.tp, k.zero in (1, 2))
        if key not in sp.syncs:
            sp.syncs[key] = sp.cm.grad_sync_time(size, n, sh.tp, probe(sh, sp.gb, k))
        out.append(sp.syncs[key])
    key = ("exposed", sh, k.zero, k.offload, whole_backward(k.schedule))   # all exposed_sync reads of the probe
    if key not in sp.memo:
        sp.memo[key] = exposed_sync(sp.cm, probe(sh, sp.gb, k))
    if sp.memo[key]:   # replicate under a pipeline,
        return out[1], 0.0   # ShardedAdamW under zero-bubble schedules: the whole sync after the last backward
    return out[0], out[1]


def zero3_floor(sp: Space, sh: Sharding, zero: int = 3, schedule: str = "1f1b") -> float:
    """ZeRO-3 (and FSDP ZeRO-2, ``zero`` 2: ``fsdp.gathers_per_unit``) exposed time is a sum over layers
    (``CostModel.zero3_layer_exposed`` per micro-batch) plus the step's edges once per rank; the
    slowest rank carries at least the mean of the sum; once per step where the ``schedule`` defers FSDP's
    traffic to the stage's last backward (``fsdp.syncs_once_per_step``)."""
    # all it reads: the sharding's pricing and the probe of this sharding, stage and deferral
    key = ("zero3", sh, zero, syncs_once_per_step(sp.cm.ctx.runtime, sh.pp, schedule))
    if key not in sp.memo:
        sp.memo[key] = _zero3_floor(sp, sh, zero, schedule)
    return sp.memo[key]


def _zero3_floor(sp: Space, sh: Sharding, zero: int, schedule: str) -> float:
    costs = sp.priced(sh).costs
    s = probe(sh, sp.gb, zero_stage=zero, schedule=schedule)
    if s.dp * s.cp <= 1:
        return 0.0
    seen: dict[int, float] = {}
    for i in range(sp.cm.num_layers):
        if id(costs[i]) not in seen:
            seen[id(costs[i])] = sp.cm.zero3_layer_exposed(s, costs[i])
    return sum(seen[id(costs[i])] for i in range(sp.cm.num_layers)) * unit_syncs_per_step(sp.cm, s) / sh.pp
