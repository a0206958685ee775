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
3. a work queue ordered by lower bound: a *coarse row* entry (``m`` times that pricing's total, scaled, each
   layer at least its eager host launches (``step_floors.scaled_no_cp``), over ``pp``: under every schedule's
   bound) gets its row bound when it comes out; a *row* entry (bounded from that pricing, scaled, plus the
   stage sends, the optimizer floor and a context-parallel ring floor) is priced at its own micro-batch when it
   comes out and queued again under that bound; the second time it queues one *coarse group* per (schedule,
   vpp) under that schedule's term of the bound, which comes out as a *group* under the least of its
   configurations' bounds (``groups.expand_row``, ``bounds``: the slowest rank at least the rank holding the
   embedding or the output layer, the zero-bubble schedules' exact bubble share, the gradient synchronisation
   the last backward cannot hide, the optimizer floor with FSDP2's copies (``step_floors.copy_floor``), the
   stack's step overhead); a group that comes out queues its configurations under their own bounds; a ZeRO-3
   configuration gets its gather/scatter floor added once; then its slowest rank's floor over every layout
   from each rank's own memory and recompute (``rank_floor``); a configuration that comes out runs the
   partition DP and is estimated; the loop ends when the smallest bound reaches the k-th best estimate plus
   the tie rule's 1% band, so the answer is that of ``search(..., exhaustive=True)``
   (``tests/test_search_bounds.py``, ``tests/test_search_floors.py``).
"""

from __future__ import annotations

import heapq
import time
from dataclasses import replace

from autopar import techniques
from autopar.core.strategy import Strategy
from autopar.cost_models.estimate import CostModel, even_stages
from autopar.cost_models.fsdp import gathers_per_unit
from autopar.cost_models.pipeline import bubble_share, in_flight_microbatches
from autopar.errors import InputError
from autopar.planner import partition as part
from autopar.planner import rank, search_cache, stack_split
from autopar.planner import recompute as rc
from autopar.planner.bounds import (  # noqa: F401  (re-exported: tests and explain read them here)
    Floor,
    Priced,
    Space,
    cp_exposure_floor,
    curves_monotone,
    floor_terms,
    grad_sync_floor,
    grads_freed,
    held_layers,
    min_in_flight,
    optimizer_floor,
    peak_floor,
    pipeline_bound,
    pricing_key,
    probe,
    zero3_floor,
)
from autopar.planner.groups import (  # noqa: F401  (re-exported: tests read them here)
    allowed_modes,
    expand_group,
    expand_row,
    recompute_floor,
    step_optimizer_floor,
)
from autopar.planner.rank_floor import contention_floor, slowest_rank_floor
from autopar.planner.space import (  # noqa: F401  (re-exported: the planner's public names)
    STRATEGY_FIELDS,
    Candidate,
    Constraints,
    Knobs,
    SearchResult,
    SearchStats,
    Sharding,
    emits,
    for_stack,
    knob_options,
    rule_spec,
    schedule_options,
    shardings,
)
from autopar.planner.step_floors import scaled_no_cp
from autopar.techniques import offload, pipeline
from autopar.techniques.recompute import layouts as stack_layouts_of


def search(cm: CostModel, global_batch: int, cons: Constraints | None = None, top_k: int = 5,
           exhaustive: bool = False, best_only: bool = False) -> SearchResult:
    """The ``top_k`` fastest configurations that fit, each with its stage partition and recompute.
    ``exhaustive``: partition every configuration above the memory floor, no time bound (the
    reference the bounded search is tested against; it returns the same plans). ``best_only``: only
    the first plan listed is asked for (``planner.awkward`` shows an alternative by its best plan):
    the loop stops at the best estimate plus the tie band instead of the ``top_k``-th best's, which
    still finds every plan within the band of the optimum, so the first plan listed is the one the
    full search lists first (the tie rule picks it from that band); the plans after it may differ."""
    t0 = time.perf_counter()
    cons = for_stack(cm, cons or Constraints())   # the stack's space (techniques' stacks declarations)
    key = search_cache.call_key(cm, global_batch, cons, top_k, exhaustive, best_only)  # None: not cached
    if (hit := search_cache.load(key)) is not None:
        return hit
    sp = Space(cm, cons, int(cons.fixed.get("global_batch") or global_batch))
    stats = sp.stats
    _fill(sp)
    found: list[Candidate] = []
    need = 1 if best_only else top_k
    while sp.queue:
        # the k-th best by the estimate the plans are ranked by (never below the partition's price,
        # which every bound stays under), widened by the tie rule's band (rank.order may list a
        # simpler plan from it): the answer does not depend on the queue order
        upper = found[need - 1].estimate.step_time_s * (1 + rank.TIE) if len(found) >= need else part.INF
        upper = part.INF if exhaustive else upper
        lb, _, kind, payload = heapq.heappop(sp.queue)
        if lb >= upper:
            stats.pruned_time += sum(_size(k, p) for _, _, k, p in sp.queue) + _size(kind, payload)
            break
        if kind == "coarse row":   # the row's bound of every schedule, worked out only for rows that get here
            sp.push(_row_bound(sp, *payload, *sp.memo["probe", payload[0]]), "row", *payload)
        elif kind == "row":   # its micro-batch priced: the same bound, now exact in the layers' times
            sp.push(min(_own_bounds(sp, *payload).values()), "priced row", *payload)
        elif kind == "priced row":
            _queue_groups(sp, *payload)
        elif kind == "coarse group":   # its ZeRO, offload, memory and bubble terms, worked out when it gets here
            expand_row(sp, *payload)
        elif kind == "group":
            expand_group(sp, *payload)
        elif kind == "config" and gathers_per_unit(cm.ctx.runtime, payload[1].zero, payload[1].offload):  # FSDP
            sp.push(lb + zero3_floor(sp, payload[0], payload[1].zero, payload[1].schedule), "config3", *payload)
        elif kind in ("config", "config3"):   # the slowest rank's own recompute, worked out when it gets here
            _rank_bound(sp, lb, *payload)
        else:
            stats.priced += 1
            cand = _partitioned(sp, *payload[:2], upper)
            if cand is not None and cand.estimate is None:
                cand.estimate = cm.estimate(cand.strategy, cand.stages, cand.layer_recompute)
            if cand is None or not cand.estimate.feasible:
                stats.infeasible += 1
                continue
            found.append(cand)
            found.sort(key=lambda c: c.estimate.step_time_s)
    ranked, dropped = rank.feasible_ranked(cm, found, top_k)   # printed order = estimate order + tie rule
    stats.infeasible += dropped
    stats.search_time_s = time.perf_counter() - t0
    res = SearchResult(ranked, stats, sp.gb, rule_error=sp.rule_error)
    search_cache.store(key, res)
    return res


def _rank_bound(sp: Space, lb: float, sh: Sharding, k: Knobs, group: tuple) -> None:
    """Queue a configuration again with its slowest rank at least ``rank_floor.slowest_rank_floor`` (each rank's
    own memory and recompute over every layout, where the group's ``peak`` floored it without recompute);
    dropped where no layout fits (the partition would find none either)."""
    total, p2p, peak, share, sync = group
    x = slowest_rank_floor(sp, sh, k, allowed_modes(sp.cons.modes, k.schedule, k.offload))
    if x == part.INF:
        sp.stats.pruned_memory += 1
        return
    grow = 0.0
    if x > peak:   # pipeline_bound grows with its peak (``pipeline_bound``'s docstring)
        grow = max(0.0, pipeline_bound(sp, sh, k, total, p2p, x, share, sync)
                   - pipeline_bound(sp, sh, k, total, p2p, peak, share, sync))
    # FSDP: the exposed traffic and the contention of the hidden rest, where the lb holds the exposed floor
    held = zero3_floor(sp, sh, k.zero, k.schedule) if gathers_per_unit(sp.cm.ctx.runtime, k.zero, k.offload) else 0.0
    sp.push(lb + grow + max(0.0, contention_floor(sp, sh, k) - held), "partition", sh, k, group)


def _size(kind: str, payload: tuple) -> int:
    """Configurations a queue entry stands for."""
    if kind == "group":
        return len(payload[1][0])
    return len(payload[1]) if kind.endswith("row") or kind == "coarse group" else 1


def _partitioned(sp: Space, sh: Sharding, k: Knobs, upper: float) -> Candidate | None:
    cm = sp.cm
    try:
        s = Strategy(**probe(sh, sp.gb, k).model_dump()).resolve(cm.cluster.world)
        # one pass over every rule (emit rules included); where one breaks, the checks run as before for its message
        if techniques.violations(s, rule_spec(cm), s.world, cm.seq_len, emitted=emits(cm), stack=cm.stack_name) or \
                offload.gpu_violations(s, cm.gpu):
            cm.check(s)
            techniques.check(s, rule_spec(cm), cm.seq_len, emitted=emits(cm), stack=cm.stack_name)
    except InputError as exc:  # a rule the enumeration does not test (none known): keep the reason
        sp.rule_error = sp.rule_error or exc.message
        return None
    why = stack_split.no_split(cm.stack_name, cm.num_layers, s)
    if why:   # the stack's config says none of the splits the partition would price
        sp.rule_error = sp.rule_error or why
        return None
    modes = allowed_modes(sp.cons.modes, s.schedule, s.offload_optimizer)
    if s.schedule in pipeline.V_SHAPED:
        return _v_shaped(cm, s, modes, upper)
    # the pricing of the sharding's key (``pricing_key``: the same prices for every dp): one
    # LayerCost per layer kind across dp and pp, so the recompute frontiers cached by it are reused
    # tight: the mean rank with the first rank's micro-batches in flight takes 60% of the memory or more
    tight = sp.floor(sh).bytes(cm, sh, s.zero_stage, s.offload_optimizer, in_flight_microbatches(
        0, s.pp, s.num_micro_batches, s.schedule, s.vpp), grads_freed(sp, sh, s.schedule, s.vpp)) > 0.6 * sp.usable
    layouts = stack_layouts_of(cm.stack_name, cm.spec)   # llm-foundry: first-N for MPT models only
    if len(layouts) == 1 and layouts[0].mix == "per_layer":   # autopar's program: any mode on any layer
        res = stack_split.partition(cm, s, modes, upper, sp.priced(sh).costs, sp.shared, tight)
        return None if res is None else Candidate(_label(s, res.layer_recompute), res.stages, res.layer_recompute,
                                                  res.step_time_s)
    best = None
    for layout in layouts:   # each family the stack's config expresses, partitioned with its modes, then placed
        fam = tuple(m for m in modes if m in layout.modes)
        res = stack_split.partition(cm, s, fam, upper, sp.priced(sh).costs, sp.shared, tight) if fam else None
        cand = _placed(cm, s, layout.mix, res, upper) if res else None
        if cand is not None:
            best, upper = cand, cand.estimate.step_time_s
    return best


def _placed(cm: CostModel, s: Strategy, mix: str, res: part.PartitionResult, upper: float) -> Candidate | None:
    """The fastest of the stack's placements of partition ``res`` (``rc.stack_layouts``) that fits under ``upper``.
    Where none fits (the partition chose which layers recompute, the stack's N chooses others: Megatron's first N
    of a stage leaves the last layers plain, DeepSeek-V3's MoE ones, whose activations are larger), the first of the
    denser ones (``rc.denser_layouts``, least recompute first) that fits: the fastest of them that fits, since more
    recompute never runs faster; at most one estimate per layer of the longest stage more, only where none fit."""
    best, fits = None, False
    for lr in rc.stack_layouts(mix, res.layer_recompute, res.stages, s.pp, s.schedule):
        c = _priced(cm, s, res.stages, lr)
        fits = fits or c.estimate.feasible
        if c.estimate.feasible and c.step_time_s < upper:
            best, upper = c, c.step_time_s
    for lr in [] if fits else rc.denser_layouts(mix, res.layer_recompute, res.stages, s.pp, s.schedule):
        c = _priced(cm, s, res.stages, lr)
        if c.estimate.feasible:   # the least recompute that fits (not bisected: a recompute transient can grow)
            return c if c.step_time_s < upper else None
    return best


def _priced(cm: CostModel, s: Strategy, stages: list[tuple[int, int]], lr: list[str]) -> Candidate:
    """``s`` with per-layer recompute ``lr`` on ``stages``, estimated."""
    label = _label(s, lr)
    e = cm.estimate(label, stages, lr)
    return Candidate(label, stages, lr, e.step_time_s, e)


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
    label = _label(s, layer_recompute)   # the estimate reads the per-layer modes, not the label: reuse it
    return Candidate(label, stages, layer_recompute, best[1].step_time_s, replace(best[1], strategy=label))


def _label(s: Strategy, layer_recompute: list[str]) -> Strategy:
    """The strategy's recompute field: the one mode every layer uses, else the strongest used."""
    used = set(layer_recompute)
    strongest = next(m for m in ("full", "op", "selective", "none") if m in used)
    mode = used.pop() if len(used) == 1 else strongest
    return s.model_copy(update={"recompute": mode})


def _fill(sp: Space) -> None:
    """Queue every sharding above the memory floor, bounded without pricing it."""
    stats, rows = sp.stats, []
    for row in shardings(sp.cm, sp.cons, sp.gb):
        for j, sh in enumerate(row):
            knobs = knob_options(sp.cm, sp.cons, sh, sp.gb, sp.knob_cache)
            stats.space += len(knobs)
            if not knobs:
                continue
            ks = sp.knobs(knobs)
            if sp.floor(sh).bytes(sp.cm, sh, ks.zero, ks.offload, 1.0, sp.warm(sh, ks)) > sp.usable:
                rest = sum(len(knob_options(sp.cm, sp.cons, x, sp.gb, sp.knob_cache)) for x in row[j + 1:])
                stats.space += rest
                stats.pruned_memory += len(knobs) + rest
                break  # a larger micro-batch only needs more memory
            rows.append((sh, knobs))
    if not curves_monotone(sp.cm):
        for sh, knobs in rows:
            expand_row(sp, sh, knobs)
        return
    biggest: dict[tuple, Sharding] = {}
    smallest: dict[tuple, Sharding] = {}   # its blocks' forward bounds the ring's window (cp > 1)
    for sh, _ in rows:
        key = (sh.tp, sh.cp, sh.ep, sh.etp, sh.sp)
        if key not in biggest or sh.mbs > biggest[key].mbs:
            biggest[key] = sh
        if sh.cp > 1 and (key not in smallest or sh.mbs < smallest[key].mbs):
            smallest[key] = sh
    probes = {key: (sp.priced(sh), sh.mbs) for key, sh in biggest.items()}
    ring = sp.cm.ctx.runtime != "torch"   # --runtime torch gathers K/V: its floor reads no forward window
    lows = {key: (sp.priced(sh) if ring else None, sh.mbs) for key, sh in smallest.items()}
    totals: dict[tuple, tuple] = {}   # by (key, mbs): what every pipeline depth of it reads
    for sh, knobs in rows:
        key = (sh.tp, sh.cp, sh.ep, sh.etp, sh.sp, sh.mbs)
        hit = totals.get(key)
        if hit is None:
            cp = cp_exposure_floor(sp, sh, *lows[key[:-1]]) if key[:-1] in lows else 0.0
            pr, b = probes[key[:-1]]
            hit = totals[key] = ((pr, b, cp), scaled_no_cp(sp, sh, pr, sh.mbs / b)[0] + cp)
        sp.memo["probe", sh] = hit[0]   # what its _row_bound reads
        sp.push(_coarse_bound(sp, sh, knobs, hit[0][0], hit[1]), "coarse row", sh, knobs)


def _coarse_bound(sp: Space, sh: Sharding, knobs: list[Knobs], pr: Priced, total: float) -> float:
    """A bound under ``_row_bound`` that needs no schedule: every schedule's ``pipeline_bound`` is at
    least ``m * total / pp`` (1F1B: ``(m - 1) max P + sum P >= (m - 1 + pp) total / pp``; interleaved,
    zero-bubble and pp = 1: ``m max P``), before the recompute, bubble and send terms; most rows
    never reach the k-th best even so, and their schedules are never bounded one by one. ``total``: the
    layers' total per micro-batch (``scaled_no_cp`` of ``pr`` at this micro-batch, plus the ring's floor)."""
    m = sp.gb // (sh.dp * sh.mbs)
    lb = m * total / sh.pp + sp.cm.stack.step_overhead_s + _row_optimizer(sp, sh, sp.knobs(knobs), pr)
    return lb * (1 - 1e-12)   # rounding: never above the bound it stands for


def _row_bound(sp: Space, sh: Sharding, knobs: list[Knobs], pr: Priced, b: int, cp: float) -> float:
    """The least of the row's ``_schedule_bounds``."""
    return min(_schedule_bounds(sp, sh, knobs, pr, b, cp).values())


def _own_bounds(sp: Space, sh: Sharding, knobs: list[Knobs]) -> dict:
    """``_schedule_bounds`` at the row's own micro-batch, worked out once (its ``row`` entry and its
    ``_queue_groups`` read the same)."""
    key = ("own", sh, id(knobs))   # knobs: a list ``sp.knob_cache`` keeps alive
    if key not in sp.memo:
        pr = sp.priced(sh)
        sp.memo[key] = _schedule_bounds(sp, sh, knobs, pr, sh.mbs, pr.total - pr.total_no_cp)
    return sp.memo[key]


def _schedule_bounds(sp: Space, sh: Sharding, knobs: list[Knobs], pr: Priced, b: int, cp: float) -> dict:
    """A bound of every configuration of the row without pricing its micro-batch: the pricing at
    micro-batch ``b >= sh.mbs`` scaled by ``sh.mbs / b`` (context-parallel exposure left out, ``cp``
    bounds it) stays under this micro-batch's price, so its total and fastest block bound the sum
    and the slowest rank (``held_layers`` blocks at least); the stage-to-stage sends and the
    optimizer step need no layer pricing (the parameters do not depend on the micro-batch)."""
    scale = sh.mbs / b
    total, block = scaled_no_cp(sp, sh, pr, scale)
    total += cp
    ks = sp.knobs(knobs)
    p2p = sp.p2p(sh)
    opt = _row_optimizer(sp, sh, ks, pr)
    # the zero-bubble share and the slowest rank's floor (as expand_row's) where ``pr`` prices this
    # micro-batch itself; 0 and the fastest blocks otherwise
    own = b == sh.mbs
    out = {}
    for k, least, in_flight, warm, held in _schedule_facts(sp, sh, ks):   # each term a bound of its configurations
        extra = _schedule_recompute(sp, sh, least, k, pr, scale, in_flight, warm)
        peak = peak_floor(sp, sh, k, pr) if own else held * block
        term = pipeline_bound(sp, sh, k, total + extra, p2p, peak, bubble_share(k.schedule, *pr.fbw) if own else 0.0)
        out[k.schedule, k.vpp] = (term + opt) * (1 - 1e-12)   # rounding: never above expand_row's group bounds
    return out


def _schedule_facts(sp: Space, sh: Sharding, ks) -> list[tuple]:
    """Per (schedule, vpp) of a row's knob set ``ks``: (its knobs, its least states, the fewest micro-batches a
    rank holds, whether its gradients are freed before the peak, ``held_layers``), what ``_schedule_bounds``
    reads of the schedule alone: once per (pp, micro-batches, knob set), for every row sharing them."""
    m = sp.gb // (sh.dp * sh.mbs)
    key = ("facts", sh.pp, m, id(ks))   # ks: kept alive by ``sp.knob_sets``
    hit = sp.memo.get(key)
    if hit is None:
        hit = sp.memo[key] = [(k, least, min_in_flight(sh.pp, m, k.schedule, k.vpp), grads_freed(sp, sh, k.schedule,
                               k.vpp), held_layers(sp, sh, k)) for k, least in zip(ks.schedules, ks.least)]
    return hit


def _schedule_recompute(sp: Space, sh: Sharding, least: tuple[int, bool], k: Knobs, pr: Priced,
                        scale: float, in_flight: float, warm: bool) -> float:
    """``Floor.recompute_time`` of a row's schedule under every one of its configurations' own: the
    fewest micro-batches in flight the schedule holds (``in_flight``), the least states of the schedule's (ZeRO,
    offload) pairs (``least``, ``KnobSet.least``: its highest ZeRO stage, offload if offered; zero-bubble schedules
    run no ZeRO-3), every recompute mode (a configuration allowed fewer only needs more) and its gradients freed
    where the schedule frees them (``warm``); recompute time grows with each of these."""
    # what it reads: the floor's sharding, the states' groups, the pair, in flight, rc's pricing, the scale
    key = ("sched_rc", sh, least, in_flight, warm, id(pr), scale)
    hit = sp.memo.get(key)
    if hit is None:
        best = Knobs(*least, k.schedule, k.vpp)
        hit = sp.memo[key] = sp.floor(sh).recompute_time(sp.cm, sh, best, in_flight, sp.usable, pr.rc, warm, scale)
    return hit


def _queue_groups(sp: Space, sh: Sharding, knobs: list[Knobs]) -> None:
    """A priced row's turn: one *coarse group* per (schedule, vpp) under its schedule's term of the
    row bound (``_schedule_bounds``); ``expand_row`` bounds a group's configurations only when it comes
    out, and most never do."""
    terms = _own_bounds(sp, sh, knobs)
    for group in sp.knobs(knobs).groups:
        sp.push(terms[group[0].schedule, group[0].vpp], "coarse group", sh, group)


def _row_optimizer(sp: Space, sh: Sharding, ks, pr: Priced) -> float:
    """The least ``groups.step_optimizer_floor`` over a row's (ZeRO, offload) pairs."""
    m = sp.gb // (sh.dp * sh.mbs)
    # what step_optimizer_floor reads (ks: its states, kept alive by ``sp.knob_sets``)
    key = ("opt_min", pr.params, sh.dp * sh.cp, sh.edp, sh.pp, m, id(ks))
    hit = sp.memo.get(key)
    if hit is None:
        hit = sp.memo[key] = min(step_optimizer_floor(sp, sh, k, pr) for k in ks.states)
    return hit


