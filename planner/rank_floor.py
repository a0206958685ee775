"""A floor of the slowest pipeline rank's time over every stage layout, recompute included.

The search's other bounds see the ranks' recompute only summed (``Floor.recompute_time``: the mean rank);
most configurations the partition DP then rejects are over their bound because one rank (the first, which
holds the most micro-batches in flight, or the last, with the logits) must recompute more than the mean.
This floor reads each rank's own memory, without pricing a rank.

Rank ``r`` holding ``c`` positions of each of the ``v`` periods (``n = v c`` layers, ``partition``'s
layout) takes at least

``P_r(n) = e_r + n t + rate * max(0, n a - room_r(n) / f_r)``

(``RankPricer._price``: the layers' time without recompute, its edge layers' ``e_r``, plus the recompute the
rank's budget forces): ``t`` and ``a`` one layer's time and saved bytes without recompute (the least over the
kinds of block where there are several, ``_least_layer``; exact for one kind), ``f_r`` its
micro-batches in flight, ``rate`` the cheapest seconds per byte saved of any allowed mode (a fractional
relaxation of ``recompute.choose``, looser than any real choice) and ``room_r(n)`` what
``RankPricer._budget`` leaves the layers' activations, at least: usable memory less the rank's parameters and
optimizer states (``CostModel.rank_memory``'s formulas), its ZeRO-sharded gradients (not on a rank whose warm-up
reuses them, ``memory.warmup_gradient_bytes``, which gives back at most them and the communication buffers; whole
where a zero-bubble FSDP2 stage holds them to its last backward), its loss temporaries, its pipeline buffers and its
edge layers' activations. The communication buffers, the workspace, the context-parallel mask and every term that
only adds memory are left out: each leaves ``room`` larger, so ``P_r`` lower. No rank can hold
``n`` layers where even saving every saveable byte leaves too little room (``P_r = inf``).

``P_r`` grows with ``n``, so the least ``max_r P_r(c_r)`` over the layouts (``sum c_r = C``, ``c_r >= 1``)
is the larger of ``max_r P_r(1)`` and the ``C``-th smallest of all the ranks' values ``P_r(1..C-p+1)``
taken together: at any ``X`` a rank holds at most the ``c`` with ``P_r(c) <= X``.
(``tests/test_search_bounds.py`` and ``tests/test_search_floors.py`` check it stays under the partition's
slowest rank.)
"""

from __future__ import annotations

import numpy as np

from autopar.cost_models import fsdp
from autopar.cost_models.estimate import RankReport
from autopar.cost_models.layer_model import tied_copy_params
from autopar.cost_models.memory import (
    bytes_per_param,
    expert_shard_group,
    grads_freed_before_activation_peak,
    model_state_bytes,
)
from autopar.cost_models.pipeline import end_ranks, in_flight_microbatches
from autopar.planner.bounds import probe, v_rank_layers
from autopar.planner.groups import holds_grads
from autopar.techniques import pipeline

INF = float("inf")
MARGIN = 1e-9   # relative: the floor's float sums run in another order than the DP's


def slowest_rank_floor(sp, sh, k, modes: tuple[str, ...]) -> float:
    """The floor of ``max P`` of the module docstring for configuration (``sh``, ``k``) whose layers may use
    ``modes``; 0 where it does not apply (several kinds of layer, a V-shaped schedule, torchtitan's own
    pipeline memory, no ``none`` mode); inf where no layout fits. ``sp``: the search's ``Space``."""
    key = ("rank_floor", sh, k, modes)   # all it reads: the sharding's pricing, the knobs, the modes
    if key not in sp.memo:
        sp.memo[key] = _floor(sp, sh, k, modes)
    return sp.memo[key]


def _floor(sp, sh, k, modes: tuple[str, ...]) -> float:
    cm = sp.cm
    if cm.ctx.runtime == "torchtitan":
        return 0.0
    if k.schedule in pipeline.V_SHAPED:
        return _v_floor(sp, sh, k, modes)
    p, v = sh.pp, k.vpp
    C = cm.num_layers // v
    if "none" not in modes or C < p or cm.num_layers % v:
        return 0.0   # (C < p or v not dividing the layers: the partition refuses it)
    blk = _least_layer(sp, sh, modes)
    if blk is None:
        return 0.0   # a mode faster than none: the relaxation would not bound it
    t, a, _, _, rate, cap = blk
    e, f, room0, slope = (np.array(x) for x in zip(*_rank_rows(sp, sh, k, blk)))
    n = np.arange(1, C - p + 2, dtype=float) * v          # layers held, c = 1 .. C - p + 1
    # need(n) = n (a + per-layer states / f) - (room at no layers) / f: bytes per micro-batch to save
    need = n[None, :] * (a + slope[:, None] / f[:, None]) - (room0 / f)[:, None]
    P = e[:, None] + n[None, :] * t + rate * np.maximum(need, 0.0)
    P[need > n[None, :] * cap * (1 + MARGIN) + 1.0] = INF   # cannot save enough even recomputing every byte
    first = P[:, 0].max()
    if first == INF:
        return INF
    kth = np.partition(P.ravel(), C - 1)[C - 1]
    return float(max(first, kth)) * (1 - MARGIN)


def _least_layer(sp, sh, modes: tuple[str, ...]) -> tuple | None:
    """A layer no block of the sharding's pricing beats: (its time and saved bytes without recompute, its
    dense and expert parameters, the cheapest seconds per byte saved and the most bytes saved by any allowed
    mode), each the least (the most bytes saved: the largest) over the kinds of block, so every rank's floor
    stays under each of its layer sets'; exact for a model of one kind of layer. None where some mode is
    faster than none."""
    key = ("least_layer", id(sp.priced(sh)), modes)   # the pricing lives in ``sp.prices``
    if key not in sp.memo:
        costs = sp.priced(sh).costs
        kinds = list({id(costs[i]): costs[i] for i in range(sp.cm.num_layers)}.values())
        offers = [_offer(c, modes) for c in kinds]
        saving = [o for o in offers if o[1] > 0] or [(0.0, 0.0)]
        sp.memo[key] = None if any(o[0] < 0 for o in offers) else (
            min(c.time("none") for c in kinds), min(c.act_bytes["none"] for c in kinds),
            min(c.params_dense for c in kinds), min(c.params_expert for c in kinds),
            min(o[0] for o in saving), max(o[1] for o in saving))
    return sp.memo[key]


def _v_floor(sp, sh, k, modes: tuple[str, ...]) -> float:
    """V-shaped schedules run the even split with one mode on every layer (``search._v_shaped``): each rank's
    layers are known (any kinds of layer), so the floor is the least over the modes that fit every rank's room
    of the slowest rank's time in that mode; inf where no mode fits."""
    io, sums = _rank_io(sp, sh, k.schedule, k.vpp), _v_sums(sp, sh, k.vpp, k.schedule)
    holds = _holds_grads(sp, sh, k)
    give = _deferred_block(sp, sh) if holds else 0.0
    rows = []
    for (e, f, fixed, edge_dense, grads), (dense, expert, by_mode) in zip(io[1], sums):
        room = sp.usable * (1 + MARGIN) - fixed + (give if grads else 0.0) \
            - _states(sp.cm, io[0], dense + edge_dense, expert, k, grads, grads and holds)
        rows.append((e, f, room, by_mode))
    best = INF
    for m in modes:
        if all(f * by_mode[m][1] <= room for _, f, room, by_mode in rows):
            best = min(best, max(e + by_mode[m][0] for e, _, _, by_mode in rows))
    return best * (1 - MARGIN)


def _v_sums(sp, sh, v: int, schedule: str) -> list[tuple]:
    """Per rank of a V-shaped split: its layers' dense and expert parameters and, by mode, their time and saved
    bytes (``CostModel.rank_memory``'s sums), once per pricing and split."""
    key = ("v_sums", id(sp.priced(sh)), sh.pp, v, schedule)   # the pricing lives in ``sp.prices``
    if key not in sp.memo:
        costs, out = sp.priced(sh).costs, []
        for layers in v_rank_layers(sp.cm.num_layers, sh.pp, v, schedule):
            parts = [costs[i] for i in layers]
            by_mode = {m: (sum(c.time(m) for c in parts), sum(c.act_bytes[m] for c in parts))
                       for m in costs[0].act_bytes}
            out.append((sum(c.params_dense for c in parts), sum(c.params_expert for c in parts), by_mode))
        sp.memo[key] = out
    return sp.memo[key]


def _offer(blk, modes: tuple[str, ...]) -> tuple[float, float]:
    """(the cheapest seconds per byte saved of any allowed mode, the most bytes a mode saves) of one layer;
    (0, 0) where no mode saves anything; a negative rate where some mode is faster than none."""
    a, t = blk.act_bytes["none"], blk.time("none")
    useful = [((blk.time(m) - t) / (a - blk.act_bytes[m]), a - blk.act_bytes[m]) for m in modes
              if m != "none" and a - blk.act_bytes[m] > 0]
    if any(blk.time(m) < t for m in modes):
        return -1.0, 0.0
    if not useful:
        return 0.0, 0.0   # nothing to save: a rank over its room is refused by the byte check alone
    return min(r for r, _ in useful), max(b for _, b in useful)


def _rank_rows(sp, sh, k, blk: tuple) -> list[tuple[float, float, float, float]]:
    """Each rank's (edge layers' time, micro-batches in flight, room for its layers' activations when it
    holds no layer, the room one more layer's states take), as ``RankPricer._budget`` and
    ``CostModel.rank_memory`` count them (the terms that only add memory left out)."""
    io = _rank_io(sp, sh, k.schedule, k.vpp)
    s, out, per, edges = io[0], [], {}, {}   # edges: most ranks hold no edge layer (edge_dense 0)
    holds = _holds_grads(sp, sh, k)
    give = _deferred_block(sp, sh) if holds else 0.0
    for e, f, fixed, edge_dense, grads in io[1]:
        if grads not in per:
            per[grads] = _states(sp.cm, s, blk[2], blk[3], k, grads, grads and holds)
        if (edge_dense, grads) not in edges:
            edges[edge_dense, grads] = _states(sp.cm, s, edge_dense, 0.0, k, grads, grads and holds)
        room = sp.usable * (1 + MARGIN) - fixed + (give if grads else 0.0)
        out.append((e, f, room - edges[edge_dense, grads], per[grads]))
    return out


def _rank_io(sp, sh, schedule: str, vpp: int) -> tuple:
    """(the probe, per rank: edge time, in flight, its memory that does not depend on ZeRO or offload, its edge
    layers' parameters, whether its gradients count), once per sharding and schedule."""
    key = ("rank_io", sh, schedule, vpp)
    if key in sp.memo:
        return sp.memo[key]
    cm, p = sp.cm, sh.pp
    m = sp.gb // (sh.dp * sh.mbs)
    costs = sp.priced(sh).costs
    s = probe(sh, sp.gb, schedule=schedule, vpp=vpp)
    ends = end_ranks(p, vpp, schedule)   # the ranks holding the embedding and the output layer
    # a rank that warms up every micro-batch before its gradients exist reuses their bytes (warmup_gradient_bytes)
    freed = grads_freed_before_activation_peak(s, cm.ctx.runtime)
    rows = []
    for r in range(p):
        first, last = r == ends[0], r == ends[1]
        extra = [c for c, on in ((costs["embedding"], first), (costs["output"], last)) if on and c]
        f = in_flight_microbatches(r, p, m, schedule, vpp)
        edge_dense = sum(c.params_dense for c in extra)
        edge_dense += tied_copy_params(cm.output, p, sh.tp) if last else 0.0   # a tied head's second copy
        bufs = cm._pipeline_buffer_bytes(s, first and cm.embedding is not None, last, f)
        fixed = sum(c.temp_bytes for c in extra) + bufs + f * sum(c.act_bytes["none"] for c in extra)
        rows.append((sum(c.time("none") for c in extra), f, fixed, edge_dense, not (f >= m and freed)))
    sp.memo[key] = (s, rows)
    return sp.memo[key]


def _states(cm, s, dense: float, expert: float, k, grads: bool, whole: bool = False) -> float:
    """Parameters and optimizer states on the device (``CostModel.rank_memory``), and the gradients where
    ``grads``: ZeRO-sharded, or all of them where ``whole`` (a zero-bubble FSDP2 stage holds them to its last
    backward, ``runtime_memory.deferred_fsdp_memory``: ``_holds_grads``; the one block it then takes off the
    communication buffers, which this floor leaves out, is given back by ``_deferred_block``)."""
    held = (dense + expert) * bytes_per_param(cm.dtype)[1] if whole else 0.0
    if k.offload:   # CPUOffloadPolicy: the device holds gathered parameters only, below ZeRO-3
        return held + (0.0 if k.zero >= 3 else (dense + expert) * bytes_per_param(cm.dtype)[0])
    ds = model_state_bytes(dense, cm.dtype, k.zero, s.dp * s.cp)
    es = model_state_bytes(expert, cm.dtype, k.zero, expert_shard_group(s, cm.ctx.runtime))
    sharded = ds.grads + es.grads if grads and not whole else 0.0
    return ds.params + ds.optimizer + es.params + es.optimizer + sharded + held


def _holds_grads(sp, sh, k) -> bool:
    """``fsdp.plan_holds_stage_grads`` of the configuration (sharding ``sh``, knobs ``k``)."""
    return holds_grads(sp.cm, sh, k)


def _deferred_block(sp, sh) -> float:
    """Bytes ``deferred_fsdp_memory`` takes off a rank's communication buffers where the stage holds its whole
    gradients (its largest block's, at most): room this floor, which leaves those buffers out, gives back so that it
    stays under the rank's memory."""
    key = ("largest_block", id(sp.priced(sh)))   # the pricing lives in ``sp.prices``
    if key not in sp.memo:
        costs = sp.priced(sh).costs
        sp.memo[key] = max(costs[i].params_dense + costs[i].params_expert for i in range(sp.cm.num_layers))
    return sp.memo[key] * bytes_per_param(sp.cm.dtype)[1]


def contention_floor(sp, sh, k) -> float:
    """A floor of the estimate's FSDP communication terms, ``max_r e_r + max_r slowdown * (c_r - e_r)``
    (``CostModel.estimate``: the exposed per-unit gathers and scatters ``e_r`` plus the compute the hidden rest
    slows, ``overlap_contention``), which the partition's price leaves out: for the rank with the most
    traffic ``c_r`` both together are at least ``min(1, slowdown) c_r``, and ``c_r`` at least the mean over the
    ranks (``dp_comm_total`` sums over layers). 0 where the traffic is not per unit or nothing slows."""
    key = ("contention", sh, k)
    if key not in sp.memo:
        cm, s = sp.cm, probe(sh, sp.gb, k)
        out = 0.0
        if cm.stack.overlap_slowdown and not cm._cores_saturated and fsdp.per_unit(cm, s):
            # every layer's traffic: each distinct layer's once, times its count (the same sum in another
            # order, which MARGIN covers; one call per layer was a tenth of the 70B search)
            costs, m = sp.priced(sh).costs, s.num_micro_batches
            total = sum(n * cm.dp_comm_total(s, RankReport(0, [i], 0.0, 0.0, 0.0, {}, {}, 1.0), costs, m)
                        for i, n in _distinct_layers(sp, costs))
            out = min(1.0, cm.stack.overlap_slowdown) * total / sh.pp * (1 - MARGIN)
        sp.memo[key] = out
    return sp.memo[key]


def _distinct_layers(sp, costs: dict) -> list[tuple[int, int]]:
    """(first layer, count) of each distinct ``LayerCost`` of a pricing (identical blocks share one)."""
    key = ("distinct", id(costs))   # costs: kept alive by the Priced that holds them
    if key not in sp.memo:
        first: dict[int, list[int]] = {}
        for i in range(sp.cm.num_layers):
            first.setdefault(id(costs[i]), [i, 0])[1] += 1
        sp.memo[key] = [tuple(x) for x in first.values()]
    return sp.memo[key]
