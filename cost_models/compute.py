"""Compute time of one op on one GPU: a roofline with shape-dependent efficiency.

``time = max(flops / (peak · eff_kind(size)), bytes / (bw · eff_mem(bytes)))``
(Williams, Waterman & Patterson 2009, "Roofline"). The efficiency curves come from the
hardware profile (``profiles/hardware/*.yaml``) or, with ``--profile``, from curves
fitted to measurements on the local device; an exact op-signature hit in a measured
profile replaces the formula altogether (see ``OpTimer``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from autopar.core.gpu import AttentionKernel, GpuProfile, StackConstants
from autopar.core.op_signature import op_signature, signature  # noqa: F401  (re-exported)
from autopar.cost_models.attention_rate import head_dim_factor, keys_per_query_tile, knee_eff, stack_tile_factor
from autopar.cost_models.fp8_cost import Fp8Cast
from autopar.cost_models.fp8_cost import dynamic_cast_bytes as fp8_cast_bytes  # noqa: F401  (re-exported)

PRECISION = {"bf16": "bf16", "fp16": "fp16", "fp8": "fp8", "fp32": "fp32"}


def roofline_time(flops: float, bytes_rw: float, peak_flops: float, flop_eff: float,
                  mem_bw: float, mem_eff: float) -> float:
    """Roofline (Williams et al. 2009): the slower of the compute and memory bounds."""
    t_compute = flops / (peak_flops * flop_eff) if flops > 0 else 0.0
    t_memory = bytes_rw / (mem_bw * mem_eff) if bytes_rw > 0 else 0.0
    return max(t_compute, t_memory)


def _triangle_blocks(n: int) -> int:
    """Score blocks at or below the diagonal of an n x n block grid (causal mask)."""
    return n * (n + 1) // 2


def _window_blocks(n: int, w: int) -> int:
    """Score blocks of an n x n causal grid that a window of ``w`` blocks back reaches: query
    block r computes key blocks max(0, r - w) .. r."""
    if n <= w + 1:
        return _triangle_blocks(n)
    return _triangle_blocks(w + 1) + (n - w - 1) * (w + 1)


def causal_block_fraction(seq: int, cp: int = 1, window: int = 0, block: int = 128,
                          kernel_skips_window: bool = True) -> float:
    """Share of the s^2 score blocks (per context-parallel rank: of its s/cp x s) a causal
    FlashAttention kernel computes. FlashAttention-2 (Dao 2023) sections 3.1 and 4.1: blocks
    wholly above the diagonal are skipped, ``nb(nb+1)/2`` of ``nb^2`` blocks of ``block`` tokens
    (128 on Hopper / Ampere), the papers count causal FLOPs as half. Context parallel (Ring
    Attention, Liu et al. 2023; Megatron-Core CP, torchtitan): the sequence is cut in 2cp chunks
    and rank i holds chunks i and 2cp-1-i (load-balanced zig-zag), so each rank computes 2cp-1
    full chunk pairs and two causal diagonal chunks of its 4cp chunk pairs (all ranks equal).
    ``window`` (sliding-window layers, tokens): a kernel that skips out-of-window blocks (FA2
    ``window_size``, Megatron/TE, flex attention) computes the band; torch SDPA with a boolean
    mask (``kernel_skips_window=False``) computes every block (1.0)."""
    if window and not kernel_skips_window:
        return 1.0
    if cp <= 1:
        nb = -(-seq // block)
        done = _window_blocks(nb, -(-window // block)) if window and window < seq else _triangle_blocks(nb)
        return done / nb ** 2
    if window and window < seq:  # the band per rank: each rank holds an equal share of it
        return causal_block_fraction(seq, 1, window, block)
    nc = -(-seq // (2 * cp * block))  # blocks per chunk
    diag = _triangle_blocks(nc) / nc ** 2
    return (2 * cp - 1 + 2 * diag) / (4 * cp)


def measured_attention_eff(kernel: AttentionKernel, peak_tflops: float) -> list[tuple[int, float]]:
    """[(seq, efficiency)] of a measured kernel's forward + backward (``benchmarks/kernel_rates.py``) in the
    FLOPs it performs (``causal_block_fraction``: the diagonal's blocks computed whole) against
    ``peak_tflops``. The measurement counts the causal half, F = 2bhs^2d forward and 3.5F forward +
    backward (FlashAttention-2, Dao 2023: backward 2.5x the forward FLOPs), and the kernel performs 2·f·F
    of it (f the block fraction). The training step's pair is priced from the pair's rate: the
    forward-only figures (kept in the profile) vary more from point to point (flash at 4k runs its
    forward slower than its backward), and the step runs both."""
    return [(seq, 2 * causal_block_fraction(seq) * r_both / peak_tflops) for seq, _, r_both in kernel.measured]


def measured_kernel_points(kernel: AttentionKernel, peak_tflops: float) -> list[tuple[float, float]]:
    """[(keys a query tile reads, efficiency)] of a measured kernel (``measured_attention_eff``, its
    full-causal sequence lengths as ``attention_rate.keys_per_query_tile``): the points the knee is fitted to."""
    return [(keys_per_query_tile(seq, causal_block_fraction(seq)), e)
            for seq, e in measured_attention_eff(kernel, peak_tflops)]


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
    stack: StackConstants = field(default_factory=StackConstants)  # the runtime's fitted constants

    def __post_init__(self):
        prec = PRECISION.get(self.dtype, "bf16")
        # fp8 (Transformer Engine / torchao float8): only the GEMMs run at the fp8 peak; attention,
        # elementwise ops and the MFU basis stay at the bf16 peak
        self.peak = self.gpu.peak_flops("bf16" if prec == "fp8" else prec)
        self.gemm_peak = self.gpu.peak_flops(prec)
        self.bw = self.gpu.mem_bw_bytes_per_s
        if self.gpu.measured_ops or self.gpu.meta.get("measured"):
            self.source = "fit"  # the curves themselves were fitted to measurements
            if not self.measured:
                self.measured = {k: (v[0], v[1]) for k, v in self.gpu.measured_ops.items()}

    def in_dtype(self, dtype: str) -> OpTimer:
        """This timer pricing in ``dtype`` (same profile, measurements, stack and contention; the hit
        counts are shared)."""
        if dtype == self.dtype:
            return self
        return OpTimer(self.gpu, dtype, self.measured, self.source, self.hits, self.contention, self.stack)

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

    def gemm_fb(self, m: float, n: float, k: float, calls: float, bwd_ratio: float,
                cast: Fp8Cast | None = None) -> tuple[float, float]:
        """(forward, backward) of ``calls`` GEMMs: a measured call gives both; the curves give
        the forward and backward = forward x ``bwd_ratio`` (the FLOP ratio). Under fp8, ``cast``
        says how the runtime's library quantizes the operands (``fp8_cost``; None: torchao's)."""
        flops = 2.0 * m * n * k
        if flops <= 0:
            return 0.0, 0.0
        hit = self._lookup("gemm", (round(m), round(n), round(k)))
        if hit is not None:
            return hit[0] * calls * self.contention, hit[1] * calls * self.contention
        self.hits[self.source] += 1
        eff = stack_matmul_eff(self.gpu.eff("matmul_eff", self._curve_flops(flops)), self.stack, self.dtype)
        byts = self._dsize() * (m * k + k * n + m * n)
        t = calls * roofline_time(flops, byts, self.gemm_peak, eff, self.bw, self.gpu.eff("membound_eff", byts))
        if self.dtype != "fp8":
            return t * self.contention, t * self.contention * bwd_ratio
        t = max(t, calls * self._fp8_floor(flops, byts))
        cast_f, cast_b = (cast or Fp8Cast()).bytes(m, n, k)
        fwd = t + calls * self.membound(cast_f) / self.contention
        bwd = t * bwd_ratio + calls * self.membound(cast_b) / self.contention
        return fwd * self.contention, bwd * self.contention

    def grouped_gemm_fb(self, m: float, n: float, k: float, calls: float, bwd_ratio: float,
                        cast: Fp8Cast | None = None) -> tuple[float, float]:
        """(forward, backward) of ``calls`` [m,k] x [k,n] GEMMs run as one grouped kernel (MoE experts,
        ``moe_cost.grouped_expert_time``): one efficiency read at the group's FLOPs, every expert's
        operands in the memory term, the fp8 casts as one pass over all of them (TE's
        ``GroupedLinear`` runs one multi-tensor cast_transpose)."""
        flops = 2.0 * m * n * k * calls
        if flops <= 0:
            return 0.0, 0.0
        self.hits[self.source] += 1
        eff = stack_matmul_eff(self.gpu.eff("matmul_eff", self._curve_flops(flops)), self.stack, self.dtype)
        byts = self._dsize() * (m * k + k * n + m * n) * calls
        t = roofline_time(flops, byts, self.gemm_peak, eff, self.bw, self.gpu.eff("membound_eff", byts))
        if self.dtype != "fp8":
            return t * self.contention, t * self.contention * bwd_ratio
        t = max(t, self._fp8_floor(flops, byts))
        cast_f, cast_b = (cast or Fp8Cast()).bytes(m, n, k)
        fwd = t + self.membound(cast_f * calls) / self.contention
        bwd = t * bwd_ratio + self.membound(cast_b * calls) / self.contention
        return fwd * self.contention, bwd * self.contention

    def attention(self, flops: float, bytes_rw: float, performed: float = 1.0, head_dim: int = 0,
                  stack: str = "") -> float:
        """Fused attention kernel time (FlashAttention-style), one call of ``flops`` (full 4bhs^2d).
        ``performed``: the share of score blocks the kernel computes (``causal_block_fraction``);
        it applies where the profile quotes ``attention_eff`` in performed FLOPs, for the curve's
        x as for the work, so a measured ("full") profile prices as it was measured. ``head_dim``: the
        curve is quoted at 128; other head dims move by the profile's ``attention_head_dim_rate``
        (``attention_rate.head_dim_factor``; 0: none), and the ``stack``'s own tile padding beyond it
        (``attention_rate.stack_tile_factor``)."""
        if flops <= 0:
            return 0.0
        self.hits[self.source] += 1
        if self.gpu.attention_eff_counts == "performed":
            flops = flops * performed
        eff = min(1.0, self.gpu.eff("attention_eff", flops) * self.stack.attention_scale)
        eff *= head_dim_factor(head_dim, 128, self.gpu.attention_head_dim_rate)
        eff *= stack_tile_factor(head_dim, stack, self.gpu.attention_head_dim_rate)
        t = roofline_time(flops, bytes_rw, self.peak, eff, self.bw, self.gpu.eff("membound_eff", max(bytes_rw, 1)))
        return t * self.contention

    def attention_fb(self, flops: float, bytes_rw: float, performed: float, bwd_ratio: float,
                     runtime: str = "", seq: float = 0.0, cp: int = 1, head_dim: int = 0) -> tuple[float, float]:
        """(forward, backward) of one fused attention call of ``flops`` (full 4bhs^2d) at sequence length
        ``seq``: the runtime's kernel as measured on this GPU (``GpuProfile.attention_kernel``) on the blocks
        it performs, at the rate its measured points give for the keys a query tile reads
        (``attention_rate.knee_eff`` of ``measured_kernel_points``: a sliding-window layer's tiles read a
        few blocks, a full causal one about half the sequence) and for the model's ``head_dim``
        (``attention_rate.head_dim_factor``); otherwise ``attention`` x
        ``bwd_ratio`` (the profile's curve and the stack's fitted scale). Context parallel (``cp`` > 1) keeps
        the fitted path: the ring runs the kernel per step on chunk pairs (Transformer Engine
        ``AttnFuncWithCPAndKVP2P``: one causal diagonal call, then half-chunk non-causal calls, each output
        corrected by its log-sum-exp), which the single-call measurement does not cover."""
        kernel = self.gpu.attention_kernel(runtime) if runtime and seq > 0 and cp == 1 else None
        if kernel is None:
            f = self.attention(flops, bytes_rw, performed, head_dim, runtime)
            return f, f * bwd_ratio
        if flops <= 0:
            return 0.0, 0.0
        self.hits[self.source] += 1
        eff = knee_eff(measured_kernel_points(kernel, self.peak / 1e12), keys_per_query_tile(seq, performed))
        eff *= head_dim_factor(head_dim, kernel.head_dim, kernel.head_dim_rate)
        work, mem_eff = flops * performed, self.gpu.eff("membound_eff", max(bytes_rw, 1))
        fwd = roofline_time(work, bytes_rw, self.peak, eff, self.bw, mem_eff) * self.contention
        return fwd, fwd * bwd_ratio

    def membound(self, bytes_rw: float, flops: float = 0.0) -> float:
        """Elementwise / reduction op bounded by memory bandwidth."""
        if bytes_rw <= 0:
            return 0.0
        self.hits[self.source] += 1
        eff = self.gpu.eff("membound_eff", bytes_rw)
        return roofline_time(flops, bytes_rw, self.peak, 1.0, self.bw, eff) * self.contention

    def _fp8_floor(self, flops: float, byts: float) -> float:
        """The least time an fp8 GEMM of ``flops`` takes: the same GEMM in bf16 on the profile's cuBLAS curve
        (``matmul_eff``, no stack factor: e_max 0.75 of 989.4 = 742 TFLOP/s against 739-764 measured at the
        large shapes) over the fp8 / bf16 rate measured on the GPU at that size (``GpuProfile.fp8_gemm_speedup``,
        ``benchmarks/kernel_rates.py``: cuBLASLt ``torch._scaled_mm`` vs bf16 matmul, the kernels torchao
        float8 and Transformer Engine call); 0 where not measured."""
        if self.gpu.fp8_gemm_speedup is None:
            return 0.0
        eff = self.gpu.eff("matmul_eff", flops)
        bf16 = roofline_time(flops, byts, self.peak, eff, self.bw, self.gpu.eff("membound_eff", byts))
        return bf16 / self.gpu.fp8_gemm_speedup.at(flops)

    def _curve_flops(self, flops: float) -> float:
        """Where a GEMM of ``flops`` reads the profile's ``matmul_eff`` curve. The curve is
        eff = 1/(1/e_max + P*t0/x) with P the 16-bit peak (``self.peak``): its knee is a latency t0 in
        seconds (launch, tile waves), which does not shrink because an fp8 tensor core is faster. At
        the fp8 peak P8 the same t0 is reached at P8/P times the FLOPs, so an fp8 GEMM reads the curve
        at flops * P/P8 (every other dtype: the flops as they are, bit for bit)."""
        return flops if self.gemm_peak == self.peak else flops * self.peak / self.gemm_peak

    def _dsize(self) -> int:
        return 4 if self.dtype == "fp32" else 2

    def _lookup(self, kind: str, dims: tuple) -> tuple[float, float] | None:
        if not self.measured:
            return None
        hit = self.measured.get(signature(kind, dims, self.dtype))
        if hit is not None:
            self.hits["measurement"] += 1
        return hit


def layer_dtype(kind: str, dtype: str) -> str:
    """The precision a layer's GEMMs run in under a training ``dtype``: fp8 recipes quantize the
    transformer blocks' linears only. Megatron-Core enters Transformer Engine's ``fp8_autocast`` per
    transformer layer (``TransformerBlock``: ``get_fp8_context``) and its output layer is a plain
    ``ColumnParallelLinear``; torchao float8 in torchtitan skips the ``output`` projection
    (``Float8LinearConverter`` ``filter_fqns``); llm-foundry's MPT ties the head to ``wte`` through
    ``F.linear``. So the embedding and output layers stay in bf16 (Micikevicius et al. 2022 keep the
    first and last layers in higher precision too)."""
    return "bf16" if dtype == "fp8" and kind != "block" else dtype


def stack_matmul_eff(eff: float, stack: StackConstants, dtype: str) -> float:
    """GEMM efficiency under a software stack: the profile's shape curve times the stack's fitted
    kernel factor (cuBLAS through torch vs Transformer Engine, fp8 vs bf16 tiles), at most 1.
    Constants: ``GpuProfile.stacks``, fitted by ``benchmarks/calibrate_modern.py``."""
    scale = stack.fp8_matmul_scale if dtype == "fp8" else stack.matmul_scale
    return min(1.0, eff * scale)


def cpu_contention(gpu: GpuProfile, ranks_per_node: int) -> float:
    """Slowdown of every op when ranks share CPU cores: max(1, ranks * threads per rank / cores)
    (time slicing; measured on the 2-core build machine, see docs/profiling.md). 1 for GPUs."""
    if not gpu.cores:
        return 1.0
    return max(1.0, ranks_per_node * gpu.threads_per_rank / gpu.cores)


def mfu_peak(gpu: GpuProfile, timer: OpTimer) -> float:
    """The MFU denominator: the GPU type's dense datasheet peak of the dtype (bf16 under fp8, as
    ``OpTimer.peak``), also when ``timer`` prices from a measured profile (``--profile``): a measured
    peak is a fit constant, not the MFU convention (Megatron / PaLM: datasheet dense peak). A CPU,
    or a cluster whose device is itself a measured profile, has no datasheet: its own peak."""
    prec = "bf16" if PRECISION.get(timer.dtype, "bf16") == "fp8" else PRECISION.get(timer.dtype, "bf16")
    if timer.gpu is gpu or gpu.cores is not None or gpu.meta.get("measured") or prec not in gpu.peak_tflops:
        return timer.peak
    return gpu.peak_flops(prec)
