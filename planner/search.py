"""Strategy search: enumerate the parallel configurations, prune by bounds, partition the best.

Space (each configuration = one ``Strategy``; its stage partition and per-layer recompute
are then chosen by ``partition``):

- dense mapping ``dp * tp * cp * pp = world``; tp divides heads, kv heads (not MLA), the FFN
  width and the vocabulary; ``seq % 2cp = 0``; ``pp <= layers``; tp stays inside a node
  (``tp | gpus_per_node``) unless ``cross_node``;
- MoE layers (Parallel Folding): ``ep | experts``, ``etp | expert width``, ``ep * etp`` divides
  ``dp * tp * cp`` and stays inside a node unless ``cross_node``;
- sequence parallel on or off when ``tp > 1``; micro-batch ``mbs`` any divisor of
  ``global_batch / dp`` (gradient accumulation = the number of micro-batches);
- ZeRO 0-3 when some gradient is reduced (``dp * cp > 1`` or ``edp > 1``); ZeRO-Offload on or
  off where the GPU profile prices host transfers;
- schedule: 1F1B, or interleaved 1F1B with ``vpp = v`` when ``v | layers``, ``layers / v >= pp``,
  ``pp | m`` and ``(pp - 1) m >= v pp`` (the condition under which per-rank recompute is
  exact, see ``partition``; a user-named vpp skips it). GPipe has the same step time as 1F1B
  in the cost model and holds more micro-batches, so it is searched only when named.
- recompute per layer (none / selective / op / full), chosen with the partition.

Order of work (nothing a bound rules out is expanded further):

1. every sharding gets a memory floor that needs no pricing (model states with the most
   sharding ZeRO / offload allow, the smallest activations any recompute gives, averaged
   over pipeline ranks); the micro-batch loop stops at the first mbs that fails;
2. one pricing per (tp, cp, ep, etp, sp) at the largest micro-batch bounds every row: with
   non-decreasing efficiency curves the price per sequence never rises with mbs;
3. a work queue ordered by lower bound: a *row* entry is priced when it comes out and queues
   its configurations with a tighter bound (balanced stages, optimizer floor); a ZeRO-3
   configuration gets its gather/scatter floor added once; a configuration that comes out
   runs the partition DP; the loop ends when the smallest bound reaches the k-th best.
"""

from __future__ import annotations

import heapq
import time
from dataclasses import dataclass

from autopar import techniques
from autopar.core.strategy import Strategy
from autopar.cost_models.estimate import (
    OPTIMIZER_BYTES_PER_PARAM,
    CostModel,
    RankReport,
    even_stages,
    offload_step_time,
)
from autopar.cost_models.layer_cost import shards_for
from autopar.cost_models.layer_model import saved_bytes
from autopar.cost_models.memory import bytes_per_param, model_state_bytes
from autopar.cost_models.pipeline import in_flight_microbatches
from autopar.errors import InputError
from autopar.planner import partition as part
from autopar.planner import rank
from autopar.planner.space import (  # noqa: F401  (re-exported: the planner's public names)
    STRATEGY_FIELDS,
    Candidate,
    Constraints,
    Knobs,
    SearchResult,
    SearchStats,
    Sharding,
    knob_options,
    rule_spec,
    schedule_options,
    shardings,
)
from autopar.techniques import offload, pipeline


# ----- bounds -----------------------------------------------------------------------------------
def probe(sh: Sharding, gb: int, k: Knobs | None = None, **kw) -> Strategy:
    """A Strategy with this sharding, unvalidated (for bounds and pricing)."""
    vals = dict(Strategy().model_dump(), dp=sh.dp, tp=sh.tp, pp=sh.pp, cp=sh.cp, ep=sh.ep, etp=sh.etp,
                micro_batch=sh.mbs, global_batch=gb, sequence_parallel=sh.sp)
    if k is not None:
        vals.update(zero_stage=k.zero, offload_optimizer=k.offload, schedule=k.schedule, vpp=k.vpp)
    vals.update(kw)
    return Strategy.model_construct(**vals)


def pricing_key(sh: Sharding) -> Sharding:
    """The sharding ``layer_costs`` depends on: per-layer prices do not depend on pp, and on dp
    only through ``dp / edp = ep*etp / (tp*cp)``, so dp = ep*etp prices every dp alike
    (tests/test_planner.py checks the claim)."""
    return Sharding(sh.tp, sh.cp, 1, sh.ep * sh.etp, sh.ep, sh.etp, sh.sp, sh.mbs)


@dataclass(frozen=True)
class Floor:
    """Memory-floor terms of one intra-stage sharding over the whole model (no pricing)."""

    dense: float     # parameters of every layer on its pipeline rank (tp-sharded), summed
    expert: float
    act: float       # smallest saved activations per micro-batch the allowed recompute gives
    act_base: float  # saved activations per micro-batch with the fastest allowed recompute
    temps: float
    saves: tuple     # per block template: (layers, {mode: bytes one layer saves per micro-batch})

    def states(self, cm: CostModel, sh: Sharding, zero: int, offload: bool) -> float:
        if offload:  # as CostModel.rank_memory: CPUOffloadPolicy keeps shards, gradients, AdamW states on the host
            return 0.0 if zero >= 3 else (self.dense + self.expert) * bytes_per_param(cm.dtype)[0]
        ds = model_state_bytes(self.dense, cm.dtype, zero, sh.dp * sh.cp)
        es = model_state_bytes(self.expert, cm.dtype, zero, sh.edp)
        return ds.total + es.total - (ds.optimizer + es.optimizer if offload else 0.0)

    def host_bytes(self, cm: CostModel, sh: Sharding) -> float:
        """Mean over pipeline ranks of what offload keeps in host memory (as ``CostModel.rank_memory``)."""
        return (model_state_bytes(self.dense, cm.dtype, 3, sh.dp * sh.cp).total
                + model_state_bytes(self.expert, cm.dtype, 3, sh.edp).total) / sh.pp

    def bytes(self, cm: CostModel, sh: Sharding, zero: int, offload: bool, in_flight: float) -> float:
        """Mean over pipeline ranks of states + activations: the most loaded rank holds at least this."""
        return (self.states(cm, sh, zero, offload) + self.act * in_flight + self.temps) / sh.pp

    def recompute_time(self, cm: CostModel, sh: Sharding, k: Knobs, in_flight: float, usable: float,
                       rc: list[dict]) -> float:
        """Least recompute time per micro-batch (all ranks together) that brings the mean rank
        under ``usable``: a fractional knapsack over the block templates (``rc``: extra time of
        one layer per mode), a relaxation of ``recompute.choose`` summed over ranks."""
        room = (sh.pp * usable - self.states(cm, sh, k.zero, k.offload) - self.temps) / in_flight
        need = self.act_base - room
        if need <= 0:
            return 0.0
        offers = []
        for (n, saves), times in zip(self.saves, rc):
            useful = [(times[m] / b, b) for m, b in saves.items() if b > 0]
            if useful:   # cheapest rate, most bytes: looser than any real mode choice
                offers.append((min(r for r, _ in useful), n * max(b for _, b in useful)))
        extra = 0.0
        for rate, cap in sorted(offers):
            take = min(cap, need)
            extra, need = extra + rate * take, need - take
            if need <= 0:
                break
        return extra


def floor_terms(cm: CostModel, sh: Sharding, modes: tuple[str, ...]) -> Floor:
    """Same formulas as ``layer_cost.price_layer`` for parameters and ``layer_model.saved_bytes``.
    ``modes[0]`` is the fastest allowed recompute (none unless the user fixed another)."""
    shards = shards_for(probe(sh, 0))
    dense = expert = act = act_base = temps = 0.0
    saves = []
    for t in cm.templates:
        n = len(t.indices) if t.kind == "block" else 1
        dense += n * ((t.params_tp + t.params_vocab) / sh.tp + t.params_rep)
        expert += n * t.params_expert / (sh.ep * sh.etp)
        if t.kind == "block":
            by_mode = {k: saved_bytes(t, shards, k) for k in modes}
            act += n * min(by_mode.values())
            act_base += n * by_mode[modes[0]]
            saves.append((n, {k: by_mode[modes[0]] - b for k, b in by_mode.items() if k != modes[0]}))
        else:
            act += saved_bytes(t, shards, "none")
            act_base += saved_bytes(t, shards, "none")
            temps += t.temp_bytes * shards.tokens / (sh.tp if t.kind == "output" else 1)
    return Floor(dense, expert, act, act_base, temps, tuple(saves))


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


# ----- the search -------------------------------------------------------------------------------
class _Space:
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

    def push(self, lb: float, kind: str, *payload) -> None:
        self.pushes += 1
        heapq.heappush(self.queue, (lb, self.pushes, kind, payload))

    def floor(self, sh: Sharding) -> Floor:
        key = (sh.tp, sh.cp, sh.ep, sh.etp, sh.sp, sh.mbs)
        if key not in self.floors:
            self.floors[key] = floor_terms(self.cm, sh, self.cons.modes)
        return self.floors[key]

    def priced(self, sh: Sharding) -> Priced:
        key = pricing_key(sh)
        if key not in self.prices:
            costs = self.cm.layer_costs(probe(key, self.gb))
            self.stats.layer_pricings += 1
            blocks = [costs[i] for i in range(self.cm.num_layers)]
            edges = [c for c in (costs["embedding"], costs["output"]) if c]
            base = self.cons.modes[0]   # the fastest recompute allowed: every block pays at least it
            total = sum(c.time(base) for c in blocks) + sum(c.time("none") for c in edges)
            no_cp = total - sum(c.comm_s.get("cp", 0.0) for c in blocks + edges)
            rc = [{m: costs[t.indices[0]].time(m) - costs[t.indices[0]].time(base) for m in self.cons.modes}
                  for t in self.cm.templates if t.kind == "block"]
            self.prices[key] = Priced(costs, total, no_cp, min(c.time(base) for c in blocks),
                                      (sum(c.params_dense for c in blocks), sum(c.params_expert for c in blocks)), rc)
        return self.prices[key]


def search(cm: CostModel, global_batch: int, cons: Constraints | None = None, top_k: int = 5) -> SearchResult:
    """The ``top_k`` fastest configurations that fit, each with its stage partition and recompute."""
    t0 = time.perf_counter()
    cons = cons or Constraints()
    sp = _Space(cm, cons, int(cons.fixed.get("global_batch") or global_batch))
    stats = sp.stats
    _fill(sp)
    found: list[Candidate] = []
    while sp.queue:
        upper = found[top_k - 1].step_time_s if len(found) >= top_k else part.INF
        lb, _, kind, payload = heapq.heappop(sp.queue)
        if lb >= upper:
            stats.pruned_time += sum(len(p[1]) if k == "row" else 1 for _, _, k, p in sp.queue) + \
                (len(payload[1]) if kind == "row" else 1)
            break
        if kind == "row":
            _expand_row(sp, *payload)
        elif kind == "config" and payload[1].zero == 3:
            sp.push(lb + _zero3_floor(sp, payload[0]), "config3", *payload)
        else:
            stats.priced += 1
            cand = _partitioned(sp, *payload, upper)
            if cand is None:
                stats.infeasible += 1
                continue
            found.append(cand)
            found.sort(key=lambda c: c.step_time_s)
    ranked, dropped = rank.feasible_ranked(cm, found, top_k)   # printed order = estimate order + tie rule
    stats.infeasible += dropped
    stats.search_time_s = time.perf_counter() - t0
    return SearchResult(ranked, stats, sp.gb, rule_error=sp.rule_error)


def _partitioned(sp: _Space, sh: Sharding, k: Knobs, upper: float) -> Candidate | None:
    cm = sp.cm
    try:
        s = Strategy(**probe(sh, sp.gb, k).model_dump()).resolve(cm.cluster.world)
        cm.check(s)
        techniques.check(s, rule_spec(cm), cm.seq_len, emitted=True)
    except InputError as exc:  # a rule the enumeration does not test (none known): keep the reason
        sp.rule_error = sp.rule_error or exc.message
        return None
    modes = sp.cons.modes
    if s.schedule in pipeline.ZERO_BUBBLE:  # per-layer choices obey the emit rules on recompute too
        modes = tuple(m for m in modes if m in pipeline.ZB_RECOMPUTE) or modes
    if s.offload_optimizer:
        modes = tuple(m for m in modes if m in offload.OFFLOAD_RECOMPUTE) or modes
    if s.schedule in pipeline.V_SHAPED:
        return _v_shaped(cm, s, modes, upper)
    res = part.partition(cm, s, modes, upper, None, sp.shared)
    if res is None:
        return None
    return Candidate(_label(s, res.layer_recompute), res.stages, res.layer_recompute, res.step_time_s)


def _v_shaped(cm: CostModel, s: Strategy, modes: tuple[str, ...], upper: float) -> Candidate | None:
    """V-shaped schedules (two chunks per rank, the last next to the first) take the even split of
    the layers over the 2*pp stages (the partition DP assumes looped placement) and the fastest
    recompute mode, one for every layer, that fits."""
    stages = even_stages(cm.num_layers, s.pp * s.vpp)
    best = None
    for mode in modes:
        e = cm.estimate(s, stages, [mode] * cm.num_layers)
        if e.feasible and e.step_time_s < upper and (best is None or e.step_time_s < best[1].step_time_s):
            best = (mode, e)
    if best is None:
        return None
    layer_recompute = [best[0]] * cm.num_layers
    return Candidate(_label(s, layer_recompute), stages, layer_recompute, best[1].step_time_s)


def _label(s: Strategy, layer_recompute: list[str]) -> Strategy:
    """The strategy's recompute field: the one mode every layer uses, else the strongest used."""
    used = set(layer_recompute)
    strongest = next(m for m in ("full", "op", "selective", "none") if m in used)
    mode = used.pop() if len(used) == 1 else strongest
    return s.model_copy(update={"recompute": mode})


def _fill(sp: _Space) -> None:
    """Queue every sharding above the memory floor, bounded without pricing it."""
    stats, rows = sp.stats, []
    for row in shardings(sp.cm, sp.cons, sp.gb):
        for j, sh in enumerate(row):
            knobs = knob_options(sp.cm, sp.cons, sh, sp.gb, sp.knob_cache)
            stats.space += len(knobs)
            if not knobs:
                continue
            z, off = max(k.zero for k in knobs), any(k.offload for k in knobs)
            if sp.floor(sh).bytes(sp.cm, sh, z, off, 1.0) > sp.usable:
                rest = sum(len(knob_options(sp.cm, sp.cons, x, sp.gb, sp.knob_cache)) for x in row[j + 1:])
                stats.space += rest
                stats.pruned_memory += len(knobs) + rest
                break  # a larger micro-batch only needs more memory
            rows.append((sh, knobs))
    if not curves_monotone(sp.cm):
        for sh, knobs in rows:
            _expand_row(sp, sh, knobs)
        return
    biggest: dict[tuple, Sharding] = {}
    for sh, _ in rows:
        key = (sh.tp, sh.cp, sh.ep, sh.etp, sh.sp)
        if key not in biggest or sh.mbs > biggest[key].mbs:
            biggest[key] = sh
    probes = {key: (sp.priced(sh), sh.mbs) for key, sh in biggest.items()}
    for sh, knobs in rows:
        pr, b = probes[(sh.tp, sh.cp, sh.ep, sh.etp, sh.sp)]
        total, rc = pr.total_no_cp * sh.mbs / b, [{m: t * sh.mbs / b for m, t in x.items()} for x in pr.rc]
        best = Knobs(max(k.zero for k in knobs), any(k.offload for k in knobs), "1f1b", 1)
        extra = sp.floor(sh).recompute_time(sp.cm, sh, best, 1.0, sp.usable, rc)
        scheds = {Knobs(0, False, k.schedule, k.vpp) for k in knobs}   # zero and offload add nothing here
        sp.push(min(_pipeline_bound(sp, sh, k, total + extra) for k in scheds), "row", sh, knobs)


def _pipeline_bound(sp: _Space, sh: Sharding, k: Knobs, total: float, p2p: float = 0.0,
                    min_block: float = 0.0) -> float:
    """Step time with stages as balanced as the layer count allows and no recompute, gradient
    or optimizer time: some rank holds at least ``ceil(C / pp)`` positions of each of the
    ``v`` periods of ``C = layers / v`` layers."""
    m = sp.gb // (sh.dp * sh.mbs)
    A, B, K = part.schedule_coefficients(sh.pp, m, k.schedule, k.vpp, p2p)
    period = sp.cm.num_layers // k.vpp
    held = -(-sp.cm.num_layers // sh.pp) if k.schedule in pipeline.V_SHAPED else k.vpp * -(-period // sh.pp)
    peak = max(total / sh.pp, held * min_block)
    return A * peak + B * total + K


def _expand_row(sp: _Space, sh: Sharding, knobs: list[Knobs]) -> None:
    """Price one sharding and queue its configurations with a tighter bound."""
    cm, stats = sp.cm, sp.stats
    m = sp.gb // (sh.dp * sh.mbs)
    pr = sp.priced(sh)
    p2p = cm.p2p_time(probe(sh, sp.gb)) if sh.pp > 1 else 0.0
    floor = sp.floor(sh)
    for k in knobs:
        in_flight = min_in_flight(sh.pp, m, k.schedule, k.vpp)
        host_usable = cm.gpu.host_mem_bytes * cm.gpu.host_usable_fraction if cm.gpu.host_mem_bytes else None
        if floor.bytes(cm, sh, k.zero, k.offload, in_flight) > sp.usable or (
                k.offload and host_usable is not None and floor.host_bytes(cm, sh) > host_usable):
            stats.pruned_memory += 1
            continue
        stats.enumerated += 1
        extra = floor.recompute_time(cm, sh, k, in_flight, sp.usable, pr.rc)
        lb = _pipeline_bound(sp, sh, k, pr.total + extra, p2p, pr.min_block) + _optimizer_floor(sp, sh, k, pr)
        sp.push(lb, "config", sh, k)


def _optimizer_floor(sp: _Space, sh: Sharding, k: Knobs, pr: Priced) -> float:
    """``CostModel.optimizer_time`` of the mean rank (its cost grows at least linearly with
    the shard, so the most loaded rank pays at least this)."""
    dense, expert = pr.params
    if k.offload:   # CPUOffloadPolicy shards at any ZeRO stage; at least one gather and one reduction per step
        return offload_step_time((dense / (sh.dp * sh.cp) + expert / sh.edp) / sh.pp, sp.cm.dtype, sp.cm.gpu)
    local = (dense / (sh.dp * sh.cp if k.zero >= 1 else 1) + expert / (sh.edp if k.zero >= 1 else 1)) / sh.pp
    return local * OPTIMIZER_BYTES_PER_PARAM / sp.opt_bw


def _zero3_floor(sp: _Space, sh: Sharding) -> float:
    """ZeRO-3 exposed time is a sum over layers; the slowest rank carries at least the mean."""
    costs = sp.priced(sh).costs
    s = probe(sh, sp.gb, zero_stage=3)
    seen: dict[int, float] = {}
    for i in range(sp.cm.num_layers):
        if id(costs[i]) not in seen:
            one = RankReport(0, [i], 0.0, 0.0, 0.0, {}, {}, 1.0)
            seen[id(costs[i])] = sp.cm.dp_time(s, one, costs, s.num_micro_batches)
    return sum(seen[id(costs[i])] for i in range(sp.cm.num_layers)) / sh.pp
