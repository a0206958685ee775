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
- ZeRO 0-3 when some gradient is reduced (``dp * cp > 1`` or ``edp > 1``);
- schedule: 1F1B, or interleaved 1F1B with ``vpp = v`` when ``v | layers``, ``layers / v >= pp``,
  ``pp | m`` and ``(pp - 1) m >= v pp`` (the condition under which per-rank recompute is
  exact, see ``partition``). GPipe has the same step time as 1F1B in the cost model and
  holds more micro-batches, so it is searched only when the user names it.
- recompute per layer (none / selective / full), chosen with the partition.

Order of work: (1) for each intra-stage sharding, a memory floor that needs no pricing
(model states with the most sharding ZeRO allows, the smallest activations any recompute
gives, averaged over pipeline ranks) drops configurations that cannot fit; the
micro-batch loop stops at the first mbs that fails, since the floor grows with mbs.
(2) Surviving shardings are priced once (``CostModel.layer_costs``; every schedule, vpp,
ZeRO stage and recompute reuses it) and each configuration gets a step-time lower bound
(perfectly balanced stages, no recompute, no data-parallel or optimizer time).
(3) Configurations run the stage-partition DP in bound order until the bound reaches the
k-th best step time found: nothing past that point is partitioned.
"""

from __future__ import annotations

import heapq
import time
from dataclasses import dataclass, field

from autopar.cost_models.estimate import OPTIMIZER_BYTES_PER_PARAM, CostModel, Estimate, RankReport
from autopar.cost_models.layer_cost import RECOMPUTE_MODES, shards_for
from autopar.cost_models.layer_model import saved_bytes
from autopar.cost_models.memory import model_state_bytes
from autopar.cost_models.pipeline import in_flight_microbatches
from autopar.cost_models.strategy import Strategy
from autopar.errors import InputError
from autopar.planner import partition as part

STRATEGY_FIELDS = ("dp", "tp", "pp", "cp", "ep", "etp", "vpp", "micro_batch", "global_batch", "zero_stage",
                   "recompute", "sequence_parallel", "schedule")


@dataclass
class Constraints:
    """What the user fixes (Strategy field -> value) and the caps that narrow the space."""

    fixed: dict = field(default_factory=dict)
    max_tp: int | None = None
    max_pp: int | None = None
    max_cp: int | None = None
    max_ep: int | None = None
    max_mbs: int | None = None
    cross_node: bool = False     # lift "tp and ep*etp stay inside a node"

    def __post_init__(self):
        bad = set(self.fixed) - set(STRATEGY_FIELDS)
        if bad:
            raise InputError(f"constraints: unknown field(s) {', '.join(sorted(bad))}")
        if self.fixed.get("dp") == -1:
            self.fixed = {k: v for k, v in self.fixed.items() if k != "dp"}

    def ok(self, name: str, value) -> bool:
        if name in self.fixed and self.fixed[name] != value:
            return False
        cap = {"tp": self.max_tp, "pp": self.max_pp, "cp": self.max_cp, "ep": self.max_ep,
               "micro_batch": self.max_mbs}.get(name)
        return cap is None or value <= cap

    @property
    def modes(self) -> tuple[str, ...]:
        if "recompute" in self.fixed:
            return (self.fixed["recompute"],)
        return RECOMPUTE_MODES


@dataclass
class Candidate:
    strategy: Strategy
    stages: list[tuple[int, int]]
    layer_recompute: list[str]
    step_time_s: float
    estimate: Estimate | None = None


@dataclass
class SearchStats:
    space: int = 0            # configurations satisfying the rules and constraints
    pruned_memory: int = 0    # ruled out by the memory floor before pricing
    enumerated: int = 0       # configurations given a time bound (after pricing their sharding)
    pruned_time: int = 0      # bound no better than the k-th best: never partitioned
    priced: int = 0           # ran the stage-partition DP
    infeasible: int = 0       # partitioned, but no layout fits in memory (or beat the k-th best)
    layer_pricings: int = 0   # distinct intra-stage shardings priced
    search_time_s: float = 0.0

    def as_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass
class SearchResult:
    candidates: list[Candidate]
    stats: SearchStats
    global_batch: int
    closest: Estimate | None = None   # when nothing fits: the configuration that overflows least


@dataclass(frozen=True)
class Sharding:
    tp: int
    cp: int
    pp: int
    dp: int
    ep: int
    etp: int
    sp: bool
    mbs: int


# ----- enumeration ------------------------------------------------------------------------------
def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def tp_ok(cm: CostModel, tp: int) -> bool:
    spec = cm.spec
    if spec.family == "custom":
        return tp == 1  # a user module has no known head / width structure to split
    return (spec.heads % tp == 0 and (spec.family == "deepseek_v3" or spec.kv_heads % tp == 0)
            and (not spec.ffn_hidden or spec.ffn_hidden % tp == 0) and spec.vocab % tp == 0)


def meshes(cm: CostModel, cons: Constraints, gb: int):
    """(tp, cp, pp, dp) of the dense mapping."""
    world, gpn = cm.cluster.world, cm.cluster.gpus_per_node
    for tp in divisors(world):
        if not cons.ok("tp", tp) or not tp_ok(cm, tp) or (not cons.cross_node and gpn % tp):
            continue
        for cp in divisors(world // tp):
            if not cons.ok("cp", cp) or (cp > 1 and cm.seq_len % (2 * cp)):
                continue
            for pp in divisors(world // (tp * cp)):
                dp = world // (tp * cp * pp)
                if cons.ok("pp", pp) and pp <= cm.num_layers and cons.ok("dp", dp) and gb % dp == 0:
                    yield tp, cp, pp, dp


def expert_maps(cm: CostModel, cons: Constraints, stage_ranks: int):
    spec, gpn = cm.spec, cm.cluster.gpus_per_node
    if not spec.is_moe:
        if cons.ok("ep", 1) and cons.ok("etp", 1):
            yield 1, 1
        return
    for ep in divisors(spec.num_experts):
        for etp in divisors(spec.moe_ffn_hidden):
            g = ep * etp
            if g > stage_ranks or stage_ranks % g or not (cons.ok("ep", ep) and cons.ok("etp", etp)):
                continue
            if cons.cross_node or gpn % g == 0:
                yield ep, etp


def sp_options(cm: CostModel, cons: Constraints, tp: int, cp: int) -> list[bool]:
    opts = [False] + ([True] if tp > 1 and (cm.seq_len // cp) % tp == 0 else [])
    return [x for x in opts if cons.ok("sequence_parallel", x)]


def mbs_options(cons: Constraints, gb: int, dp: int) -> list[int]:
    return [b for b in divisors(gb // dp) if cons.ok("micro_batch", b)]


def zero_options(cons: Constraints, sh: Sharding) -> list[int]:
    reduced = sh.dp * sh.cp > 1 or sh.dp * sh.tp * sh.cp // (sh.ep * sh.etp) > 1
    return [z for z in (range(4) if reduced else [0]) if cons.ok("zero_stage", z)]


def schedule_options(cm: CostModel, cons: Constraints, pp: int, m: int) -> list[tuple[str, int]]:
    """(schedule, vpp) pairs for a pipeline of ``pp`` ranks and ``m`` micro-batches."""
    L = cm.num_layers
    if pp == 1:
        out = [("1f1b", 1)] if "schedule" not in cons.fixed else [(cons.fixed["schedule"], 1)]
        return [o for o in out if o[0] != "interleaved" and cons.ok("vpp", 1)]
    named = "schedule" in cons.fixed or "vpp" in cons.fixed
    out = [("1f1b", 1), ("gpipe", 1)]
    for v in range(2, L // pp + 1):
        exact = (pp - 1) * m >= v * pp or named
        if L % v == 0 and m % pp == 0 and exact:
            out.append(("interleaved", v))
    keep = [(s, v) for s, v in out if cons.ok("schedule", s) and cons.ok("vpp", v)]
    if "schedule" not in cons.fixed:
        keep = [o for o in keep if o[0] != "gpipe"]
    return keep


# ----- bounds -----------------------------------------------------------------------------------
def _probe(sh: Sharding, gb: int, **kw) -> Strategy:
    """A Strategy with this sharding, unvalidated (for bounds and pricing)."""
    vals = dict(Strategy().model_dump(), dp=sh.dp, tp=sh.tp, pp=sh.pp, cp=sh.cp, ep=sh.ep, etp=sh.etp,
                micro_batch=sh.mbs, global_batch=gb, sequence_parallel=sh.sp)
    vals.update(kw)
    return Strategy.model_construct(**vals)


def pricing_key(sh: Sharding) -> Sharding:
    """The sharding ``layer_costs`` depends on: per-layer prices do not depend on pp, and on dp
    only through ``dp / edp = ep*etp / (tp*cp)``, so dp = ep*etp prices every dp alike (one
    pricing serves every pipeline depth; tests/test_planner.py checks the claim)."""
    return Sharding(sh.tp, sh.cp, 1, sh.ep * sh.etp, sh.ep, sh.etp, sh.sp, sh.mbs)


@dataclass(frozen=True)
class Floor:
    """Memory-floor terms of one intra-stage sharding over the whole model (no pricing)."""

    dense: float     # parameters a rank of each pipeline position would hold, summed over layers
    expert: float
    act: float       # smallest saved activations per micro-batch the allowed recompute gives
    temps: float

    def bytes(self, cm: CostModel, sh: Sharding, zero: int, in_flight: float) -> float:
        """Mean over pipeline ranks of states + activations: the most loaded rank holds at least this."""
        edp = sh.dp * sh.tp * sh.cp // (sh.ep * sh.etp)
        states = model_state_bytes(self.dense, cm.dtype, zero, sh.dp * sh.cp).total
        states += model_state_bytes(self.expert, cm.dtype, zero, edp).total
        return (states + self.act * in_flight + self.temps) / sh.pp


def floor_terms(cm: CostModel, sh: Sharding, modes: tuple[str, ...]) -> Floor:
    """Same formulas as ``layer_cost.price_layer`` for parameters and ``layer_model.saved_bytes``."""
    shards = shards_for(_probe(sh, 0))
    dense = expert = act = temps = 0.0
    for t in cm.templates:
        n = len(t.indices) if t.kind == "block" else 1
        dense += n * ((t.params_tp + t.params_vocab) / sh.tp + t.params_rep)
        expert += n * t.params_expert / (sh.ep * sh.etp)
        if t.kind == "block":
            act += n * min(saved_bytes(t, shards, k) for k in modes)
        else:
            act += saved_bytes(t, shards, "none")
            temps += t.temp_bytes * shards.tokens / (sh.tp if t.kind == "output" else 1)
    return Floor(dense, expert, act, temps)


def min_in_flight(pp: int, m: int, schedule: str, v: int) -> float:
    """Fewest micro-batches any rank holds (the count falls or stays flat with the rank)."""
    return min(in_flight_microbatches(r, pp, m, schedule, v) for r in (0, pp - 1))


# ----- the search -------------------------------------------------------------------------------
def curves_monotone(cm: CostModel) -> bool:
    """Per-unit op time never grows with size when every efficiency curve is non-decreasing
    and no measured op table overrides them: then a bigger micro-batch never costs more per
    sequence, which lets one pricing bound a whole row of micro-batch sizes."""
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


class _Space:
    """Enumeration state of one search: caches keyed by sharding, the work queue, the stats."""

    def __init__(self, cm: CostModel, cons: Constraints, gb: int, stats: SearchStats):
        self.cm, self.cons, self.gb, self.stats = cm, cons, gb, stats
        self.usable = float(cm.gpu.usable_mem_bytes)
        self.floors: dict[tuple, Floor] = {}
        self.totals: dict[Sharding, Priced] = {}
        self.rate_bound = curves_monotone(cm)
        curve = cm.timer.gpu.membound_eff.root
        self.opt_bw = cm.timer.bw * max(e for _, e in curve)   # fastest the optimizer step can stream
        self.queue: list[tuple] = []
        self.shared: dict = {}    # caches the partition DP reuses across configurations

    def push(self, lb: float, kind: str, *payload) -> None:
        heapq.heappush(self.queue, (lb, len(self.queue) + self.stats.enumerated, kind, payload))

    def floor(self, sh: Sharding) -> Floor:
        key = (sh.tp, sh.cp, sh.ep, sh.etp, sh.sp, sh.mbs)
        if key not in self.floors:
            self.floors[key] = floor_terms(self.cm, sh, self.cons.modes)
        return self.floors[key]

    def priced(self, sh: Sharding) -> Priced:
        key = pricing_key(sh)
        if key not in self.totals:
            costs = self.cm.layer_costs(_probe(key, self.gb))
            self.stats.layer_pricings += 1
            blocks = [costs[i] for i in range(self.cm.num_layers)]
            parts = blocks + [c for c in (costs["embedding"], costs["output"]) if c]
            total = sum(c.time("none") for c in parts)
            self.totals[key] = Priced(costs, total, total - sum(c.comm_s.get("cp", 0.0) for c in parts),
                                      min(c.time("none") for c in blocks))
        return self.totals[key]

    def inner(self, sh: Sharding) -> list[tuple[int, str, int]]:
        m = self.gb // (sh.dp * sh.mbs)
        scheds = schedule_options(self.cm, self.cons, sh.pp, m)
        return [(z, sc, v) for z in zero_options(self.cons, sh) for sc, v in scheds]


def search(cm: CostModel, global_batch: int, cons: Constraints | None = None, top_k: int = 5) -> SearchResult:
    """The ``top_k`` fastest configurations that fit, each with its stage partition and recompute.

    Work queue ordered by lower bound: a *row* entry (one sharding, its price bounded from
    the row's largest micro-batch) is priced when it comes out and pushes its configurations;
    a *config* entry gets its ZeRO-3 term added once, then runs the partition DP. The loop
    ends when the smallest bound reaches the k-th best step time found."""
    t0 = time.perf_counter()
    cons = cons or Constraints()
    gb = int(cons.fixed.get("global_batch") or global_batch)
    stats = SearchStats()
    sp = _Space(cm, cons, gb, stats)
    _fill(sp)
    found: list[Candidate] = []
    while sp.queue:
        upper = found[top_k - 1].step_time_s if len(found) >= top_k else part.INF
        lb, _, kind, payload = heapq.heappop(sp.queue)
        if lb >= upper:
            stats.pruned_time += _count(sp, kind, payload) + sum(_count(sp, k, p) for _, _, k, p in sp.queue)
            break
        if kind == "row":
            _expand_row(sp, *payload)
        elif kind == "config" and payload[1] == 3:
            sp.push(lb + _zero3_floor(sp, payload[0]), "config3", *payload)
        else:
            stats.priced += 1
            cand = _partitioned(sp, *payload, upper)
            if cand is None:
                stats.infeasible += 1
                continue
            found.append(cand)
            found.sort(key=lambda c: c.step_time_s)
    for c in found[:top_k]:
        c.estimate = cm.estimate(c.strategy, c.stages, c.layer_recompute)
    out = SearchResult(found[:top_k], stats, gb)
    if not out.candidates:
        out.closest = closest(cm, cons, gb)
    stats.search_time_s = time.perf_counter() - t0
    return out


def _count(sp: _Space, kind: str, payload) -> int:
    return len(payload[1]) if kind == "row" else 1


def _partitioned(sp: _Space, sh: Sharding, z: int, sched: str, v: int, upper: float) -> Candidate | None:
    cm = sp.cm
    try:
        s = Strategy(**_probe(sh, sp.gb, zero_stage=z, schedule=sched, vpp=v).model_dump()).resolve(cm.cluster.world)
        cm.check(s)
    except InputError:
        return None  # a rule the enumeration does not test (none known; counted as infeasible)
    res = part.partition(cm, s, sp.cons.modes, upper, sp.priced(sh).costs, sp.shared)
    if res is None:
        return None
    return Candidate(_label(s, res.layer_recompute), res.stages, res.layer_recompute, res.step_time_s)


def _label(s: Strategy, layer_recompute: list[str]) -> Strategy:
    """The strategy's recompute field: the one mode every layer uses, else the strongest used."""
    used = set(layer_recompute)
    mode = used.pop() if len(used) == 1 else ("full" if "full" in used else "selective")
    return s.model_copy(update={"recompute": mode})


def shardings(cm: CostModel, cons: Constraints, gb: int):
    """Every intra-stage sharding of the space, mbs ascending within a mesh."""
    for tp, cp, pp, dp in meshes(cm, cons, gb):
        for ep, etp in expert_maps(cm, cons, dp * tp * cp):
            for sp in sp_options(cm, cons, tp, cp):
                yield [Sharding(tp, cp, pp, dp, ep, etp, sp, b) for b in mbs_options(cons, gb, dp)]


def _fill(sp: _Space) -> None:
    """Queue every sharding above the memory floor, bounded without pricing where possible."""
    stats = sp.stats
    for row in shardings(sp.cm, sp.cons, sp.gb):
        keep = []
        for j, sh in enumerate(row):
            inner = sp.inner(sh)
            stats.space += len(inner)
            if not inner:
                continue
            if sp.floor(sh).bytes(sp.cm, sh, max(z for z, _, _ in inner), 1.0) > sp.usable:
                rest = sum(len(sp.inner(x)) for x in row[j + 1:])
                stats.space += rest
                stats.pruned_memory += len(inner) + rest
                break  # a larger micro-batch only needs more memory
            keep.append((sh, inner))
        if not keep:
            continue
        if not sp.rate_bound:
            for sh, inner in keep:
                _expand_row(sp, sh, inner)
            continue
        rate = sp.priced(keep[-1][0]).total_no_cp / keep[-1][0].mbs  # per sequence, never lower at smaller mbs
        for sh, inner in keep:
            sp.push(min(_pipeline_bound(sp, sh, sc, v, sh.mbs * rate) for _, sc, v in inner), "row", sh, inner)


def _pipeline_bound(sp: _Space, sh: Sharding, sched: str, v: int, total: float, p2p: float = 0.0,
                    min_block: float = 0.0) -> float:
    """Step time with stages as balanced as the layer count allows, no recompute, gradient or
    optimizer time: some rank holds at least ``ceil(C / pp)`` positions of each of the ``v``
    periods of ``C = layers / v`` layers."""
    m = sp.gb // (sh.dp * sh.mbs)
    A, B, K = part.schedule_coefficients(sh.pp, m, sched, v, p2p)
    period = sp.cm.num_layers // v
    peak = max(total / sh.pp, v * -(-period // sh.pp) * min_block)
    return A * peak + B * total + K


def _expand_row(sp: _Space, sh: Sharding, inner) -> None:
    """Price one sharding and queue its configurations with their exact pipeline bound."""
    cm, stats = sp.cm, sp.stats
    m = sp.gb // (sh.dp * sh.mbs)
    pr = sp.priced(sh)
    p2p = cm._p2p_time(_probe(sh, sp.gb)) if sh.pp > 1 else 0.0
    floor = sp.floor(sh)
    for z, sched, v in inner:
        if floor.bytes(cm, sh, z, min_in_flight(sh.pp, m, sched, v)) > sp.usable:
            stats.pruned_memory += 1
            continue
        stats.enumerated += 1
        lb = _pipeline_bound(sp, sh, sched, v, pr.total, p2p, pr.min_block) + _optimizer_floor(sp, sh, z, pr.costs)
        sp.push(lb, "config", sh, z, sched, v)


def _optimizer_floor(sp: _Space, sh: Sharding, z: int, costs: dict) -> float:
    """The optimizer step streams the rank's parameter shard (``CostModel._optimizer_time``);
    the most loaded rank holds at least the mean, at no more than the best HBM efficiency."""
    dense = sum(costs[i].params_dense for i in range(sp.cm.num_layers))
    expert = sum(costs[i].params_expert for i in range(sp.cm.num_layers))
    edp = sh.dp * sh.tp * sh.cp // (sh.ep * sh.etp)
    local = dense / (sh.dp * sh.cp if z >= 1 else 1) + expert / (edp if z >= 1 else 1)
    return local / sh.pp * OPTIMIZER_BYTES_PER_PARAM / sp.opt_bw


def _zero3_floor(sp: _Space, sh: Sharding) -> float:
    """ZeRO-3 exposed time is a sum over layers; the slowest rank carries at least the mean."""
    costs = sp.priced(sh).costs
    s = _probe(sh, sp.gb, zero_stage=3)
    seen: dict[int, float] = {}
    total = 0.0
    for i in range(sp.cm.num_layers):
        c = costs[i]
        if id(c) not in seen:
            one = RankReport(0, [i], 0.0, 0.0, 0.0, {}, {}, 1.0)
            seen[id(c)] = sp.cm._dp_time(s, one, costs, s.num_micro_batches)
        total += seen[id(c)]
    return total / sh.pp


# ----- when nothing fits ------------------------------------------------------------------------
def closest(cm: CostModel, cons: Constraints, gb: int, tries: int = 4) -> Estimate | None:
    """The configuration that overflows least: the shardings with the lowest memory floor,
    each with the most memory-saving knobs the constraints allow, priced exactly."""
    ranked = []
    for row in shardings(cm, cons, gb):
        if not row:
            continue
        sh = row[0]  # the smallest micro-batch
        m = gb // (sh.dp * sh.mbs)
        zs, scheds = zero_options(cons, sh), schedule_options(cm, cons, sh.pp, m)
        if not zs or not scheds:
            continue
        sched, v = min(scheds, key=lambda x: min_in_flight(sh.pp, m, *x))
        floor = floor_terms(cm, sh, cons.modes).bytes(cm, sh, max(zs), min_in_flight(sh.pp, m, sched, v))
        ranked.append((floor, _probe(sh, gb, zero_stage=max(zs), schedule=sched, vpp=v, recompute=cons.modes[-1])))
    best = None
    for _, s in sorted(ranked, key=lambda x: x[0])[:tries]:
        try:
            s = Strategy(**s.model_dump()).resolve(cm.cluster.world)
            cm.check(s)
        except InputError:
            continue
        e = cm.estimate(s)
        if best is None or e.peak_bytes < best.peak_bytes:
            best = e
    return best
