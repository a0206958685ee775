"""The Plan the planner hands to codegen: one function for every caller (``plan``, ``validate``).

A plan records what the program needs (strategy, stages and their ranks, per-layer recompute,
expert placement) and what a re-pricing needs (model, cluster, seq_len, dtype, the software
stack priced, the global batch inside the strategy), with the predictions of the estimate.
"""

from __future__ import annotations

from autopar.core.plan import Plan, Provenance, StageSpec
from autopar.core.strategy import Strategy
from autopar.cost_models.estimate import CostModel, default_stages
from autopar.cost_models.report import estimate_dict
from autopar.planner.space import Candidate
from autopar.planner.stack_settings import stack_settings
from autopar.techniques.pipeline import stage_rank


def plan_from_candidate(cm: CostModel, cand: Candidate, provenance: Provenance | None = None,
                        expert_placement: list[list[list[int]]] | None = None) -> Plan:
    """A searched (or fixed) candidate as a Plan: resolved strategy, per-layer recompute, stages
    with the rank each runs on, predictions of its estimate."""
    s = cand.strategy
    e = cand.estimate or cm.estimate(s, cand.stages, cand.layer_recompute)
    return Plan(model=cm.spec, cluster=cm.cluster, seq_len=cm.seq_len, dtype=cm.dtype, runtime=cm.stack_name,
                compile=cm.ctx.compile, loss_parallel=cm.ctx.loss_parallel,
                moe_capacity_factor=cm.ctx.moe_capacity_factor, a2a_overlap=cm.ctx.a2a_overlap,
                cross_entropy=cm.ctx.cross_entropy, tp_comm_overlap=cm.ctx.tp_comm_overlap,
                strategy=s, layer_recompute=list(cand.layer_recompute), stages=_stage_specs(cm, cand, e),
                expert_placement=expert_placement, predictions=estimate_dict(e, cm),
                stack_settings=stack_settings(cm.stack_name, cand.layer_recompute, cand.stages, s, cm.spec),
                provenance=provenance or Provenance())


def plan_from_strategy(cm: CostModel, s: Strategy, command: str = "") -> Plan:
    """A plan for one resolved strategy as given: the stages ``estimate`` assumes (``default_stages``), the
    strategy's recompute on every layer, default expert placement."""
    stages = default_stages(cm.ctx.runtime, cm.num_layers, s.pp, s.vpp)
    modes = [s.recompute] * cm.num_layers
    e = cm.estimate(s, stages, modes)
    return plan_from_candidate(cm, Candidate(s, stages, modes, e.step_time_s, e), Provenance(command=command))


def _stage_specs(cm: CostModel, cand: Candidate, e) -> list[StageSpec]:
    s = cand.strategy
    ranks = {r.rank: r for r in e.ranks}
    costs = cm.layer_costs(s)
    out = []
    for j, (a, b) in enumerate(cand.stages):
        first, last = j == 0, j == len(cand.stages) - 1
        t = sum(costs[i].time(cand.layer_recompute[i]) for i in range(a, b))
        t += costs["embedding"].time("none") if first and costs["embedding"] else 0.0
        t += costs["output"].time("none") if last and costs["output"] else 0.0
        r = stage_rank(j, s.pp, s.schedule)
        out.append(StageSpec(index=j, rank=r, layer_start=a, layer_end=b, has_embedding=first, has_output=last,
                             predicted_time_s=t, predicted_mem_bytes=ranks[r].mem_bytes))
    return out
