"""Ranking of the plans the search found: by the step time the estimate prints, feasible only,
and within ``TIE`` (1%) of each other the simpler plan first.

Simpler, in order: fewer model-parallel dimensions above 1 (tp, pp, cp, ep, etp), fewer
parallel dimensions in all (dp included), plain data parallel (DDP) before ZeRO-3 / FSDP, a
lower ZeRO stage, no optimizer offload, then no recompute. A practitioner runs DDP over ZeRO-3,
and data parallel (FSDP) over splitting the model (an 8B model at 8k on one node runs dp8 FSDP,
not cp8), when the cost model says they are within 1%: the difference is inside the model's
error, and each model-parallel dimension adds collectives in the critical path and ways to fail.
"""

from __future__ import annotations

from autopar.core.strategy import Strategy
from autopar.cost_models.estimate import CostModel
from autopar.planner.space import Candidate

TIE = 0.01
RULE = ("ranked by predicted step time; plans within 1% of each other are listed simpler first "
        "(fewer model-parallel dimensions > 1 (tp, pp, cp, ep), then fewer dimensions with dp, DDP before "
        "ZeRO-3, lower ZeRO stage, no offload before offload, no recompute before recompute)")


def simplicity(s: Strategy) -> tuple:
    """Sort key: smaller is simpler."""
    model_dims = sum(d > 1 for d in (s.tp, s.pp, s.cp, s.ep, s.etp))
    return (model_dims, model_dims + (s.dp > 1), s.zero_stage >= 3, s.zero_stage, s.offload_optimizer,
            s.recompute != "none")


def order(cands: list[Candidate], tie: float = TIE) -> list[Candidate]:
    """Fastest first; among the plans within ``tie`` of the fastest one left, the simplest next."""
    left = sorted(cands, key=lambda c: c.estimate.step_time_s)
    out = []
    while left:
        fastest = left[0].estimate.step_time_s
        close = [c for c in left if c.estimate.step_time_s <= fastest * (1 + tie)]
        pick = min(close, key=lambda c: (simplicity(c.strategy), c.estimate.step_time_s))
        out.append(pick)
        left.remove(pick)
    return out


def feasible_ranked(cm: CostModel, found: list[Candidate], top_k: int) -> tuple[list[Candidate], int]:
    """Estimate the found candidates (fastest by the search's price first) until ``top_k`` fit,
    plus any within ``TIE`` of the ``top_k``-th fastest estimate (none further can be listed: each of the
    first ``top_k`` picks of ``order`` lies within ``TIE`` of a plan at least that fast; the search's price
    never exceeds the estimate); drop the ones whose estimate does not fit. Returns the ranked candidates
    and how many were dropped. The cut reads estimates, not the order found: the plans listed do not
    depend on which slower plans the search happened to partition (tests/test_ranking.py)."""
    kept, dropped = [], 0
    for c in sorted(found, key=lambda c: c.step_time_s):
        if len(kept) >= top_k and c.step_time_s > _kth(kept, top_k) * (1 + TIE):
            break
        c.estimate = c.estimate or cm.estimate(c.strategy, c.stages, c.layer_recompute)
        if not c.estimate.feasible:
            dropped += 1
            continue
        kept.append(c)
    return listed(kept, top_k), dropped


def _kth(cands: list[Candidate], k: int) -> float:
    """The ``k``-th fastest estimate of ``cands``."""
    return sorted(c.estimate.step_time_s for c in cands)[k - 1]


def listed(cands: list[Candidate], top_k: int, tie: float = TIE) -> list[Candidate]:
    """``order(cands)`` cut to ``top_k``, the fastest plan always among them. The tie rule moves each
    simpler plan within ``tie`` of the fastest left ahead of it; where a step time is mostly a constant
    (the stack's per-step overhead on a small model puts every plan within 1%), that chain can push the
    fastest past ``top_k``: it then takes the last place listed (still a subsequence of the order)."""
    ranked = order(cands, tie)
    top = ranked[:top_k]
    if top:
        fastest = min(cands, key=lambda c: c.estimate.step_time_s)
        if not any(c is fastest for c in top):
            top[-1] = fastest
    return top
