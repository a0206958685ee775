"""The search's configurations by (schedule, vpp) group, for ``search``: their memory floors, recompute floors and
optimizer floors, worked out when a group leaves the queue (``expand_row``), and the groups' configurations queued
one by one under their own bounds (``expand_group``). Every floor stays at or under the price it bounds
(``bounds`` module docstring)."""

from __future__ import annotations

from dataclasses import replace
from functools import lru_cache

from autopar.cost_models.estimate import offload_copies, offload_step_time
from autopar.cost_models.fsdp import cm_holds_stage_grads, syncs_once_per_step
from autopar.cost_models.memory import bytes_per_param
from autopar.cost_models.pipeline import bubble_share, end_ranks, in_flight_microbatches
from autopar.planner.bounds import (
    Floor,
    Priced,
    Space,
    grad_sync_floor,
    grads_freed,
    min_in_flight,
    optimizer_floor,
    peak_floor,
    pipeline_bound,
    probe,
)
from autopar.planner.space import Knobs, Sharding
from autopar.planner.step_floors import copy_floor
from autopar.techniques import offload, pipeline

MARGIN = 1e-9   # relative: ``ranks_room``'s sum runs in another order than rank by rank


@lru_cache(maxsize=256)
def allowed_modes(modes: tuple[str, ...], schedule: str, offloaded: bool) -> tuple[str, ...]:
    """The recompute modes a configuration's layers may use: per-layer choices obey the emit rules
    on recompute too (zero-bubble schedules and optimizer offload allow fewer)."""
    if schedule in pipeline.ZERO_BUBBLE:
        modes = tuple(m for m in modes if m in pipeline.ZB_RECOMPUTE) or modes
    if offloaded:
        modes = tuple(m for m in modes if m in offload.OFFLOAD_RECOMPUTE) or modes
    return modes


def floor_for(sp: Space, sh: Sharding, modes: tuple[str, ...]) -> Floor:
    """``sp.floor(sh)`` for configurations allowed only ``modes`` (``allowed_modes``, a subset of the
    constraints' modes holding their first): the least activations and the recompute offers of those
    modes alone, a tighter floor of the same configurations (states do not depend on the modes: the
    memo is shared)."""
    floor = sp.floor(sh)
    if modes == sp.cons.modes:
        return floor
    key = ("floor", sh.tp, sh.cp, sh.ep, sh.etp, sh.sp, sh.mbs, modes)
    if key not in sp.memo:
        saves = tuple((n, {m: b for m, b in by.items() if m in modes}) for n, by in floor.saves)
        act = floor.act_base - sum(n * max([0.0, *by.values()]) for n, by in saves)
        sp.memo[key] = replace(floor, act=act, saves=saves)
    return sp.memo[key]


def step_optimizer_floor(sp: Space, sh: Sharding, k: Knobs, pr: Priced) -> float:
    """``optimizer_floor`` with ZeRO-Offload's copies per micro-batch: ``CostModel.optimizer_time``
    copies the rank's shard host <-> device at each of ``m`` gathers (``2m`` under ZeRO-3) and ``m``
    reductions (``offload_step_time``), linear in the shard, so the mean rank's shard bounds the
    most loaded one (the expert shard over ``edp``, the largest group the estimate may use)."""
    if not k.offload:
        return optimizer_floor(sp, sh, k, pr)
    m = 1 if syncs_once_per_step(sp.cm.ctx.runtime, sh.pp, k.schedule) else sp.gb // (sh.dp * sh.mbs)  # as estimate
    key = ("opt_offload", pr.params, sh.dp * sh.cp, sh.edp, sh.pp, k.zero >= 3, m)
    if key not in sp.memo:
        dense, expert = pr.params
        local = (dense / (sh.dp * sh.cp) + expert / sh.edp) / sh.pp
        sp.memo[key] = max(optimizer_floor(sp, sh, k, pr), offload_step_time(
            local, sp.cm.dtype, sp.cm.gpu, *offload_copies(k.zero, m)))
    return sp.memo[key]


def with_deferred_grads(sp: Space, sh: Sharding, k: Knobs, floor):
    """``floor`` (``bounds.Floor``) with the unsharded gradients a zero-bubble FSDP2 stage holds to its last
    backward (``fsdp.plan_holds_stage_grads``, ``runtime_memory.deferred_fsdp_memory``) beyond the sharded ones
    it counts: every layer's gradient, whole, resident beside the activations (in ``temps``, which the memory
    floor and the recompute floor both read)."""
    cm = sp.cm
    if not holds_grads(cm, sh, k):
        return floor
    # one copy per floor and what its gradients read (the floor kept beside it: its id stays its own)
    key = ("deferred", id(floor), sh.dp * sh.cp, sh.edp, k.zero, k.offload)
    hit = sp.memo.get(key)
    if hit is None or hit[0] is not floor:
        whole = (floor.dense + floor.expert) * bytes_per_param(cm.dtype)[1]
        hit = sp.memo[key] = (floor, replace(floor, temps=floor.temps + whole - floor.grads(cm, sh, k.zero, k.offload)))
    return hit[1]


def holds_grads(cm, sh: Sharding, k: Knobs) -> bool:
    """``fsdp.plan_holds_stage_grads`` of the configuration (sharding ``sh``, knobs ``k``) from the fields it reads,
    without building its probe (``tests/test_search_caches.py`` checks the two agree)."""
    return cm_holds_stage_grads(cm, sh.pp, k.schedule, k.zero, k.offload, sh.dp * sh.cp)


def expand_row(sp: Space, sh: Sharding, knobs: list[Knobs]) -> None:
    """Price one sharding and queue its configurations by schedule: a group holds the knobs of one
    (schedule, vpp) above the memory floor, under the least of their bounds (the ZeRO- and
    offload-dependent terms at their smallest), so most configurations are never bounded one by one
    (a group whose bound reaches the k-th best never leaves the queue). The schedule's terms are worked out once
    per group, the ZeRO stage's and offload's once per configuration."""
    cm, stats = sp.cm, sp.stats
    m = sp.gb // (sh.dp * sh.mbs)
    pr = sp.priced(sh)
    p2p = sp.p2p(sh)
    host_usable = cm.gpu.host_mem_bytes * cm.gpu.host_usable_fraction if cm.gpu.host_mem_bytes else None
    for ks in sp.knobs(knobs).groups:
        k0 = ks[0]   # exact bubble share: the partition reads the same sums
        in_flight = min_in_flight(sh.pp, m, k0.schedule, k0.vpp)
        peak, share = peak_floor(sp, sh, k0, pr), bubble_share(k0.schedule, *pr.fbw)
        warm = grads_freed(sp, sh, k0.schedule, k0.vpp)
        v_shaped = k0.schedule in pipeline.V_SHAPED
        terms = []
        for k in ks:   # one (ZeRO, offload) pair each
            modes = allowed_modes(sp.cons.modes, k.schedule, k.offload)
            floor = with_deferred_grads(sp, sh, k, floor_for(sp, sh, modes))
            if floor.bytes(cm, sh, k.zero, k.offload, in_flight, warm) > sp.usable or (
                    k.offload and host_usable is not None and floor.host_bytes(cm, sh) > host_usable):
                continue
            extra = recompute_floor(sp, sh, k, floor, in_flight, warm, pr.rc)
            if v_shaped:   # one recompute mode on every layer (_v_shaped)
                uniform = _uniform_extra(sp, sh, k, floor, modes, in_flight, warm, pr.rc)
                if uniform is None:
                    continue
                extra = max(extra, uniform)
            terms.append((k, extra, step_optimizer_floor(sp, sh, k, pr) + copy_floor(sp, sh, k, pr)))
        stats.pruned_memory += len(ks) - len(terms)
        if terms:   # pipeline_bound grows with the per-micro-batch total and with the gradient sync
            terms = [(*t, *grad_sync_floor(sp, sh, t[0], pr)) for t in terms]   # reads zero, offload, schedule, vpp
            lb = pipeline_bound(sp, sh, k0, pr.total + min(t[1] for t in terms), p2p, peak, share,
                                min(t[4] for t in terms))
            sp.push(lb + min(t[2] for t in terms) + min(t[3] for t in terms), "group", sh,
                    (terms, pr.total, p2p, peak, share))


def recompute_floor(sp: Space, sh: Sharding, k: Knobs, floor: Floor, in_flight: float, warm: bool,
                     rc: list[dict]) -> float:
    """``Floor.recompute_time`` at the fewest micro-batches in flight, or with each rank's own count where
    that is tighter: rank ``r`` holds ``f_r`` micro-batches and its pipeline buffers ``b_r``
    (``CostModel._pipeline_buffer_bytes``, as ``rank_memory``; torchtitan's own accounting left out), so
    its activations stay under ``(usable - b_r - its states and temporaries) / f_r`` and all ranks' under
    ``sum((usable - b_r) / f_r) - (states + temporaries) / max f_r`` (the states may sit on the rank holding
    the most); Floor.recompute_time gives that room with ``in_flight = max f_r`` and ``usable = max f_r *
    sum((usable - b_r) / f_r) / pp``."""
    f_max, usable = ranks_room(sp, sh, k)
    # recompute_time only falls as its room grows (each float step is monotone): the larger of the two is the
    # one at the smaller room, worked out as recompute_time works it out
    res = floor.resident(sp.cm, sh, k.zero, k.offload, warm)
    if (sh.pp * usable - res - floor.temps) / f_max < (sh.pp * sp.usable - res - floor.temps) / in_flight:
        return floor.recompute_time(sp.cm, sh, k, f_max, usable, rc, warm)
    return floor.recompute_time(sp.cm, sh, k, in_flight, sp.usable, rc, warm)


def ranks_room(sp: Space, sh: Sharding, k: Knobs) -> tuple[float, float]:
    """``recompute_floor``'s (``max f_r``, ``max f_r * sum((usable - b_r) / f_r) / pp``) of the schedule's pipeline
    (what the buffers read: no ZeRO or offload term). ``b_r`` is linear in the rank's in-flight count
    (``CostModel._pipeline_buffer_bytes``: a fixed part and the outputs kept per micro-batch), so the sum is, over
    the classes of rank (the first, the last, the others), ``(usable - b(0)) sum(1 / f_r) - (b(1) - b(0)) n``
    (``_in_flight_classes``; a class of one rank reads its own count): at most four buffer calls where the
    rank-by-rank sum made ``pp``. ``MARGIN`` lifts the room over the rounding of a sum in another order
    (``tests/test_search_reuse.py`` checks both)."""
    m = sp.gb // (sh.dp * sh.mbs)
    key = ("ranks_room", sh.pp, sh.mbs, sh.cp, sh.tp, sh.sp, m, k.schedule, k.vpp)   # what the buffers read
    hit = sp.memo.get(key)
    if hit is None:
        f_max, classes = _in_flight_classes(sh.pp, m, k.schedule, k.vpp)
        s, total, titan = probe(sh, sp.gb, k), 0.0, sp.cm.ctx.runtime == "torchtitan"
        for (first, last), (n, inv, f) in classes.items():
            if titan:   # torchtitan's own pipeline memory: left out, as rank_memory does
                total += sp.usable * inv
            elif n == 1:   # one rank (the first, the last): its own count
                total += (sp.usable - sp.cm._pipeline_buffer_bytes(s, first, last, f)) / f
            else:
                b0, b1 = (sp.cm._pipeline_buffer_bytes(s, first, last, x) for x in (0.0, 1.0))
                total += (sp.usable - b0) * inv - (b1 - b0) * n
        usable = f_max * total / sh.pp
        hit = sp.memo[key] = (f_max, usable + abs(usable) * MARGIN)
    return hit


@lru_cache(maxsize=4096)
def _in_flight_classes(pp: int, m: int, schedule: str, vpp: int) -> tuple[float, dict]:
    """(the most micro-batches a rank holds, {(first rank, last rank): (ranks, sum of 1 / in flight, the first's in
    flight)}); the first and last rank: those holding the embedding and the output layer (``end_ranks``)."""
    f = [in_flight_microbatches(r, pp, m, schedule, vpp) for r in range(pp)]
    first, last = end_ranks(pp, vpp, schedule)
    classes: dict[tuple[bool, bool], list[float]] = {}
    for r, x in enumerate(f):
        classes.setdefault((r == first, r == last), []).append(x)
    return max(f), {e: (len(xs), sum(1.0 / x for x in xs), xs[0]) for e, xs in classes.items()}


def _uniform_extra(sp: Space, sh: Sharding, k: Knobs, floor: Floor, modes: tuple[str, ...], in_flight: float,
                   warm: bool, rc: list[dict]) -> float | None:
    """V-shaped schedules run one recompute mode on every layer (``_v_shaped``): the least extra time per
    micro-batch (all ranks, ``rc`` per block template) of an allowed mode whose activations on every layer
    fit the mean rank's floor (``Floor.bytes``); None when none does (the configuration cannot fit)."""
    best = None
    for m in modes:
        saved = sum(n * by.get(m, 0.0) for n, by in floor.saves)   # below the fastest mode's activations
        if replace(floor, act=floor.act_base - saved).bytes(sp.cm, sh, k.zero, k.offload, in_flight, warm) \
                > sp.usable:
            continue
        t = sum(n * times[m] for (n, _), times in zip(floor.saves, rc))
        best = t if best is None else min(best, t)
    return best


def expand_group(sp: Space, sh: Sharding, group: tuple) -> None:
    """Queue each configuration of a schedule group (``expand_row``) under its own bound."""
    terms, total, p2p, peak, share = group
    for k, extra, opt, last_bucket, sync in terms:   # expand_row's terms, each with its gradient sync floor
        sp.stats.enumerated += 1
        lb = pipeline_bound(sp, sh, k, total + extra, p2p, peak, share, sync)
        sp.push(lb + opt + last_bucket, "config", sh, k, (total + extra, p2p, peak, share, sync))
