"""Floors of step terms that a pricing's layer sums leave out, for the search's bounds (``bounds``, ``search``):
an eager host's kernel launches where a row is bounded from the pricing of a larger micro-batch, and FSDP2's own
copies, which the estimate adds to its slowest rank's optimizer time. Each stays at or under what it bounds
(``tests/test_search_floors.py``), so pruning with it does not change the search's answer."""

from __future__ import annotations

from autopar.cost_models import host_bound
from autopar.cost_models.fsdp_copy import copy_bytes
from autopar.planner.bounds import Priced, Space, probe
from autopar.planner.space import Knobs, Sharding

INF = float("inf")


def scaled_no_cp(sp: Space, sh: Sharding, pr: Priced, scale: float) -> tuple[float, float]:
    """(every layer's time without context-parallel exposure, the fastest block's) at ``scale`` times the micro-batch
    ``pr`` prices, at most the prices at that micro-batch (``_schedule_bounds``): GPU time per sequence never
    falls with the micro-batch (``curves_monotone``), and an eager host's launches per micro-batch do not shrink
    with it, so a layer's forward + backward (+ its recompute's re-run) at the smaller micro-batch takes at least
    ``max(host launches x host_launch_s, scale x its time at this one)`` (``host_bound.layer_floor``) and the rest
    of its time at least ``scale`` x the rest. ``scale``: 1 gives ``pr``'s own sums."""
    if scale == 1.0:
        return pr.total_no_cp, pr.min_block_no_cp
    key = ("scaled", id(pr), sh.ep, scale)   # the launches read ep (expert loops); ``pr`` lives in ``sp.prices``
    if key not in sp.memo:
        cm, base = sp.cm, sp.cons.modes[0]
        h = host_bound.host_launch_s(cm.gpu, cm.ctx.runtime)
        s, grouped = probe(sh, sp.gb), host_bound.grouped_experts(cm.stack)
        total, block = 0.0, INF
        for t in cm.templates:
            c, mode = pr.costs[t.indices[0] if t.kind == "block" else t.kind], base if t.kind == "block" else "none"
            if not c:
                continue
            device = c.fwd_s + c.bwd_s + c.recompute_s[mode]   # what the host floor floors (layer_floor)
            # the launches' op calls are memoized by template, mode and ep (host_bound._CALLS)
            host = h * host_bound.layer_launches(t, s, cm.gpu, mode, grouped, cm.ctx.runtime) if h else 0.0
            one = max(host, scale * device) + scale * (c.time(mode) - device - c.comm_s.get("cp", 0.0))
            n = len(t.indices) if t.kind == "block" else 1
            total += n * one
            block = min(block, one) if t.kind == "block" else block
        sp.memo[key] = (total * (1 - 1e-12), block * (1 - 1e-12))   # rounding: under the unscaled sums' order
    return sp.memo[key]


def copy_floor(sp: Space, sh: Sharding, k: Knobs, pr: Priced) -> float:
    """FSDP2's copies of the mean rank per step (``fsdp_copy.copy_bytes``, linear in the rank's block parameters)
    at the profile's fastest memory-bound rate: the estimate adds them to its slowest rank's optimizer time
    (``CostModel.optimizer_time``), which ``optimizer_floor`` bounds without them."""
    key = ("copies", sh, k.zero, k.offload, k.schedule)   # what copy_bytes reads of the probe (pr: sh's pricing)
    if key not in sp.memo:
        dense, expert = pr.params
        sp.memo[key] = copy_bytes(sp.cm, probe(sh, sp.gb, k), dense / sh.pp, expert / sh.pp) / sp.opt_bw
    return sp.memo[key]
