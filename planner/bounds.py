"""What the search knows before it partitions a configuration: memory floors and step-time lower
bounds, and the one pricing per intra-stage sharding they read (``Space``, the search's state).

Every bound here stays at or under the price the partition DP (``partition``) and the estimate
(``CostModel.estimate``) give the configuration, whatever its layout and recompute: the search
drops a configuration when its bound reaches the k-th best plan found, so a bound that overshot
would change the answer (``tests/test_planner.py`` checks the search against exhaustive
enumeration and against ``search(..., exhaustive=True)``).
"""

from __future__ import annotations

import heapq
from collections import Counter
from dataclasses import dataclass, field
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
from autopar.cost_models.layer_cost import shards_for, shared_core_sync
from autopar.cost_models.layer_model import saved_bytes
from autopar.cost_models.memory import bytes_per_param, grads_freed_before_activation_peak, model_state_bytes
from autopar.cost_models.moe_cost import ring_exposed
from autopar.cost_models.pipeline import in_flight_microbatches, weight_grad_fraction
from autopar.cost_models.recompute_cost import selective_bytes
from autopar.cost_models.runtime_memory import floor_block_saved, floor_output_bytes
from autopar.planner import partition as part
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


@dataclass(frozen=True)
class Floor:
    """Memory-floor terms of one intra-stage sharding over the whole model (no pricing)."""

    dense: float     # parameters of every layer on its pipeline rank (tp-sharded), summed
    expert: float
    act: float       # smallest saved activations per micro-batch the allowed recompute gives
    act_base: float  # saved activations per micro-batch with the fastest allowed recompute
    temps: float
    saves: tuple     # per block template: (layers, {mode: bytes one layer saves per micro-batch})
    # states by (parameters, groups, zero, offload): one dict for every floor of a search (``Space.floor``),
    # which reads the parameters alone (shardings of one tp and ep*etp share them)
    memo: dict = field(default_factory=dict, compare=False, repr=False)

    def states(self, cm: CostModel, sh: Sharding, zero: int, offload: bool) -> float:
        key = ("states", self.dense, self.expert, sh.dp * sh.cp, sh.edp, zero, offload)
        if key not in self.memo:
            self.memo[key] = self._states(cm, sh, zero, offload)
        return self.memo[key]

    def _states(self, cm: CostModel, sh: Sharding, zero: int, offload: bool) -> float:
        if offload:  # as CostModel.rank_memory: CPUOffloadPolicy keeps shards, gradients, AdamW states on the host
            return 0.0 if zero >= 3 else (self.dense + self.expert) * bytes_per_param(cm.dtype)[0]
        ds = model_state_bytes(self.dense, cm.dtype, zero, sh.dp * sh.cp)
        es = model_state_bytes(self.expert, cm.dtype, zero, sh.edp)
        return ds.total + es.total - (ds.optimizer + es.optimizer if offload else 0.0)

    def host_bytes(self, cm: CostModel, sh: Sharding) -> float:
        """Mean over pipeline ranks of what offload keeps in host memory (as ``CostModel.rank_memory``)."""
        key = ("host", self.dense, self.expert, sh.dp * sh.cp, sh.edp, sh.pp)
        if key not in self.memo:
            self.memo[key] = self._host_bytes(cm, sh)
        return self.memo[key]

    def _host_bytes(self, cm: CostModel, sh: Sharding) -> float:
        return (model_state_bytes(self.dense, cm.dtype, 3, sh.dp * sh.cp).total
                + model_state_bytes(self.expert, cm.dtype, 3, sh.edp).total) / sh.pp

    def grads(self, cm: CostModel, sh: Sharding, zero: int, offload: bool) -> float:
        """The gradient part of ``states`` (none on the device under offload)."""
        if offload:
            return 0.0
        g = bytes_per_param(cm.dtype)[1]
        return (self.dense / (sh.dp * sh.cp if zero >= 2 else 1) + self.expert / (sh.edp if zero >= 2 else 1)) * g

    def resident(self, cm: CostModel, sh: Sharding, zero: int, offload: bool, warm: bool) -> float:
        """States that sit beside the activations at the peak: without the gradients where the step
        frees them before its activation peak (``warm``: ``memory.grads_freed_before_activation_peak``;
        the peak then holds the larger of the two, ``warmup_only_activations``)."""
        key = ("resident", self.dense, self.expert, sh.dp * sh.cp, sh.edp, zero, offload, warm)
        hit = self.memo.get(key)
        if hit is None:
            hit = self.memo[key] = self.states(cm, sh, zero, offload) - (
                self.grads(cm, sh, zero, offload) if warm else 0.0)
        return hit

    def bytes(self, cm: CostModel, sh: Sharding, zero: int, offload: bool, in_flight: float,
              warm: bool = False) -> float:
        """Mean over pipeline ranks of states + activations: the most loaded rank holds at least this
        (``warm``: the larger of the gradients and the activations, summed over ranks)."""
        acts = self.act * in_flight
        if warm:
            acts = max(acts, self.grads(cm, sh, zero, offload))
        return (self.resident(cm, sh, zero, offload, warm) + acts + self.temps) / sh.pp

    def recompute_time(self, cm: CostModel, sh: Sharding, k: Knobs, in_flight: float, usable: float,
                       rc: list[dict], warm: bool = False, scale: float = 1.0) -> float:
        """Least recompute time per micro-batch (all ranks together) that brings the mean rank
        under ``usable``: a fractional knapsack over the block templates (``rc``: extra time of
        one layer per mode, times ``scale``), a relaxation of ``recompute.choose`` summed over ranks."""
        room = (sh.pp * usable - self.resident(cm, sh, k.zero, k.offload, warm) - self.temps) / in_flight
        need = self.act_base - room
        if need <= 0:
            return 0.0
        extra = 0.0
        for rate, cap in self.offers(rc, scale):
            take = min(cap, need)
            extra, need = extra + rate * take, need - take
            if need <= 0:
                break
        return extra

    def offers(self, rc: list[dict], scale: float) -> list[tuple[float, float]]:
        """``recompute_time``'s offers, cheapest first: per block template, the cheapest seconds per byte saved
        of any mode (``rc`` times ``scale``) and the most bytes one saves, over its layers. Worked out once per
        (saves, ``rc``, ``scale``): the memo keeps both objects, so a key's ids stay theirs."""
        key = ("offers", id(self.saves), id(rc), scale)
        hit = self.memo.get(key)
        if hit is not None and hit[0] is self.saves and hit[1] is rc:
            return hit[2]
        offers = []
        for (n, saves), times in zip(self.saves, rc):
            useful = [(times[m] * scale / b, b) for m, b in saves.items() if b > 0]   # x * 1.0 is x
            if useful:   # cheapest rate, most bytes: looser than any real mode choice
                offers.append((min(r for r, _ in useful), n * max(b for _, b in useful)))
        self.memo[key] = (self.saves, rc, sorted(offers))
        return self.memo[key][2]


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


def floor_terms(cm: CostModel, sh: Sharding, modes: tuple[str, ...], cache: dict | None = None,
                memo: dict | None = None, gb: int = 0) -> Floor:
    """Same formulas as ``layer_cost.price_layer`` for parameters and ``layer_model.saved_bytes``.
    ``modes[0]`` is the fastest allowed recompute (none unless the user fixed another). ``cache``: the
    activation terms by the ``Shards`` they read (shardings differing in ep / etp alone share them);
    ``memo``: the ``Floor.memo`` to share (a fresh one if None); ``gb``: the probe's (unread: shares the search's)."""
    shards = shards_for(probe(sh, gb))
    acts = None if cache is None else cache.get((shards, modes))
    if acts is None:
        acts = _floor_acts(cm, shards, modes, probe(sh, gb))
        if cache is not None:
            cache[shards, modes] = acts
    dense = expert = 0.0
    for t in cm.templates:
        n = len(t.indices) if t.kind == "block" else 1
        dense += n * ((t.params_tp + t.params_vocab) / sh.tp + t.params_rep)
        expert += n * t.params_expert / (sh.ep * sh.etp)
    return Floor(dense, expert, *acts, memo={} if memo is None else memo)


def _floor_acts(cm: CostModel, shards, modes: tuple[str, ...], s) -> tuple:
    """``floor_terms``' (act, act_base, temps, saves); ``s``: the probe (what the stack's own terms read)."""
    act = act_base = temps = 0.0
    saves = []
    for t in cm.templates:
        n = len(t.indices) if t.kind == "block" else 1
        if t.kind == "block":
            # the emitted programs' selective keeps less than the none set (recompute_cost.selective_bytes)
            sel = selective_bytes(t, t.ops, shards, cm.ctx.dtype_bytes)[0] if cm.ctx.runtime == "torch" else 0.0
            # compiled blocks keep fewer of the per-op policy's outputs, as the price counts (layer_cost.price_layer)
            by_mode = floor_block_saved(t, {k: saved_bytes(t, shards, k, cm.ctx.compile != "none")
                                            + (sel if k == "selective" else 0.0) for k in modes}, s, cm)
            act += n * min(by_mode.values())
            act_base += n * by_mode[modes[0]]
            saves.append((n, {k: by_mode[modes[0]] - b for k, b in by_mode.items() if k != modes[0]}))
        else:
            saved, temp = floor_output_bytes(t, s, shards, cm.ctx)
            act, act_base, temps = act + saved, act_base + saved, temps + temp
    return act, act_base, temps, tuple(saves)


@lru_cache(maxsize=4096)
def min_in_flight(pp: int, m: int, schedule: str, v: int) -> float:
    """Fewest micro-batches any rank holds (the count falls or stays flat with the rank)."""
    return min(in_flight_microbatches(r, pp, m, schedule, v) for r in (0, pp - 1))


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
    edges: tuple[float, float]    # embedding and output layer times (on the first / last rank)
    base: list[float]   # every block's time with the fastest allowed recompute, in model order
    min_block_no_cp: float   # the fastest block without context-parallel exposure (bounds smaller micro-batches)
    fwds: tuple = ()    # (forward seconds of a block, blocks with it): the windows of a context-parallel ring


class Space:
    """State of one search: caches keyed by sharding, the work queue, the stats."""

    def __init__(self, cm: CostModel, cons: Constraints, gb: int):
        self.cm, self.cons, self.gb, self.stats = cm, cons, gb, SearchStats()
        self.usable = float(cm.gpu.usable_mem_bytes)
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
        per[pipeline.stage_rank(0, p, k.schedule)] += pr.edges[0]
        per[pipeline.stage_rank(p * v - 1, p, k.schedule)] += pr.edges[1]
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
