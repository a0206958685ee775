"""Typed results of the cost model (``CostModel.estimate`` and its public per-rank terms):
``Estimate`` for one strategy, ``RankReport`` per pipeline rank, ``RankMemory`` from
``CostModel.rank_memory``. Kept apart from ``estimate.py`` so the model stays under 500 lines."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

from autopar.core.strategy import Strategy


class RankMemory(NamedTuple):
    """``CostModel.rank_memory``: device bytes by kind, bytes offloaded to host memory, and both
    at their joint peak (``memory.pooled_peak_bytes``: one memory, as on CPU ranks)."""
    memory: dict[str, float]
    host_bytes: float
    pooled_bytes: float


@dataclass
class RankReport:
    rank: int
    layers: list[int]
    fwd_s: float
    bwd_s: float
    recompute_s: float
    comm_s: dict[str, float]
    memory: dict[str, float]
    in_flight: float
    host_bytes: float = 0.0   # optimizer states offloaded to host memory (ZeRO-Offload)
    pooled_bytes: float = 0.0  # device + host at their joint peak (memory.pooled_peak_bytes)
    host_floor_s: float = 0.0  # per micro-batch: what the eager host floor adds to fwd_s + bwd_s (host_bound)

    @property
    def mem_bytes(self) -> float:
        return sum(self.memory.values())


@dataclass
class Estimate:
    strategy: Strategy
    step_time_s: float
    time: dict[str, float]
    ranks: list[RankReport]
    peak_bytes: float
    capacity_bytes: float
    usable_bytes: float
    model_flops: float        # per iteration, no recompute (MFU basis)
    hardware_flops: float     # per iteration, Megatron eq. 3 basis (+ recomputed forward when full)
    world: int
    peak_flops: float
    tokens: int
    sources: dict[str, str] = field(default_factory=dict)
    allocator_reserve_fraction: float = 0.0  # the stack's caching-allocator reserve (GpuProfile.reserve_fraction)
    host_usable_bytes: float | None = None   # host DRAM per GPU offloaded states may hold (None: unchecked)

    @property
    def reserved_peak_bytes(self) -> float:
        """What ``torch.cuda.max_memory_reserved`` reports: the worst rank's live-tensor peak plus
        the caching allocator's reserve beyond it (fragmentation, cached blocks), a fraction fitted
        per GPU and stack; the CUDA context and NCCL's own buffers (``framework_overhead``) are
        outside the allocator and not in it."""
        return (self.peak_bytes - self.memory_overhead) * (1.0 + self.allocator_reserve_fraction)

    @property
    def host_peak_bytes(self) -> float:
        """Offloaded states one GPU keeps in host memory (the most loaded pipeline rank)."""
        return max((r.host_bytes for r in self.ranks), default=0.0)

    @property
    def pooled_peak_bytes(self) -> float:
        """Device and host bytes together at their joint peak, worst rank: what a rank holds when
        both are one memory (CPU ranks; ``memory.pooled_peak_bytes``), not the sum of the two peaks."""
        return max((r.pooled_bytes or r.mem_bytes + r.host_bytes for r in self.ranks), default=0.0)

    @property
    def fits_host(self) -> bool:
        return self.host_usable_bytes is None or self.host_peak_bytes <= self.host_usable_bytes

    @property
    def feasible(self) -> bool:
        """Device memory fits, and what is offloaded fits the GPU's share of host memory."""
        return self.peak_bytes - self.memory_overhead <= self.usable_bytes and self.fits_host

    @property
    def memory_overhead(self) -> float:
        return self.worst_rank.memory.get("framework_overhead", 0.0)

    @property
    def worst_rank(self) -> RankReport:
        return max(self.ranks, key=lambda r: r.mem_bytes)

    @property
    def host_floor_s(self) -> float:
        """Seconds of the step the eager host-bound floor adds (``host_bound.layer_floor``, summed from
        ``LayerCost.host_floor_s``): the rank the time breakdown reads (the most work per micro-batch), its
        addition times the micro-batches; at least what the step gains, the pipeline bubble grows with it."""
        slow = max(self.ranks, key=lambda r: r.fwd_s + r.bwd_s)
        return slow.host_floor_s * self.strategy.num_micro_batches

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.step_time_s

    @property
    def tflops_per_gpu(self) -> float:
        return self.hardware_flops / self.step_time_s / self.world / 1e12

    @property
    def mfu(self) -> float:
        return self.model_flops / self.step_time_s / self.world / self.peak_flops


def time_breakdown(ranks: list[RankReport], pipe, dp_exposed: float, opt: float, m: int) -> dict[str, float]:
    """The step's time by component over ``m`` micro-batches, read from the slowest rank (``CostModel.estimate``)."""
    slow = max(ranks, key=lambda r: r.fwd_s + r.bwd_s)
    comm_total = sum(slow.comm_s.values())
    # busy_s below the slowest rank's work: shared CPU cores absorbed part of it (_shared_cores)
    absorbed = max(0.0, (slow.fwd_s + slow.bwd_s) * m - pipe.busy_s) if pipe.busy_s else 0.0
    compute = (slow.fwd_s + slow.bwd_s - slow.recompute_s - comm_total) * m - absorbed
    out = {"compute": compute, "recompute": slow.recompute_s * m}
    for k, v in slow.comm_s.items():
        out[f"{k}_comm"] = v * m
    out.update({"pp_comm": pipe.p2p_s, "bubble": pipe.bubble_s, "dp_comm": dp_exposed, "optimizer": opt})
    return out
