"""``ClusterSpec``: which GPUs, how many, and how they are linked.

Link classes follow the hierarchy a collective crosses: ``intra_node`` (NVLink /
NVSwitch, or shared memory for CPU ranks) and ``inter_node`` (InfiniBand / Ethernet,
per GPU). A measured node-pair bandwidth matrix (GB/s, per GPU) may override the
inter-node class for clusters with uneven NICs: a group then runs at the slowest
pair it spans.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, model_validator


class LinkClass(BaseModel):
    model_config = ConfigDict(extra="forbid")

    bw_gbps: float = Field(..., gt=0, description="bus bandwidth per GPU in GB/s (bytes, not bits)")
    latency_s: float = Field(..., ge=0, description="per-message latency (alpha) in seconds")
    allreduce_bw_gbps: float | None = Field(
        None, gt=0, description="all-reduce bus bandwidth when it differs from bw_gbps (NVLink SHARP / NVLS "
        "on NVSwitch systems reduces in the switch); None = bw_gbps")
    source: str = ""


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

    @model_validator(mode="after")
    def _check_matrix(self) -> "ClusterSpec":
        m = self.node_pair_bw_gbps
        if m is not None:
            if len(m) != self.nodes or any(len(row) != self.nodes for row in m):
                raise ValueError(f"node_pair_bw_gbps must be {self.nodes}x{self.nodes} (one row per node)")
            if any(v <= 0 for row in m for v in row):
                raise ValueError("node_pair_bw_gbps entries must be positive GB/s")
        return self

    @property
    def world(self) -> int:
        return self.nodes * self.gpus_per_node

    def short(self) -> str:
        return f"{self.nodes} x {self.gpus_per_node} {self.gpu}"
