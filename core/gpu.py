"""``GpuProfile``: one accelerator's peak rates, memory and efficiency curves (shared type).

Loaded from ``profiles/hardware/*.yaml`` by ``autopar.profiles.hw``; written by ``autopar profile``.
"""

from __future__ import annotations

import itertools
import math
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, RootModel, field_serializer, model_validator

from autopar.errors import InputError

Precision = Literal["fp32", "tf32", "bf16", "fp16", "fp8"]
CurveName = Literal["matmul", "membound", "attention"]
REQUIRED_SOURCES = ("peak_tflops", "mem_capacity_bytes", "mem_bw_gbps", "framework_overhead_bytes",
                    "usable_mem_fraction", "matmul_eff", "membound_eff", "attention_eff")


class EffCurve(RootModel[list[tuple[float, float]]]):
    """``[[x, eff], ...]`` with x > 0 increasing and 0 < eff <= 1."""

    # defer_build: the profile's curves and kernels are validated as parts of GpuProfile (whose schema holds
    # theirs); their own validators, built only if something validates one alone, cost a warm plan's import 5 ms
    model_config = ConfigDict(defer_build=True)

    @model_validator(mode="after")
    def _check(self) -> EffCurve:
        pts = self.root
        if not pts:
            raise ValueError("an efficiency curve needs at least one [x, eff] point")
        if any(x <= 0 for x, _ in pts) or any(b[0] <= a[0] for a, b in itertools.pairwise(pts)):
            raise ValueError("curve x values must be positive and strictly increasing")
        if any(not 0 < e <= 1 for _, e in pts):
            raise ValueError("curve efficiencies must lie in (0, 1]")
        return self

    def at(self, x: float) -> float:
        """Piecewise-linear in log10(x), clamped outside the first/last point."""
        pts = self.root
        if x <= pts[0][0]:
            return pts[0][1]
        if x >= pts[-1][0]:
            return pts[-1][1]
        lx = math.log10(x)
        for (x0, e0), (x1, e1) in itertools.pairwise(pts):
            if x <= x1:
                t = (lx - math.log10(x0)) / (math.log10(x1) - math.log10(x0))
                return e0 + t * (e1 - e0)
        return pts[-1][1]  # unreachable: x < pts[-1][0] is inside some segment


# the software stack that runs a plan (cost_models.session.RUNTIMES says what each one means): its own fitted
# constants (``GpuProfile.stacks``) and attention kernel; the program it runs is ``STACK_PROGRAM``'s
Runtime = Literal["torch", "torchtitan", "megatron", "deepspeed", "llm-foundry"]
# Each stack -> the program family the cost model prices it as (``PricingContext.runtime``: which FSDP, context
# parallel, recompute, loss and fusion rules apply). llm-foundry (Composer FSDP over eager PyTorch blocks) runs what
# autopar's own torch program runs, with 2023 kernels of its own (Triton flash attention): torch's program rules,
# its own constants. The one place a stack's program is declared.
STACK_PROGRAM: dict[str, str] = {"torch": "torch", "torchtitan": "torchtitan", "megatron": "megatron",
                                 "deepspeed": "deepspeed", "llm-foundry": "torch"}


def program_of(runtime: str) -> str:
    """The program family ``runtime`` (a ``Runtime``) is priced as (``STACK_PROGRAM``)."""
    return STACK_PROGRAM[runtime]


# The fp8 library a stack's linears run under ``--dtype fp8`` (``cost_models.fp8_cost`` prices each one's casts),
# a property of the stack, not of the program it shares: llm-foundry runs torch's program, but Composer's
# ``amp_fp8`` is Transformer Engine (mosaicml 0.17 ``composer/core/precision.py``: ``te.fp8_autocast`` with
# ``DelayedScaling``), which quantizes only TE modules, and MPT's ``fc_type: te`` builds its four linears as plain
# ``te.Linear`` (llm-foundry 0.4 ``models/layers/fc.py``, ``attention.py``, ``ffn.py``) called without
# ``is_first_microbatch``: ``te-linear``. Megatron-Core runs TE's norm-fused ``LayerNormLinear`` and caches fp8
# weights per step: ``te``. torchtitan runs torchao float8; autopar's own program (``torch``) runs none (``plan``
# refuses fp8 there) and DeepSpeed's rows state none, so they keep torchao's casts as before.
Fp8Library = Literal["torchao", "te", "te-linear", "none"]
STACK_FP8_LIBRARY: dict[str, Fp8Library] = {"torch": "torchao", "torchtitan": "torchao", "megatron": "te",
                                            "deepspeed": "torchao", "llm-foundry": "te-linear"}

# Stacks whose attention kernel pads the head dim to a power of two, beyond what a profile's ``HeadDimRate``
# prices (``cost_models.attention_rate.stack_tile_factor``). llm-foundry 0.2's MPT runs ``attn_impl: triton`` by
# default (``models/mpt/configuration_mpt.py``): ``flash_attn_triton.py`` sets
# ``BLOCK_HEADDIM = max(triton.next_power_of_2(d), 16)`` and masks the rest of the tile; its other kernel,
# flash-attn 1.0 (``attn_impl: flash``), is templated at head dims 32 / 64 / 128, so d 112 computes in the 128 tile
# either way. The A100 profiles carry no ``HeadDimRate`` (the d-64 penalty there is not what the A100 rows show),
# so without this MPT-30B's d 112 was priced at the rate of d 128 on its own FLOPs.
POW2_TILE_STACKS = ("llm-foundry",)
# Stacks whose cross-entropy is one kernel on the 16-bit logits (``cost_models.loss_memory.fused_loss``: llm-foundry's
# MPT default loss, flash-attn's fused cross-entropy, llm-foundry 0.3.0 ``modeling_mpt.py``).
FUSED_LOSS_STACKS = ("llm-foundry",)
# Stacks whose attention kernel returns its output in the [b, s, heads, d] layout the output projection reads as a
# view (``cost_models.runtime_memory.attention_output_copy_bytes``: MPT's ``triton_flash_attn_fn``).
VIEW_OUTPUT_STACKS = ("llm-foundry",)


def _interp_log(pts: list[tuple[float, float]], x: float) -> float:
    """Piecewise-linear in log10(x) through ``pts``, clamped outside the first / last point."""
    if x <= pts[0][0]:
        return pts[0][1]
    for (x0, y0), (x1, y1) in itertools.pairwise(pts):
        if x <= x1:
            return y0 + (math.log10(x) - math.log10(x0)) / (math.log10(x1) - math.log10(x0)) * (y1 - y0)
    return pts[-1][1]


class SpeedupCurve(RootModel[list[tuple[float, float]]]):
    """``[[gemm FLOPs, fp8 / bf16 rate], ...]`` as measured (x increasing, ratio >= 1)."""

    model_config = ConfigDict(defer_build=True)  # as EffCurve's

    @model_validator(mode="after")
    def _check(self) -> SpeedupCurve:
        pts = self.root
        if not pts or any(b[0] <= a[0] for a, b in itertools.pairwise(pts)) or any(x <= 0 or r < 1 for x, r in pts):
            raise ValueError("fp8_gemm_speedup: [[flops, ratio >= 1], ...] with flops positive and increasing")
        return self

    def at(self, flops: float) -> float:
        return _interp_log(self.root, flops)


class HeadDimRate(BaseModel):
    """How a fused attention kernel's rate moves with head dim (``cost_models.attention_rate.head_dim_factor``):
    ``d64_ratio`` its forward + backward rate at head dim 64 over the rate at 128, and ``round_to`` the head-dim
    tile it computes in (a head dim is padded up to a multiple of it)."""

    model_config = ConfigDict(extra="forbid", defer_build=True)  # as EffCurve's

    d64_ratio: float = Field(..., gt=0.5, le=1.0, description="forward + backward rate at head dim 64 / at 128")
    round_to: int = Field(8, ge=1, description="the kernel computes ceil(d / round_to) * round_to columns")
    source: str = Field(..., min_length=1, description="the published figure or arithmetic it comes from")


class AttentionKernel(BaseModel):
    """One fused causal attention kernel as measured on this GPU (``benchmarks/kernel_rates.py``):
    TFLOP/s forward and forward+backward per sequence length at head dim ``head_dim`` and ``heads``
    heads, batch 1, FLOPs counted as Megatron counts the causal half (forward 2·b·h·s²·d, forward +
    backward 3.5x that); priced from the forward+backward rate (``cost_models.compute.measured_attention_eff``).
    ``stacks``: the runtimes that call it on this GPU type."""

    model_config = ConfigDict(extra="forbid", defer_build=True)  # as EffCurve's

    stacks: list[Runtime] = Field(..., min_length=1, description="runtimes whose attention is this kernel")
    heads: int = Field(32, ge=1)
    head_dim: int = Field(128, ge=1)
    measured: list[tuple[int, float, float]] = Field(
        ..., min_length=2, description="[[seq_len, forward TFLOP/s, forward+backward TFLOP/s], ...], causal half")
    source: str = Field(..., min_length=1, description="the command and run that measured it")
    head_dim_rate: HeadDimRate | None = Field(None, description="its rate at other head dims (None: as measured)")

    @model_validator(mode="after")
    def _check(self) -> AttentionKernel:
        seqs = [s for s, _, _ in self.measured]
        if seqs != sorted(set(seqs)) or any(f <= 0 or fb <= 0 for _, f, fb in self.measured):
            raise ValueError("attention_kernels.measured: sequence lengths increasing, rates positive")
        if any(3.5 / fb <= 1 / f for _, f, fb in self.measured):
            raise ValueError("attention_kernels.measured: forward+backward must take longer than forward")
        return self


# Constants that are physics of the GPU type, its host and NCCL, the same for every stack that does
# the thing (docs/validation.md, "Two levels of constants"): cuBLAS GEMM efficiency (bf16, fp8),
# compute slowed by communication kernels beside it (SM and HBM contention), bus bandwidth lost
# across nodes, the host's per-step cost, the share of a one-unit-ahead ZeRO-3 prefetch that hides
# behind a layer's compute. Fitted jointly on all rows of a GPU type (``GpuProfile.gpu_constants``);
# a stack overrides one only where its own rows show it differs. Every other field is a choice of
# the stack (attention kernel, async TP, all-to-all overlap, grouped GEMM, ZeRO-3 gather rate,
# routing imbalance): neutral for a stack with no rows.
GPU_LEVEL_FIELDS = ("matmul_scale", "fp8_matmul_scale", "overlap_slowdown", "inter_node_decay", "step_overhead_s",
                    "zero3_overlap")


class StackConstants(BaseModel):
    """Global constants of one software stack on one GPU type (``GpuProfile.stacks``), fitted over
    all published runs of that GPU type and stack by ``benchmarks/calibrate_modern.py`` (never per
    run). The defaults are neutral: a profile without them prices as before. The fields named in
    ``GPU_LEVEL_FIELDS`` come from ``GpuProfile.gpu_constants`` unless a stack sets them."""

    model_config = ConfigDict(extra="forbid")

    matmul_scale: float = Field(1.0, gt=0, le=2, description="GEMM efficiency of the stack's kernels relative "
                                                                "to matmul_eff (capped at 1 overall)")
    fp8_matmul_scale: float = Field(1.0, gt=0, le=2, description="fp8 GEMM efficiency at the fp8 peak relative "
                                                                    "to matmul_eff")
    attention_scale: float = Field(1.0, gt=0, le=2, description="fused attention efficiency relative to "
                                                                   "attention_eff")
    overlap_slowdown: float = Field(0.0, ge=0, le=1, description="compute seconds lost per second of "
                                                                    "communication running beside it (SM contention)")
    zero3_overlap: float = Field(1.0, ge=0, le=1, description="share of ZeRO-3 / FSDP gathers and reduce-scatters "
                                                                 "the prefetch can hide behind compute")
    inter_node_decay: float = Field(0.0, ge=0, description="data-parallel bus bandwidth across nodes falls as "
                                                              "1 / (1 + decay * log2(nodes))")
    step_overhead_s: float = Field(0.0, ge=0, description="host time per optimizer step (launch, data, logging)")
    moe_imbalance: float = Field(1.0, ge=1, le=3, description="busiest expert rank's tokens over the mean "
                                                                 "(routing imbalance the step waits for)")
    tp_overlap: float = Field(0.0, ge=0, le=1, description="share of tensor-parallel collectives hidden behind "
                                                              "GEMMs (Megatron-Core --tp-comm-overlap, async TP)")
    expert_grouped_gemm: bool = Field(False, description="the local experts of an MoE layer run as one grouped "
                                                         "GEMM (Megatron-Core --moe-grouped-gemm), not a per-expert "
                                                         "loop (autopar's torch programs); cost_models/moe_cost.py")
    ep_overlap: float = Field(0.0, ge=0, le=1, description="share of the MoE dispatch / combine all-to-alls hidden "
                                                              "behind another micro-batch's compute (Megatron-Core "
                                                              "--overlap-moe-expert-parallel-comm, DeepSeek DualPipe)")
    zero3_gather_gbps: float = Field(0.0, ge=0, description="effective per-GPU GB/s of the stack's ZeRO-3 "
                                                               "parameter gathers and gradient reduce-scatters "
                                                               "across nodes, where below the NCCL ring model "
                                                               "(0: the ring model)")
    allocator_reserve_fraction: float | None = Field(
        None, ge=0, le=1, description="bytes the stack's caching allocator holds beyond the live-tensor peak "
                                      "(max_memory_reserved / max_memory_allocated - 1; FSDP2's per-stream "
                                      "all-gather buffers vs Megatron's contiguous ones), from "
                                      "GpuProfile.allocator_reserve_by_stack; None: the GPU profile's")
    sources: dict[str, str] = Field(default_factory=dict, description="field -> the command that fitted it")


def usable_fraction(reserve: float) -> float:
    """Share of (capacity - framework overhead) the live tensors may fill so that the caching allocator's
    reserve on top still fits: ``floor(1 / (1 + reserve), 2)`` (tests/test_usable_memory_rule.py). A live peak
    at that limit reserves live x (1 + reserve) <= capacity - overhead, what ``max_memory_reserved`` reports."""
    return math.floor(100 / (1 + reserve)) / 100


def resolve_stack(gpu_level: StackConstants, stack: StackConstants | None) -> StackConstants:
    """Hardware-level fields from ``gpu_level`` unless ``stack`` sets them; stack choices from ``stack``
    (neutral when it is None: a stack no published row runs on this GPU type)."""
    inherited = gpu_level.model_dump(include=set(GPU_LEVEL_FIELDS) & gpu_level.model_fields_set)
    own = stack.model_dump(include=stack.model_fields_set - {"sources"}) if stack is not None else {}
    return StackConstants(**{**inherited, **own})


class GpuProfile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    description: str = ""
    aliases: list[str] = Field(default_factory=list, description="other names load_gpu_profile accepts")
    peak_tflops: dict[Precision, float] = Field(..., description="dense tensor-core TFLOP/s per precision")
    mem_capacity_bytes: int = Field(..., gt=0)
    mem_bw_gbps: float = Field(..., gt=0, description="HBM (or DRAM) bandwidth, GB/s")
    framework_overhead_bytes: int = Field(
        ..., ge=0, description="CUDA context + NCCL buffers + cuBLAS workspace, never available to tensors")
    usable_mem_fraction: float = Field(
        ..., gt=0, le=1, description="fraction of the rest live tensors may fill where no allocator reserve is "
                                     "set (measured CPU profiles); with one, usable_fraction(reserve) "
                                     "(GpuProfile.usable_bytes, tests/test_usable_memory_rule.py)")
    allocator_reserve_fraction: float = Field(
        0.0, ge=0, le=1, description="bytes the caching allocator holds beyond the live-tensor peak (fragmentation, "
                                     "cached blocks: max_memory_reserved / max_memory_allocated - 1), fitted per GPU "
                                     "and stack (benchmarks/validate_memory.py --fit); 0: not fitted")
    allocator_reserve_by_stack: dict[Runtime, Annotated[float, Field(ge=0, le=1)]] = Field(
        default_factory=dict, description="a stack's own allocator reserve where its rows measure or bound it "
                                          "(sources['allocator_reserve_fraction.<stack>'] names the command); "
                                          "the other stacks take allocator_reserve_fraction. Outside stacks: "
                                          "calibrate_modern.py --write rewrites that block from its fit")
    power_limit_w: float | None = Field(None, gt=0, description="board power limit the profile's numbers hold for, W")
    host_link_gbps: float | None = Field(
        None, gt=0, description="achievable GPU<->host copy bandwidth per GPU, GB/s per direction (PCIe)")
    host_optimizer_gbps: float | None = Field(
        None, gt=0, description="host memory bandwidth one GPU's share of the CPU gets for an offloaded Adam step")
    host_mem_bytes: int | None = Field(
        None, gt=0, description="host DRAM per GPU: the node's system memory / its GPUs; offloaded states must fit "
                                "in host_usable_fraction of it (None: not checked)")
    host_usable_fraction: float = Field(
        0.8, gt=0, le=1, description="share of a GPU's host DRAM offloaded states may hold; the OS, data loaders "
                                     "and pinned staging buffers keep the rest (estimate)")
    fused_elementwise: bool = Field(
        True, description="chains of elementwise ops run as one kernel where the runtime fuses them "
                          "(cost_models.session.runtime_fuses_elementwise: Megatron's fused kernels, compiled "
                          "torchtitan; eager runtimes run them op by op); false: never (a measured eager CPU profile)")
    matmul_eff: EffCurve
    membound_eff: EffCurve
    attention_eff: EffCurve
    attention_eff_counts: Literal["full", "performed"] = Field(
        "full", description="FLOPs attention_eff is quoted in: 'full' 4bhs^2d per call (measured profiles time causal "
                            "SDPA against it), 'performed' only the score blocks a causal / windowed kernel computes "
                            "(FlashAttention papers; cost_models.compute.causal_block_fraction)")
    sources: dict[str, str] = Field(..., description="field -> where its value comes from")
    # ----- written by `autopar profile` / `autopar profile-comm` (measured profiles only) -----
    cores: int | None = Field(None, ge=1, description="CPU cores the ranks of one node share (None: a GPU)")
    threads_per_rank: int = Field(1, ge=1, description="torch intra-op threads of one rank (CPU)")
    measured_ops: dict[str, list[float]] = Field(
        default_factory=dict, description="op signature -> [forward s, backward s, relative spread]")
    comm_fits: list[dict] = Field(
        default_factory=list, description="measured collective fits (cost_models.comm.CommFit fields)")
    op_overhead_s: float = Field(
        0.0, ge=0, description="host time a training step spends per captured op and micro-batch beyond the "
                               "op's own price (module calls, autograd bookkeeping, allocation; forward + "
                               "backward); 0 where the host runs ahead of the device (GPUs)")
    shared_core_sync_s: float = Field(
        0.0, ge=0, description="wall time a blocking collective or send/receive costs when the node's ranks "
                               "share cores (its members wait to be scheduled together); 0 for GPUs")
    host_launch_s: float = Field(
        5.61e-5, gt=0, description="host seconds per kernel launch of an eager training step (Python, dispatch, "
                                   "cudaLaunchKernel): a step takes at least its launches x this "
                                   "(cost_models/host_bound.py); unused on CPUs; default: the H100 trace's "
                                   "(h100-sxm.yaml sources: it belongs to the host CPU and the eager framework "
                                   "more than to the GPU); fitted by fit_kernel_rates.py --trace")
    kernels_per_op_call: float = Field(
        1.9, gt=0, description="CUDA kernels an eager step launches per captured op call and forward pass (an "
                               "RMSNorm ~6, a cast 1), the optimizer's and FSDP2's copies included "
                               "(cost_models/host_bound.py); default: the H100 traces' (h100-sxm.yaml sources); "
                               "fitted by fit_kernel_rates.py --trace")
    backward_launch_ratio: float = Field(
        2.0, gt=0, description="kernels a backward launches per forward kernel (grad input + grad weight; "
                               "cost_models/host_bound.py); default: h100-sxm.yaml's, an estimate; fitted by "
                               "fit_kernel_rates.py with a recompute case's trace")
    dtensor_call_overhead_s: float = Field(
        0.0, ge=0, description="host CPU time DTensor adds to one tensor-parallel module call, forward + "
                               "backward (sharding propagation, redistribution in Python); 0 where the host "
                               "runs ahead of the device (GPUs)")
    meta: dict = Field(default_factory=dict, description="how it was measured: device, torch, dtype, "
                                                         "threads, date, command")
    gpu_constants: StackConstants = Field(
        default_factory=StackConstants, description="hardware-level constants (GPU_LEVEL_FIELDS only) every "
                                                     "stack inherits, fitted on all published rows of the GPU type")
    stacks: dict[Runtime, StackConstants] = Field(
        default_factory=dict, description="per software stack (--runtime): its fitted choices, and the "
                                          "hardware-level fields it overrides")
    attention_kernels: dict[str, AttentionKernel] = Field(
        default_factory=dict, description="measured fused attention kernels, each with the stacks that call it; "
                                          "a stack without one prices attention from attention_eff x its scale")
    attention_head_dim_rate: HeadDimRate | None = Field(
        None, description="attention_eff's kernel at other head dims than 128 (None: no correction)")
    fp8_gemm_speedup: SpeedupCurve | None = Field(
        None, description="measured fp8 / bf16 GEMM rate by FLOPs: an fp8 GEMM is priced no faster than the "
                          "bf16 one times this (cost_models.compute.OpTimer)")

    @model_validator(mode="after")
    def _check_sources(self) -> GpuProfile:
        missing = [k for k in REQUIRED_SOURCES if not self.sources.get(k, "").strip()]
        if missing:
            raise ValueError(f"sources must name where each number comes from; missing: {', '.join(missing)}")
        if not self.peak_tflops or any(v <= 0 for v in self.peak_tflops.values()):
            raise ValueError("peak_tflops needs at least one positive entry")
        called = [rt for k in self.attention_kernels.values() for rt in k.stacks]
        if len(called) != len(set(called)):
            raise ValueError("attention_kernels: each runtime may call one kernel; fix the stacks lists")
        unsourced = [rt for rt in self.allocator_reserve_by_stack
                     if not self.sources.get(f"allocator_reserve_fraction.{rt}", "").strip()]
        if unsourced:
            raise ValueError("allocator_reserve_by_stack: each value needs a source "
                             f"'allocator_reserve_fraction.<stack>'; missing: {', '.join(unsourced)}")
        stack_only = sorted(set(self.gpu_constants.model_fields_set) - set(GPU_LEVEL_FIELDS) - {"sources"})
        if stack_only:
            raise ValueError(f"gpu_constants may set only hardware-level fields ({', '.join(GPU_LEVEL_FIELDS)}); "
                             f"move {', '.join(stack_only)} to stacks:")
        return self

    @field_serializer("gpu_constants")
    def _dump_gpu_constants(self, c: StackConstants) -> dict:
        """Only the fields set: a dumped profile loads back with the same inheritance."""
        return c.model_dump(include=c.model_fields_set)

    @field_serializer("stacks")
    def _dump_stacks(self, stacks: dict[str, StackConstants]) -> dict:
        """Only each stack's own fields, so a dump does not turn inherited values into overrides."""
        return {k: c.model_dump(include=c.model_fields_set) for k, c in stacks.items()}

    @property
    def fitted(self) -> bool:
        """Whether any constant was fitted for this GPU (measured CPU profiles have none)."""
        return bool(self.stacks or set(self.gpu_constants.model_fields_set) - {"sources"})

    def stack(self, runtime: str) -> StackConstants:
        """The constants ``runtime`` prices with on this GPU: the hardware level, overridden by the
        fields the stack sets; neutral defaults where nothing was fitted."""
        resolved = resolve_stack(self.gpu_constants, self.stacks.get(runtime))
        own = self.allocator_reserve_by_stack.get(runtime)
        return resolved if own is None else resolved.model_copy(update={"allocator_reserve_fraction": own})

    def reserve_fraction(self, stack: StackConstants | None = None) -> float:
        """The caching-allocator reserve ``stack`` runs with (its own, else this GPU's)."""
        own = stack.allocator_reserve_fraction if stack is not None else None
        return self.allocator_reserve_fraction if own is None else own

    def attention_kernel(self, runtime: str) -> AttentionKernel | None:
        """The measured attention kernel ``runtime`` calls on this GPU (None: not measured)."""
        return next((k for k in self.attention_kernels.values() if runtime in k.stacks), None)

    def peak_flops(self, precision: str = "bf16") -> float:
        """Dense peak in FLOP/s for ``precision``."""
        if precision not in self.peak_tflops:
            raise InputError(f"precision: {self.name} has no {precision} peak; "
                             f"known: {', '.join(self.peak_tflops)}")
        return self.peak_tflops[precision] * 1e12

    @property
    def mem_bw_bytes_per_s(self) -> float:
        return self.mem_bw_gbps * 1e9

    def usable_bytes(self, stack: StackConstants | None = None) -> int:
        """Bytes live tensors may use under ``stack`` (the planner's check, ``CostModel.usable_mem_bytes``):
        (capacity - framework overhead) x ``usable_fraction`` of the stack's reserve; a profile with no reserve
        (measured CPU profiles) keeps its ``usable_mem_fraction``."""
        reserve = self.reserve_fraction(stack)
        frac = usable_fraction(reserve) if reserve > 0 else self.usable_mem_fraction
        return int((self.mem_capacity_bytes - self.framework_overhead_bytes) * frac)

    def eff(self, curve_name: str, x: float) -> float:
        """Efficiency from curve ``matmul`` | ``membound`` | ``attention`` (``*_eff`` also accepted)."""
        key = curve_name if curve_name.endswith("_eff") else f"{curve_name}_eff"
        curve = getattr(self, key, None) if key in ("matmul_eff", "membound_eff", "attention_eff") else None
        if curve is None:
            raise InputError(f"curve: unknown efficiency curve '{curve_name}'; known: matmul, membound, attention")
        return curve.at(x)
