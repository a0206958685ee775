"""Plans for heterogeneous clusters: every pipeline stage on one kind of node, layers split by speed.

Following Pipette / Holmes in spirit: the intra-stage strategy (tp, dp, cp, micro-batch, ZeRO,
recompute) is the same on every stage and is searched as usual on the slowest group's cost
model (``search``, with the pipeline depth fixed); the stages are then placed on the groups in
rank order (a group holds whole stages: its GPU count is a multiple of the stage size) and
the layers re-split so that faster GPUs take more of them (a linear-partition DP on each
group's per-layer prices, minimising the slowest stage); the result is priced by
``cost_models.hetero.estimate``. When no pipeline depth lets every group hold whole stages
(e.g. 3 nodes of one kind beside 2 of another with 8-GPU stages across 2 nodes), it says so.
"""

from __future__ import annotations

from dataclasses import dataclass

from autopar.core.strategy import Strategy
from autopar.cost_models import hetero
from autopar.cost_models.estimate import CostModel, even_stages
from autopar.errors import InputError
from autopar.planner.search import Constraints, search


@dataclass
class HeteroPlan:
    best: hetero.HeteroEstimate
    even: hetero.HeteroEstimate      # the same strategy with the layers split evenly (what speed-blind gives)
    tried: list[tuple[int, float | None]]   # (pp, step time or None when nothing fitted)
    slow_group: int


def stage_layouts(group_gpus: list[int], layers: int) -> list[tuple[int, list[int]]]:
    """(pp, node group of each stage) for every pipeline depth whose stages fit whole in the groups."""
    world = sum(group_gpus)
    out = []
    for pp in range(len(group_gpus), min(layers, world) + 1):
        stage = world // pp
        if world % pp == 0 and all(g % stage == 0 for g in group_gpus):
            out.append((pp, [i for i, g in enumerate(group_gpus) for _ in range(g // stage)]))
    return out


def split_by_speed(times: list[list[float]], edges: list[tuple[float, float]], stage_group: list[int]
                   ) -> list[tuple[int, int]]:
    """Contiguous layer ranges, one per stage, minimising the slowest stage: ``times[g][i]`` is
    layer i on group g, ``edges[g]`` the (embedding, output) time there (first / last stage)."""
    n, p = len(times[0]), len(stage_group)
    pre = [[0.0] * (n + 1) for _ in times]
    for g, t in enumerate(times):
        for i, x in enumerate(t):
            pre[g][i + 1] = pre[g][i] + x
    inf = float("inf")
    best = [[inf] * (n + 1) for _ in range(p + 1)]   # best[j][i]: first j stages hold layers [0, i)
    cut = [[0] * (n + 1) for _ in range(p + 1)]
    best[0][0] = 0.0
    for j in range(1, p + 1):
        g = stage_group[j - 1]
        for i in range(j, n - (p - j) + 1):
            for k in range(j - 1, i):
                t = pre[g][i] - pre[g][k] + (edges[g][0] if j == 1 else 0.0) + (edges[g][1] if j == p else 0.0)
                v = max(best[j - 1][k], t)
                if v < best[j][i]:
                    best[j][i], cut[j][i] = v, k
    stages, i = [], n
    for j in range(p, 0, -1):
        stages.append((cut[j][i], i))
        i = cut[j][i]
    return stages[::-1]


def _layer_times(cm: CostModel, s: Strategy, recompute: list[str]) -> tuple[list[float], tuple[float, float]]:
    costs = cm.layer_costs(s)
    edge = tuple(costs[k].time("none") if costs[k] else 0.0 for k in ("embedding", "output"))
    return [costs[i].time(recompute[i]) for i in range(cm.num_layers)], edge


def _slowest(models: list[CostModel]) -> int:
    """The group whose GPU has the lowest peak for the dtype (ties: the slower inter-node link)."""
    return min(range(len(models)), key=lambda g: (models[g].gpu.peak_flops(models[g].dtype), g))


def plan(cm: CostModel, gb: int, cons: Constraints) -> HeteroPlan:
    cl = cm.cluster
    models = hetero.group_models(cm)
    group_gpus = [g.nodes * cl.gpus_per_node for g in cl.node_groups]
    layouts = stage_layouts(group_gpus, cm.num_layers)
    if not layouts:
        raise InputError(f"cluster: cannot keep each pipeline stage on one GPU type: node groups of "
                         f"{', '.join(map(str, group_gpus))} GPUs share no stage size that divides each group "
                         f"and gives at most {cm.num_layers} stages; make the groups' node counts share a factor")
    slow = _slowest(models)
    found, tried = [], []
    for pp, stage_group in layouts:
        fixed = {**cons.fixed, "pp": pp, "vpp": 1, "schedule": "1f1b"}
        res = search(models[slow], gb, Constraints(fixed=fixed, max_tp=cons.max_tp, max_cp=cons.max_cp,
                                                   max_mbs=cons.max_mbs, cross_node=cons.cross_node), top_k=1)
        if not res.candidates:
            tried.append((pp, None))
            continue
        c = res.candidates[0]
        s, rc = c.strategy, c.layer_recompute
        per = [_layer_times(m, s, rc) for m in models]
        stages = split_by_speed([t for t, _ in per], [e for _, e in per], stage_group)
        best = hetero.estimate(models, s, stages, stage_group, rc)
        even = hetero.estimate(models, s, even_stages(cm.num_layers, pp), stage_group, rc)
        pick = best if best.feasible and (best.step_time_s <= even.step_time_s or not even.feasible) else even
        tried.append((pp, pick.step_time_s if pick.feasible else None))
        if pick.feasible:
            found.append(HeteroPlan(pick, even, tried, slow))
    if not found:
        raise InputError(f"cluster: no plan keeps each pipeline stage on one GPU type and fits; tried pp = "
                         f"{', '.join(str(p) for p, _ in tried)}")
    out = min(found, key=lambda h: h.best.step_time_s)
    out.tried = tried
    return out
