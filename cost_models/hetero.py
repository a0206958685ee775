"""Pricing on heterogeneous clusters (``ClusterSpec.node_groups``): each group's own cost model.

A group runs its compute at its own GPU type (its profile's peaks and efficiency curves) and
its intra-node collectives on its own NVLink; every collective that leaves a node is priced at
the slowest inter-node link of the whole cluster (a ring or tree that spans groups moves at its
slowest member; ``nic_fraction`` scales a group's link for failed NICs). A pipeline stage lives
on one group, so a stage is priced with that group's model and the pipeline is replayed with
the per-stage times (``pipeline.simulate``); the terms outside the pipeline (gradient
synchronisation, optimizer step) are taken from the slowest group.
"""

from __future__ import annotations

from dataclasses import dataclass

from autopar.core.cluster import ClusterSpec, LinkClass, NodeGroup
from autopar.core.strategy import Strategy
from autopar.cost_models.estimate import CostModel, Estimate
from autopar.cost_models.layer_cost import same_program
from autopar.cost_models.pipeline import simulate
from autopar.errors import InputError
from autopar.profiles.hw import load_gpu_profile


def group_inter_link(cl: ClusterSpec, g: NodeGroup) -> LinkClass:
    """A group's inter-node link with its working share of NICs (bandwidth scales, latency not)."""
    link = g.inter_node or cl.inter_node
    return link.model_copy(update={"bw_gbps": link.bw_gbps * g.nic_fraction})


def slowest_inter_link(cl: ClusterSpec) -> LinkClass:
    """The link any collective spanning groups runs at: the lowest bandwidth, highest latency."""
    links = [group_inter_link(cl, g) for g in cl.node_groups or []] or [cl.inter_node]
    return LinkClass(bw_gbps=min(x.bw_gbps for x in links), latency_s=max(x.latency_s for x in links),
                     source="slowest node group's inter-node link")


def group_cluster(cl: ClusterSpec, g: NodeGroup) -> ClusterSpec:
    """The whole cluster as if every node were of this group's kind, with the slowest inter-node
    link: what one group's stages are priced on (their dp/tp collectives keep the real sizes)."""
    return cl.model_copy(update={"gpu": g.gpu, "intra_node": g.intra_node or cl.intra_node,
                                 "inter_node": slowest_inter_link(cl), "node_groups": None,
                                 "node_pair_bw_gbps": None})


def group_models(cm: CostModel) -> list[CostModel]:
    """One cost model per node group (same model, templates, sequence and dtype)."""
    out = []
    for g in cm.cluster.node_groups or []:
        gpu = load_gpu_profile(g.gpu)
        dtype = cm.dtype if cm.dtype == "fp32" or cm.dtype in gpu.peak_tflops else None
        if dtype is None:
            raise InputError(f"cluster: node group {g.name or g.gpu} has no {cm.dtype} peak; plan with --dtype fp32")
        group = CostModel(cm.spec, group_cluster(cm.cluster, g), cm.seq_len, cm.templates, gpu, dtype,
                          comm_fits=cm.ctx.fits, moe_load=cm.moe_load, runtime=cm.stack_name)
        same_program(group.ctx, cm.ctx)
        out.append(group)
    return out


@dataclass
class HeteroEstimate:
    """One strategy on a heterogeneous cluster: the pipeline replayed with each stage's own times."""

    strategy: Strategy
    stages: list[tuple[int, int]]
    stage_group: list[int]          # node group of each pipeline stage
    step_time_s: float
    pipeline_s: float
    outside_pipeline_s: float       # gradient sync / optimizer beyond the pipeline, slowest group
    stage_fwd_s: list[float]
    stage_bwd_s: list[float]
    stage_mem_bytes: list[float]
    stage_usable_bytes: list[float]
    per_group: list[Estimate]       # each group's model pricing the whole layout (its own stages used)

    @property
    def feasible(self) -> bool:
        return all(m <= u for m, u in zip(self.stage_mem_bytes, self.stage_usable_bytes))


def estimate(models: list[CostModel], s: Strategy, stages: list[tuple[int, int]], stage_group: list[int],
             recompute: list[str] | None = None) -> HeteroEstimate:
    """Price ``s`` with stage ``j`` (layers ``stages[j]``) on node group ``stage_group[j]``."""
    per = [cm.estimate(s, stages, recompute) for cm in models]
    f = [per[g].ranks[j].fwd_s for j, g in enumerate(stage_group)]
    b = [per[g].ranks[j].bwd_s for j, g in enumerate(stage_group)]
    p2p = max(cm.p2p_time(s) for cm in models)
    pipe = simulate(f, b, s.num_micro_batches, s.schedule, s.vpp, p2p).step_time_s
    outside = max(e.step_time_s - simulate([r.fwd_s for r in e.ranks], [r.bwd_s for r in e.ranks],
                                           s.num_micro_batches, s.schedule, s.vpp, p2p).step_time_s for e in per)
    mem = [per[g].ranks[j].mem_bytes - per[g].ranks[j].memory.get("framework_overhead", 0.0)
           for j, g in enumerate(stage_group)]
    usable = [per[g].usable_bytes for g in stage_group]
    return HeteroEstimate(s, stages, stage_group, pipe + max(outside, 0.0), pipe, max(outside, 0.0), f, b, mem,
                          usable, per)
