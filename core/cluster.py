"""``ClusterSpec``: which GPUs, how many, and how they are linked.

Link classes follow the hierarchy a collective crosses: ``intra_node`` (NVLink /
NVSwitch, or shared memory for CPU ranks) and ``inter_node`` (InfiniBand / Ethernet,
per GPU). A measured node-pair bandwidth matrix (GB/s, per GPU) may override the
inter-node class for clusters with uneven NICs: a group then runs at the slowest
pair it spans.

``node_groups`` describe a heterogeneous or partly degraded cluster (2 nodes of H100 beside 2
of A100, nodes with half their NICs working): ``cost_models.hetero`` prices them and
``planner.hetero`` keeps each pipeline stage on one kind of node.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, model_validator


class LinkClass(BaseModel):
    # defer_build: validated as parts of ClusterSpec (as core.gpu.EffCurve)
    model_config = ConfigDict(extra="forbid", defer_build=True)

    bw_gbps: float = Field(..., gt=0, description="bus bandwidth per GPU in GB/s (bytes, not bits)")
    latency_s: float = Field(..., ge=0, description="per-message latency (alpha) in seconds")
    allreduce_bw_gbps: float | None = Field(
        None, gt=0, description="all-reduce bus bandwidth when it differs from bw_gbps (NVLink SHARP / NVLS "
        "on NVSwitch systems reduces in the switch); None = bw_gbps")
    source: str = ""


class NodeGroup(BaseModel):
    """Nodes of one kind in a heterogeneous or partly degraded cluster: their GPU type, and the
    links they have when these differ from the cluster's (``nic_fraction``: the share of the
    inter-node NICs that work, e.g. 0.5 for 4 of 8)."""

    model_config = ConfigDict(extra="forbid", defer_build=True)

    name: str = ""
    gpu: str = Field(..., description="hardware profile of these nodes' GPUs")
    nodes: int = Field(..., ge=1)
    intra_node: LinkClass | None = Field(None, description="None: the cluster's intra_node")
    inter_node: LinkClass | None = Field(None, description="None: the cluster's inter_node")
    nic_fraction: float = Field(1.0, gt=0, le=1, description="working share of the inter-node NICs")


class ClusterSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = "cluster"
    description: str = ""
    gpu: str = Field(..., description="hardware profile name, e.g. h100-sxm, a100-80g, cpu")
    nodes: int = Field(1, ge=1)
    gpus_per_node: int = Field(8, ge=1)
    intra_node: LinkClass
    inter_node: LinkClass
    node_pair_bw_gbps: list[list[float]] | None = Field(
        None, description="optional measured per-GPU bandwidth between node pairs (nodes x nodes, GB/s)")
    node_groups: list[NodeGroup] | None = Field(
        None, description="heterogeneous cluster: groups of nodes in rank order (GPU type, links); their nodes "
        "add up to `nodes` (omitted, 0 or a preset's 1: taken from the groups) and `gpu` is the first group's")

    @model_validator(mode="before")
    @classmethod
    def _from_groups(cls, data):
        """With node groups, ``nodes`` and ``gpu`` default to the groups' total and first GPU."""
        if isinstance(data, dict) and data.get("node_groups"):
            groups = data["node_groups"]
            total = sum(int(g.get("nodes", 0)) if isinstance(g, dict) else g.nodes for g in groups)
            nodes = data.get("nodes")  # 1 is a preset's default: the groups say how many there are
            data = {**data, "nodes": total if nodes in (None, 0, 1) else nodes}
            first = groups[0]
            data.setdefault("gpu", first.get("gpu") if isinstance(first, dict) else first.gpu)
        return data

    @model_validator(mode="after")
    def _check_matrix(self) -> "ClusterSpec":
        m = self.node_pair_bw_gbps
        if m is not None:
            if len(m) != self.nodes or any(len(row) != self.nodes for row in m):
                raise ValueError(f"node_pair_bw_gbps must be {self.nodes}x{self.nodes} (one row per node)")
            if any(v <= 0 for row in m for v in row):
                raise ValueError("node_pair_bw_gbps entries must be positive GB/s")
        if self.node_groups and sum(g.nodes for g in self.node_groups) != self.nodes:
            raise ValueError(f"node_groups hold {sum(g.nodes for g in self.node_groups)} nodes but nodes="
                             f"{self.nodes}; make them agree (or leave nodes out)")
        return self

    @property
    def heterogeneous(self) -> bool:
        """More than one kind of node (GPU type or links)."""
        g = self.node_groups or []
        return len(g) > 1 or any(x.nic_fraction < 1 or x.inter_node or x.intra_node for x in g)

    @property
    def world(self) -> int:
        return self.nodes * self.gpus_per_node

    def short(self) -> str:
        return f"{self.nodes} x {self.gpus_per_node} {self.gpu}"
