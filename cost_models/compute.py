"""Compute time of one op on one GPU: a roofline with shape-dependent efficiency.

``time = max(flops / (peak · eff_kind(size)), bytes / (bw · eff_mem(bytes)))``
(Williams, Waterman & Patterson 2009, "Roofline"). The efficiency curves come from the
hardware profile (``profiles/hardware/*.yaml``) or, with ``--profile``, from curves
fitted to measurements on the local device; an exact op-signature hit in a measured
profile replaces the formula altogether (see ``OpTimer``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from autopar.core.gpu import GpuProfile
from autopar.core.op_signature import op_signature, signature  # noqa: F401  (re-exported)

PRECISION = {"bf16": "bf16", "fp16": "fp16", "fp8": "fp8", "fp32": "fp32"}


def roofline_time(flops: float, bytes_rw: float, peak_flops: float, flop_eff: float,
                  mem_bw: float, mem_eff: float) -> float:
    """Roofline (Williams et al. 2009): the slower of the compute and memory bounds."""
    t_compute = flops / (peak_flops * flop_eff) if flops > 0 else 0.0
    t_memory = bytes_rw / (mem_bw * mem_eff) if bytes_rw > 0 else 0.0
    return max(t_compute, t_memory)


@dataclass
class OpTimer:
    """Prices ops on one device: measured table first, then fitted or datasheet curves.

    ``measured`` maps an op signature (``signature(kind, dims, dtype)`` for one GEMM call,
    ``op_signature(...)`` for a whole op of the captured graph) to seconds for forward and
    backward; ``source`` names where the curves come from ("datasheet" for a vendor profile,
    "fit" for curves fitted by ``autopar profile``). A measured profile (one with
    ``measured_ops``) fills both by itself, so ``--gpu cpu`` prices from its measurements.
    ``contention`` multiplies every time: ranks sharing CPU cores (see ``cpu_contention``).
    """

    gpu: GpuProfile
    dtype: str = "bf16"
    measured: dict[str, tuple[float, float]] = field(default_factory=dict)
    source: str = "datasheet"
    hits: dict[str, int] = field(default_factory=lambda: {"measurement": 0, "fit": 0, "datasheet": 0})
    contention: float = 1.0

    def __post_init__(self):
        prec = PRECISION.get(self.dtype, "bf16")
        self.peak = self.gpu.peak_flops(prec)
        self.bw = self.gpu.mem_bw_bytes_per_s
        if self.gpu.measured_ops or self.gpu.meta.get("measured"):
            self.source = "fit"  # the curves themselves were fitted to measurements
            if not self.measured:
                self.measured = {k: (v[0], v[1]) for k, v in self.gpu.measured_ops.items()}

    def exact(self, sig: str | None) -> tuple[float, float] | None:
        """Measured (forward, backward) seconds of a whole op at its captured shape, if profiled."""
        hit = self.measured.get(sig) if sig and self.measured else None
        if hit is None:
            return None
        self.hits["measurement"] += 1
        return hit[0] * self.contention, hit[1] * self.contention

    def gemm(self, m: float, n: float, k: float, calls: float = 1.0) -> float:
        """Forward time of ``calls`` GEMMs of [m,k] x [k,n] (2mnk FLOPs each)."""
        return self.gemm_fb(m, n, k, calls, 0.0)[0]

    def gemm_fb(self, m: float, n: float, k: float, calls: float, bwd_ratio: float) -> tuple[float, float]:
        """(forward, backward) of ``calls`` GEMMs: a measured call gives both; the curves give
        the forward and backward = forward x ``bwd_ratio`` (the FLOP ratio)."""
        flops = 2.0 * m * n * k
        if flops <= 0:
            return 0.0, 0.0
        hit = self._lookup("gemm", (round(m), round(n), round(k)))
        if hit is not None:
            return hit[0] * calls * self.contention, hit[1] * calls * self.contention
        self.hits[self.source] += 1
        eff = self.gpu.eff("matmul_eff", flops)
        byts = self._dsize() * (m * k + k * n + m * n)
        t = calls * roofline_time(flops, byts, self.peak, eff, self.bw, self.gpu.eff("membound_eff", byts))
        return t * self.contention, t * self.contention * bwd_ratio

    def attention(self, flops: float, bytes_rw: float) -> float:
        """Fused attention kernel time (FlashAttention-style), one call of ``flops``."""
        if flops <= 0:
            return 0.0
        self.hits[self.source] += 1
        eff = self.gpu.eff("attention_eff", flops)
        t = roofline_time(flops, bytes_rw, self.peak, eff, self.bw, self.gpu.eff("membound_eff", max(bytes_rw, 1)))
        return t * self.contention

    def membound(self, bytes_rw: float, flops: float = 0.0) -> float:
        """Elementwise / reduction op bounded by memory bandwidth."""
        if bytes_rw <= 0:
            return 0.0
        self.hits[self.source] += 1
        eff = self.gpu.eff("membound_eff", bytes_rw)
        return roofline_time(flops, bytes_rw, self.peak, 1.0, self.bw, eff) * self.contention

    def _dsize(self) -> int:
        return 4 if self.dtype == "fp32" else 2

    def _lookup(self, kind: str, dims: tuple) -> tuple[float, float] | None:
        if not self.measured:
            return None
        hit = self.measured.get(signature(kind, dims, self.dtype))
        if hit is not None:
            self.hits["measurement"] += 1
        return hit


def cpu_contention(gpu: GpuProfile, ranks_per_node: int) -> float:
    """Slowdown of every op when ranks share CPU cores: max(1, ranks * threads per rank / cores)
    (time slicing; measured on the 2-core build machine, see docs/profiling.md). 1 for GPUs."""
    if not gpu.cores:
        return 1.0
    return max(1.0, ranks_per_node * gpu.threads_per_rank / gpu.cores)
