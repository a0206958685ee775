"""The stage-partition DP (``partition``'s module docstring): ranks in order, states = the offset a
rank ends at, labels = the Pareto set of ``(max P, sum P, max D, max O)`` of the ranks so far.

A rank's layer set is priced (``RankPricer.evaluate``: its recompute under its memory budget, the
costly part) only when some label could still pass the bound with it (``_hopeless``: a floor of
the rank read without pricing it), so a configuration far from the incumbent prices few ranks.
"""

from __future__ import annotations

from dataclasses import dataclass

# ``pr`` below is a ``planner.partition.RankPricer`` (not imported: partition imports this module,
# and the layering test forbids import cycles, type-only ones included)
RankPricer = "planner.partition.RankPricer"

INF = float("inf")


@dataclass
class _Label:
    maxP: float
    sumP: float
    maxD: float
    maxO: float
    prev: "_Label | None"
    c: int

    def dominates(self, o: "_Label") -> bool:
        return self.maxP <= o.maxP and self.sumP <= o.sumP and self.maxD <= o.maxD and self.maxO <= o.maxO


def dp(pr: RankPricer, upper: float) -> list[int] | None:
    """Pareto DP over ranks (see the module docstring); returns layers per period per rank."""
    A, B, K = pr.coefficients()
    p, C = pr.p, pr.C
    out_time = pr.costs["output"].time("none") if pr.costs["output"] else 0.0
    rest = [pr.base_time(o, C - o) for o in range(C + 1)]   # base time of positions >= o
    total = rest[0] + sum(e.time("none") for e in pr.extras(0)) + (out_time if p > 1 else 0.0)
    p_max = (upper - K - B * total) / A if A > 0 else INF
    slack = upper * 1e-12
    labels: dict[int, list[_Label]] = {0: [_Label(0.0, 0.0, 0.0, 0.0, None, 0)]}
    for r in range(p):
        labels = _rank_labels(pr, r, labels, rest, out_time, p_max + slack, upper + slack)
    final = labels.get(C, [])
    if not final:
        return None
    best = min(final, key=lambda x: A * x.maxP + B * x.sumP + x.maxD + x.maxO)
    counts = []
    while best.prev is not None:
        counts.append(best.c)
        best = best.prev
    return counts[::-1]


def _rank_labels(pr: RankPricer, r: int, labels: dict[int, list[_Label]], rest: list[float], out_time: float,
                 p_cap: float, cap: float) -> dict[int, list[_Label]]:
    """The labels after rank ``r`` (by the offset it ends at): every label extended by every count
    the rank may hold, kept when its bound stays within ``cap`` (``p_cap``: the most ``P`` may be)."""
    A, B, K = pr.coefficients()
    C, left, edge = pr.C, pr.p - r - 1, pr.edge_time(r)
    hcap = cap + abs(cap) * 1e-9   # a floor must pass cap by more than the rounding of the sums it stands under
    nxt: dict[int, list[_Label]] = {}
    for o, labs in labels.items():
        hi = C - o - left
        lo = hi if left == 0 else 1
        low = _Label(*(min(getattr(lab, f) for lab in labs) for f in ("maxP", "sumP", "maxD", "maxO")), None, 0)
        for c in _counts_to_try(pr, r, o, lo, hi, low, rest, out_time, p_cap, hcap):
            base = pr.base_time(o, c)
            if base > p_cap:
                break
            o2 = o + c
            rest_t = rest[o2] + (out_time if left else 0.0)
            spread = rest_t / left if left else 0.0
            ev = pr.priced_at(r, o, c)
            if ev is None:
                if _hopeless(pr, r, o, c, base + edge, labs, low, rest_t, spread, hcap):
                    continue   # not priced: no label of it could pass
                ev = pr.evaluate(r, o, c)
            if not ev.feasible:
                break  # more layers on this rank only need more memory
            if ev.P > p_cap:
                continue
            for lab in labs:   # a label is built only when its bound passes
                maxP, sumP = max(lab.maxP, ev.P), lab.sumP + ev.P
                maxD, maxO = max(lab.maxD, ev.D), max(lab.maxO, ev.O)
                if A * max(maxP, spread) + B * (sumP + rest_t) + K + maxD + maxO > cap:
                    continue
                _insert(nxt.setdefault(o2, []), _Label(maxP, sumP, maxD, maxO, lab, c))
    return nxt


def _counts_to_try(pr: RankPricer, r: int, o: int, lo: int, hi: int, low: _Label, rest: list[float],
                   out_time: float, p_cap: float, hcap: float):
    """The counts ``c`` in ``[lo, hi]`` the loop tries, in order: with one kind of layer (a rank's
    base time and ``fixed_D`` then depend on its count only, ``_by_count``), those that ``_hopeless``
    with ``low`` alone (a floor of every label) does not rule out,
    and none from the first whose base time passes ``p_cap`` (the loop stops there)."""
    if len(pr.groups) != 1:
        return range(lo, hi + 1)
    A, B, K = pr.coefficients()
    base_c, fixed_c = _by_count(pr)
    left, edge, last = pr.p - r - 1, pr.edge_time(r), r == pr.p - 2
    tail = out_time if left else 0.0
    out = []
    for c in range(lo, hi + 1):   # plain floats: a loop of a few dozen counts, no array set-up
        base = base_c[c]
        if base > p_cap:
            break
        rest_t = rest[o + c] + tail
        spread = rest_t / left if left else 0.0
        P = base + edge
        D = max(fixed_c[c], fixed_c[pr.C - o - c]) if last else fixed_c[c]
        if not A * max(low.maxP, P, spread) + B * (low.sumP + P + rest_t) + K + max(low.maxD, D) + low.maxO > hcap:
            out.append(c)
    return out


def _by_count(pr: RankPricer) -> tuple[list[float], list[float]]:
    """One kind of layer: ``base_time`` and ``fixed_D`` of a rank holding ``c`` positions (any offset),
    by ``c``; the values of the scalar calls themselves."""
    hit = pr.dp_memo.get("by_count")
    if hit is None:
        base = [pr.base_time(0, c) for c in range(pr.C + 1)]
        fixed = [0.0] + [pr.fixed_D(0, c) for c in range(1, pr.C + 1)]
        hit = pr.dp_memo["by_count"] = (base, fixed)
    return hit


def _hopeless(pr: RankPricer, r: int, o: int, c: int, P: float, labs: list[_Label], low: _Label, rest_t: float,
              spread: float, cap: float) -> bool:
    """Whether every label's bound passes ``cap`` with rank ``r`` holding positions ``[o, o + c)``,
    judged before pricing the rank: ``P`` is at least its layers' ``base_time`` (each at its fastest
    allowed mode) plus its edge layers' time, and ``D`` is known before pricing where it does not
    depend on the recompute (``fixed_D``), for this rank and for the last one when the next rank is
    the last (its layers are then fixed). ``low``: the labels' least fields (a floor of every label).
    The bound grows with ``P`` and ``D``, so the rank would have added no label; the stop at the
    first rank that does not fit (memory grows with the layers held) comes at the next one priced."""
    A, B, K = pr.coefficients()
    D = pr.fixed_D(o, c)
    if r == pr.p - 2:
        D = max(D, pr.fixed_D(o + c, pr.C - o - c))

    def bound(lab: _Label) -> float:
        return A * max(lab.maxP, P, spread) + B * (lab.sumP + P + rest_t) + K + max(lab.maxD, D) + lab.maxO
    return bound(low) > cap or all(bound(lab) > cap for lab in labs)


def _insert(labs: list[_Label], new: _Label) -> None:
    for lab in labs:
        if lab.dominates(new):
            return
    labs[:] = [lab for lab in labs if not new.dominates(lab)]
    labs.append(new)
