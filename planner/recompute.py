"""Per-layer activation recomputation on one pipeline rank, chosen under its memory budget.

Galvatron-style layer-wise choice (Miao et al. 2022, VLDB): every transformer layer picks
``none``, ``selective`` (Korthikanti et al. 2022: re-run the attention core), ``op`` (per-op
selective checkpointing as torchtitan runs it: keep matmul and attention outputs but every
second matmul, re-run the rest) or ``full`` (keep the layer input, re-run the forward), so a
plan recomputes only the layers it must.

Problem, for one rank whose layers fall into groups ``g`` of identical layers (same
``LayerCost``: the cost model prices identical layers once), ``n_g`` layers each:

- variables: ``x[g, k]`` in Z>=0, the number of layers of group ``g`` run with mode ``k``
  (``k`` ranges over the allowed modes);
- objective: minimise the extra backward time ``sum_{g,k} x[g,k] * dt[g,k]`` where
  ``dt[g,k] = time(k) - time(none)`` of one layer of the group;
- coverage: ``sum_k x[g,k] = n_g`` for every group;
- memory: ``in_flight * sum_{g,k} x[g,k] * act[g,k] + W <= budget`` where ``act`` is the
  activation bytes one micro-batch leaves saved, ``in_flight`` the micro-batches the rank
  holds (``pipeline.in_flight_microbatches``) and ``W`` the largest transient working set
  of a layer's backward, ``W >= work[g,k]`` whenever ``x[g,k] > 0`` (``CostModel.rank_memory``).

Exact solution (no ILP needed; the groups are few and their layers identical):
enumerate ``W`` over the distinct ``work`` values (it only restricts which modes each
group may use); for each group the Pareto frontier of its count vectors ``x[g, .]`` in
(saved bytes, extra time) (``planner.frontier``: built incrementally in ``n_g``, exact);
add the groups' frontiers (Minkowski sum, Pareto filtered again); the answer is the
cheapest frontier point whose bytes fit. When nothing fits the rank is infeasible: fewer
layers on it, more sharding (tp, cp, pp, ZeRO) or a smaller micro-batch are what relax it,
and the stage partition above decides that.
"""

from __future__ import annotations

from bisect import bisect_right
from dataclasses import dataclass

from autopar.cost_models.layer_cost import RECOMPUTE_MODES, LayerCost
from autopar.planner import frontier
from autopar.techniques.pipeline import stage_rank

Frontier = frontier.Frontier  # (act bytes, extra time, counts per group and mode), act ascending


@dataclass(frozen=True)
class RecomputeChoice:
    """Modes for a rank's groups: ``counts[g][k]`` layers of group ``g`` use ``modes[k]``."""

    extra_s: float            # added backward time per micro-batch
    act_bytes: float          # saved activation bytes per micro-batch (layers only)
    work_bytes: float         # largest transient of one layer's backward
    counts: tuple             # per group: tuple of counts aligned with ``modes``
    modes: tuple[str, ...]


def extra_time(c: LayerCost, mode: str) -> float:
    """Extra backward time of one layer in ``mode`` over no recompute (``LayerCost.time``)."""
    return c.time(mode) - c.time("none")


def choose(groups: list[tuple[LayerCost, int]], in_flight: float, budget: float,
           modes: tuple[str, ...] = RECOMPUTE_MODES, cache: dict | None = None,
           workspace=None) -> RecomputeChoice | None:
    """The fastest per-layer recompute of ``groups`` (``(cost, count)`` pairs) whose
    ``in_flight * act + workspace(work)`` stays within ``budget`` bytes; None when nothing fits.
    ``workspace``: the bytes a largest layer transient ``work`` adds to the peak
    (``CostModel.workspace_excess``: only its excess over the loss phase); default ``work``."""
    cache = {} if cache is None else cache
    workspace = workspace or (lambda w: w)
    plain = "none" in modes
    if plain:  # fast path: everything fits without recompute
        act = sum(c.act_bytes["none"] * n for c, n in groups)
        if in_flight * act <= budget:
            return RecomputeChoice(0.0, act, 0.0, tuple(_only(len(modes), modes.index("none"), n)
                                                        for _, n in groups), modes)
    best = None
    for cap, allowed in _caps(groups, modes, cache):
        front, acts = _merged_frontier(groups, allowed, cache)
        room = (budget - workspace(cap)) / in_flight
        i = bisect_right(acts, room) - 1
        if i < 0:
            continue
        act, dt, counts = front[i]
        if best is None or dt < best.extra_s:
            work = max([c.work_bytes[k] for (c, _), ok, cnt in zip(groups, allowed, counts)
                        for k, x in zip(ok, cnt) if x] + [0.0])
            per_group = tuple(_expand(cnt, ok, modes) for cnt, ok in zip(counts, allowed))
            best = RecomputeChoice(dt, act, workspace(work), per_group, modes)
    return best


def _only(size: int, index: int, n: int) -> tuple:
    out = [0] * size
    out[index] = n
    return tuple(out)


def _expand(counts: tuple, allowed: tuple[str, ...], modes: tuple[str, ...]) -> tuple:
    full = dict(zip(allowed, counts))
    return tuple(full.get(k, 0) for k in modes)


def _work_caps(groups: list[tuple[LayerCost, int]], modes: tuple[str, ...]) -> list[float]:
    """Candidate values of the largest working set, ascending (the cap only filters modes)."""
    return sorted({c.work_bytes[k] for c, n in groups if n for k in modes})


def _caps(groups: list[tuple[LayerCost, int]], modes: tuple[str, ...], cache: dict) -> list[tuple]:
    """``(cap, allowed modes per group)`` for each work cap (``_work_caps``) under which every group
    keeps a mode; the cap filters modes group by group: a mode's working set differs between layer kinds."""
    key = ("caps", tuple((id(c), n) for c, n in groups), modes)
    if key not in cache:
        out = []
        for cap in _work_caps(groups, modes):
            allowed = tuple(tuple(k for k in modes if c.work_bytes[k] <= cap) for c, _ in groups)
            if all(allowed):
                out.append((cap, allowed))
        cache[key] = (out, list(groups))  # keep the LayerCosts alive: the key uses their ids
    return cache[key][0]


def _merged_frontier(groups: list[tuple[LayerCost, int]], allowed: tuple[tuple[str, ...], ...],
                     cache: dict) -> tuple[Frontier, list[float]]:
    """The groups' merged frontier and its bytes (ascending, for bisection)."""
    key = (tuple((id(c), n) for c, n in groups), allowed)
    if key not in cache and len(groups) == 1:   # one group: its frontier, indexed as a merged one
        (c, n), ok = groups[0], allowed[0]
        pts = _group_points(c, n, ok, cache)
        cache[key] = (pts.merged, c, [0.0 + a for a in pts.acts])
    if key not in cache:
        front: Frontier = [(0.0, 0.0, ())]
        for (c, n), ok in zip(groups, allowed):
            merged = [(a0 + a1, t0 + t1, cnt0 + (cnt1,))
                      for a0, t0, cnt0 in front for a1, t1, cnt1 in _group_frontier(c, n, ok, cache)]
            # one group: its frontier is already Pareto (bytes strictly up, time strictly down), so
            # ``_pareto`` would keep every point in the same order
            front = merged if len(groups) == 1 else _pareto(merged)
        cache[key] = (front, list(groups), [p[0] for p in front])  # keep the LayerCosts alive: the key uses their ids
    hit = cache[key]
    return hit[0], hit[2]


def _group_frontier(c: LayerCost, n: int, allowed: tuple[str, ...], cache: dict) -> Frontier:
    """Pareto frontier over every split of ``n`` identical layers among the allowed modes."""
    return _group_points(c, n, allowed, cache).as_list()


def _group_points(c: LayerCost, n: int, allowed: tuple[str, ...], cache: dict) -> frontier.Points:
    key = ("group", id(c), n, allowed)
    if key not in cache:
        acts, dts = tuple(c.act_bytes[k] for k in allowed), tuple(extra_time(c, k) for k in allowed)
        cache[key] = (frontier.points(n, acts, dts), c)   # built incrementally in n, by value
    return cache[key][0]


def _pareto(points: Frontier) -> Frontier:
    """Points not beaten on both bytes and time, bytes ascending, time strictly descending."""
    out: Frontier = []
    for p in sorted(points, key=lambda q: (q[0], q[1])):
        if not out or p[1] < out[-1][1]:
            out.append(p)
    return out


def assign(layers_by_group: list[list[int]], choice: RecomputeChoice) -> dict[int, str]:
    """Layer index -> mode: within a group the first layers take the most aggressive mode
    (any order costs the same; this one is deterministic)."""
    order = sorted(range(len(choice.modes)), key=lambda k: -RECOMPUTE_MODES.index(choice.modes[k]))
    out = {}
    for layers, counts in zip(layers_by_group, choice.counts):
        it = iter(layers)
        for k in order:
            for _ in range(counts[k]):
                out[next(it)] = choice.modes[k]
    return out


def cannot_fit(groups: list[tuple[LayerCost, int]], modes: tuple[str, ...], in_flight: float, budget: float,
               workspace, cache: dict | None = None) -> bool:
    """True only where ``recompute.choose`` returns None: no plain fit, and for every cap on the
    largest working set even the least activations the allowed modes leave, plus that cap's
    workspace, exceed ``budget``. A rank that cannot fit is then refused without building the
    recompute frontiers (every split of n layers over four modes: O(n^3) points). ``cache``: keeps
    the sums, which depend on the groups and modes only, across calls."""
    plain, least = _fit_sums(groups, modes) if cache is None else _cached_fit_sums(groups, modes, cache)
    if plain is not None and in_flight * plain <= budget:
        return False
    return all(in_flight * acts + workspace(cap) > budget for cap, acts in least)


def _fit_sums(groups: list[tuple[LayerCost, int]], modes: tuple[str, ...]) -> tuple[float | None, list]:
    """(activations without recompute, or None when ``none`` is not allowed; for each work cap under
    which every group keeps a mode, ascending: (cap, the least activations those modes leave))."""
    plain = sum(c.act_bytes["none"] * n for c, n in groups) if "none" in modes else None
    least = []
    for cap in sorted({c.work_bytes[k] for c, n in groups if n for k in modes}):
        allowed = [[k for k in modes if c.work_bytes[k] <= cap] for c, _ in groups]
        if all(allowed):
            least.append((cap, sum(n * min(c.act_bytes[k] for k in ok) for (c, n), ok in zip(groups, allowed))))
    return plain, least


def _cached_fit_sums(groups: list[tuple[LayerCost, int]], modes: tuple[str, ...], cache: dict):
    key = ("fit_sums", tuple((id(c), n) for c, n in groups), modes)
    if key not in cache:
        cache[key] = (_fit_sums(groups, modes), list(groups))   # the groups kept alive: the key holds their ids
    return cache[key][0]


# ----- what a stack's config places on the layers (techniques.recompute.LAYOUTS) ------------------------------
def rank_chunks(stages: list[tuple[int, int]], pp: int, schedule: str) -> list[list[range]]:
    """Per pipeline rank, the layers of each of its stages (virtual stages in model order, ``stages``), in the
    order the rank builds them (ascending)."""
    return [[range(a, b) for i, (a, b) in enumerate(stages) if stage_rank(i, pp, schedule) == r] for r in range(pp)]


def first_n(stages: list[tuple[int, int]], n: int) -> list[str]:
    """Megatron ``--recompute-method block --recompute-num-layers n`` (llm-foundry ``first-n``, one stage): the
    first ``n`` layers of every stage fully recomputed, the rest not."""
    return [("full" if i - a < n else "none") for a, b in stages for i in range(a, b)]


def every_nth(chunks: list[list[range]], n: int, layers: int) -> list[str]:
    """torchtitan ``selective_ac_option = n``: one counter over the blocks a rank builds, a block checkpointed
    whole when the count is a multiple of ``n`` (``_apply_layer_sac``), the others not."""
    out = ["none"] * layers
    for ranks in chunks:
        for k, i in enumerate((i for ch in ranks for i in ch), 1):
            out[i] = "full" if k % n == 0 else "none"
    return out


def _least_n(sizes: list[int], need: int) -> int:
    """The fewest first layers per stage (``first_n``) that recompute at least ``need`` of stages ``sizes``."""
    return next(n for n in range(max(sizes, default=0) + 1) if sum(min(n, c) for c in sizes) >= need)


def stack_layouts(mix: str, layer_recompute: list[str], stages: list[tuple[int, int]], pp: int,
                  schedule: str) -> list[list[str]]:
    """The per-layer recompute a stack's config runs nearest to a partition's ``layer_recompute`` of modes none /
    full (``mix``: ``techniques.recompute.Layout``): itself where any mix (``per_layer``) or one mode (``uniform``)
    runs; else the layouts of the least N that recomputes at least as many layers on every rank (``every_nth``)
    or on every rank and on every stage (``first_n``: two N where they differ). Recomputing more never needs more
    activation memory; the caller prices each (``CostModel.estimate``) and keeps the best that fits."""
    if mix in ("per_layer", "uniform"):
        return [list(layer_recompute)]
    return [mix_layout(mix, n, stages, pp, schedule, len(layer_recompute))
            for n in _stack_ns(mix, layer_recompute, stages, pp, schedule)]


def denser_layouts(mix: str, layer_recompute: list[str], stages: list[tuple[int, int]], pp: int,
                   schedule: str) -> list[list[str]]:
    """The layouts of ``mix`` that recompute more than every one of ``stack_layouts``, least recompute first
    (``first_n``: each N above its largest up to the longest stage; ``every_nth``: each n below its smallest down
    to 1; none for ``per_layer`` / ``uniform``). The partition prices its recompute on the layers it picks; the
    stack's N puts it on others (Megatron's first N of a stage leaves the last layers plain, in DeepSeek-V3 the MoE
    ones, whose activations are larger), so where none of ``stack_layouts`` fits the caller looks here."""
    if mix in ("per_layer", "uniform"):
        return []
    ns = _stack_ns(mix, layer_recompute, stages, pp, schedule)
    if mix == "first_n":
        more = range(max(ns) + 1, max(b - a for a, b in stages) + 1)
    else:   # an n above a rank's block count checkpoints nothing there
        most = max(sum(map(len, ranks)) for ranks in rank_chunks(stages, pp, schedule))
        more = range(min(min(ns) - 1, most), 0, -1)
    return [mix_layout(mix, n, stages, pp, schedule, len(layer_recompute)) for n in more]


def mix_layout(mix: str, n: int, stages: list[tuple[int, int]], pp: int, schedule: str, layers: int) -> list[str]:
    """The per-layer recompute of ``first_n`` / ``every_nth`` with this N (``every_nth`` with ``n > layers``: none)."""
    return first_n(stages, n) if mix == "first_n" else every_nth(rank_chunks(stages, pp, schedule), n, layers)


def _stack_ns(mix: str, layer_recompute: list[str], stages: list[tuple[int, int]], pp: int,
              schedule: str) -> list[int]:
    """The N of ``stack_layouts``' layouts of a ``first_n`` / ``every_nth`` mix (``len + 1``: every_nth of none)."""
    chunks = rank_chunks(stages, pp, schedule)
    done = [[sum(layer_recompute[i] != "none" for i in ch) for ch in ranks] for ranks in chunks]
    if mix == "first_n":
        by_rank = max(_least_n([len(ch) for ch in ranks], sum(d)) for ranks, d in zip(chunks, done))
        return sorted({by_rank, max(c for d in done for c in d)})
    ratios = [sum(map(len, ranks)) // sum(d) for ranks, d in zip(chunks, done) if sum(d)]
    return [min(ratios) if ratios else len(layer_recompute) + 1]


def stack_setting(layouts, layer_recompute: list[str], stages: list[tuple[int, int]], pp: int,
                  schedule: str) -> str | None:
    """The configuration of the stack whose ``layouts`` (``techniques.recompute.LAYOUTS``) runs ``layer_recompute``
    on these stages ("" where it recomputes nothing); None where none of them expresses it."""
    if set(layer_recompute) == {"none"}:
        return ""
    chunks = rank_chunks(stages, pp, schedule)
    for lay in layouts:
        if not set(layer_recompute) <= set(lay.modes):
            continue
        if lay.mix == "per_layer" or (lay.mix == "uniform" and len(set(layer_recompute)) == 1):
            return lay.setting
        if lay.mix == "first_n":
            n = max(sum(layer_recompute[i] == "full" for i in range(a, b)) for a, b in stages)
            if layer_recompute == first_n(stages, n):
                return lay.setting.format(n=n)
        if lay.mix == "every_nth":
            n = next(k for ranks in chunks for k, i in enumerate((i for ch in ranks for i in ch), 1)
                     if layer_recompute[i] == "full")
            if layer_recompute == every_nth(chunks, n, len(layer_recompute)):
                return lay.setting.format(n=n)
    return None
