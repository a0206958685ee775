"""Build a ``CostModel`` from what a user types: model, GPU / cluster, sequence, dtype,
an optional measured profile and an optional expert placement or routing trace."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from autopar.core.cluster import ClusterSpec
from autopar.core.gpu import STACK_PROGRAM, program_of
from autopar.core.model_spec import ModelSpec
from autopar.cost_models.estimate import CostModel
from autopar.cost_models.fsdp import FSDP1_IMPLS, FSDP_IMPLS, FsdpImpl
from autopar.cost_models.layer_cost import same_program
from autopar.cost_models.templates import build_templates
from autopar.errors import InputError
from autopar.profiles.hw import default_cluster_for_gpu, load_cluster, load_gpu_profile
from autopar.profiles.intake import resolve_model

DEFAULT_GPU = "h100-sxm"
DEFAULT_GPUS_PER_NODE = 8
# torch: autopar's emitted torch-native programs (FSDP2, DTensor, torch pipelining); torchtitan: torchtitan's
# FSDP2 programs (async TP, per-op SAC, its pipeline keeps stage parameters unsharded); megatron: Megatron-LM /
# Megatron-Core (NeMo, MegaScale); deepspeed: DeepSpeed ZeRO (its ZeRO-3 prefetch and bucketing); llm-foundry:
# MosaicML llm-foundry (Composer FSDP1, its Triton flash attention), torch's program with its own constants.
# Which program each stack runs: core.gpu.STACK_PROGRAM (``program_of``), read by every rule below.
RUNTIMES = tuple(STACK_PROGRAM)


@dataclass
class Inputs:
    model: str
    gpu: str | None = None
    nodes: int | None = None
    gpus_per_node: int | None = None
    cluster: str | None = None
    seq_len: int | None = None
    dtype: str | None = None   # None: bf16, or fp32 on a device profile without a bf16 peak
    profile: str | None = None
    placement: str | None = None
    trace: str | None = None
    input_shape: list[int] | None = None
    runtime: str = "torch"   # one of RUNTIMES: which software runs the plan
    input_dtype: str = "int64"   # a factory's / transformers model's example input dtype
    compile: str = "none"        # none | model | model+loss: what the runtime's program compiles
    loss_parallel: bool = False  # the loss on vocabulary-sharded logits (DTensor loss_parallel)
    moe_capacity_factor: float | None = None  # token-drop expert capacity (1: forced balance); None: dropless
    a2a_overlap: bool = True     # False: the run blocks on its MoE all-to-alls (the stack's ep_overlap unused)
    cross_entropy: str = "te"    # megatron: the fused loss kernel, te | native (megatron_ops.CROSS_ENTROPY_IMPLS)
    tp_comm_overlap: bool = False  # megatron: Transformer Engine userbuffers tp overlap (--tp-comm-overlap)
    fsdp_impl: str = "fsdp2"       # torch: which FSDP runs the plan (fsdp.FSDP_IMPLS; llm-foundry's rows: FSDP1)


def resolve_cluster(inp: Inputs) -> ClusterSpec:
    if inp.nodes is not None and inp.nodes < 1:
        raise InputError(f"--nodes={inp.nodes} must be at least 1")
    if inp.gpus_per_node is not None and inp.gpus_per_node < 1:
        raise InputError(f"--gpus-per-node={inp.gpus_per_node} must be at least 1")
    if inp.cluster:
        return load_cluster(inp.cluster, nodes=inp.nodes, gpus_per_node=inp.gpus_per_node, gpu=inp.gpu)
    gpu = inp.gpu or DEFAULT_GPU
    load_gpu_profile(gpu)  # one-line error for an unknown GPU before anything else
    gpn = inp.gpus_per_node or (1 if gpu.startswith("cpu") else DEFAULT_GPUS_PER_NODE)
    return default_cluster_for_gpu(gpu, nodes=inp.nodes or 1, gpus_per_node=gpn)


def build_cost_model(inp: Inputs) -> tuple[CostModel, ModelSpec, ClusterSpec, int]:
    spec = resolve_model(inp.model, input_shape=inp.input_shape, input_dtype=inp.input_dtype)
    cluster = resolve_cluster(inp)
    if spec.sample_tokens and inp.seq_len and inp.seq_len != spec.sample_tokens:
        raise InputError(f"--seq-len={inp.seq_len}: one input of {spec.name} is {spec.sample_tokens} "
                         f"{spec.sample_unit}; set --input-shape instead (or leave --seq-len out)")
    seq = inp.seq_len or default_seq_len(spec)
    if seq < 1:
        raise InputError(f"--seq-len={seq} must be positive")
    if spec.family != "custom" and spec.max_seq_len < seq:
        spec = spec.model_copy(update={"max_seq_len": seq})
    gpu = load_gpu_profile(cluster.gpu)
    if inp.dtype in (None, "auto"):  # documented default: bf16 where the device has a bf16 peak
        inp.dtype = "bf16" if "bf16" in gpu.peak_tflops else "fp32"
    if inp.dtype not in ("bf16", "fp16", "fp32", "fp8"):
        raise InputError(f"--dtype={inp.dtype} is not one of bf16, fp16, fp32, fp8")
    timer, fits = _measured(inp, gpu)
    moe_load = _moe_load(inp, spec)
    if inp.runtime not in RUNTIMES:
        raise InputError(f"--runtime={inp.runtime} is not one of {', '.join(RUNTIMES)}")
    program = program_of(inp.runtime)
    cross_entropy = _cross_entropy(inp)
    # fp8 runs keep bf16 activations and weights outside the GEMMs (Transformer Engine, torchao
    # float8): capture in bf16, the timer prices the GEMMs at the fp8 peak (compute.OpTimer)
    compile_mode, loss_parallel = program_options(inp)
    templates = program_templates(spec, seq, inp.dtype, gpu, program, compile_mode)
    cm = CostModel(spec, cluster, seq, templates, gpu, inp.dtype, timer=timer, comm_fits=fits,
                   moe_load=moe_load, runtime=inp.runtime, fsdp_impl=_fsdp_impl(inp))
    cm.ctx.compile, cm.ctx.loss_parallel = compile_mode, loss_parallel
    cm.ctx.moe_capacity_factor, cm.ctx.a2a_overlap = _capacity_factor(inp, spec), inp.a2a_overlap
    cm.ctx.cross_entropy = cross_entropy
    cm.ctx.tp_comm_overlap = _tp_comm_overlap(inp)
    return cm, spec, cluster, seq


def _fsdp_impl(inp: Inputs) -> FsdpImpl:
    """Which FSDP a torch-program plan runs (``fsdp.FsdpImpl``): autopar's program is FSDP2; the FSDP1 variants
    are llm-foundry's (benchmarks/published_foundry_rows.fsdp_impl), "meta" Meta's Llama 3 row under torch."""
    if inp.fsdp_impl not in FSDP_IMPLS:
        raise InputError(f"fsdp_impl={inp.fsdp_impl} is not one of {', '.join(FSDP_IMPLS)}")
    if inp.fsdp_impl in FSDP1_IMPLS and inp.runtime != "llm-foundry":
        raise InputError(f"fsdp_impl={inp.fsdp_impl}: PyTorch FSDP1 is llm-foundry's, priced under --runtime "
                         "llm-foundry only; fix: leave it fsdp2 or use --runtime llm-foundry")
    if inp.fsdp_impl == "meta" and inp.runtime != "torch":
        raise InputError("fsdp_impl=meta: Meta's FSDP is priced under --runtime torch only; fix: leave it fsdp2 "
                         "or use --runtime torch")
    return inp.fsdp_impl


def _tp_comm_overlap(inp: Inputs) -> bool:
    """Megatron-Core's ``--tp-comm-overlap`` (``overlap.userbuffers_tp_exposed``): a Megatron-Core flag;
    autopar's own programs and the other runtimes hide tensor-parallel collectives their own way."""
    if inp.tp_comm_overlap and program_of(inp.runtime) != "megatron":
        raise InputError("--tp-comm-overlap: Megatron-Core's userbuffers overlap, priced under --runtime megatron "
                         "only; drop it or add --runtime megatron")
    return inp.tp_comm_overlap


def _cross_entropy(inp: Inputs) -> str:
    """The fused cross-entropy the megatron runtime runs (``megatron_ops.cross_entropy_bytes``)."""
    from autopar.cost_models.megatron_ops import CROSS_ENTROPY_IMPLS

    if inp.cross_entropy not in CROSS_ENTROPY_IMPLS:
        raise InputError(f"--cross-entropy={inp.cross_entropy} is not one of {', '.join(CROSS_ENTROPY_IMPLS)}")
    if inp.cross_entropy != "te" and program_of(inp.runtime) != "megatron":  # others: the captured graph's loss
        raise InputError(f"--cross-entropy={inp.cross_entropy}: a Megatron-Core loss kernel, priced under --runtime "
                         f"megatron only; drop it or add --runtime megatron")
    return inp.cross_entropy


def program_templates(spec: ModelSpec, seq: int, dtype: str, gpu, runtime: str,
                      compile_mode: str = "none") -> list:
    """The layer templates as ``runtime``'s program runs them: fp8 runs captured in bf16 (the timer
    prices their GEMMs at the fp8 peak), elementwise chains fused where the runtime fuses them."""
    fuse = gpu.fused_elementwise and runtime_fuses_elementwise(runtime, compile_mode)
    return build_templates(spec, seq, "bf16" if dtype == "fp8" else dtype, fuse=fuse)


def same_job(cm: CostModel, cluster: ClusterSpec | None = None, seq_len: int | None = None) -> CostModel:
    """``cm``'s job (model, dtype, device timer, measured fits, runtime and program options) on another
    cluster or at another sequence length (its templates captured as the runtime runs them)."""
    seq = seq_len or cm.seq_len
    templates = cm.templates if seq == cm.seq_len else program_templates(
        cm.spec, seq, cm.dtype, cm.gpu, cm.ctx.runtime, cm.ctx.compile)
    out = CostModel(cm.spec, cluster or cm.cluster, seq, templates, cm.gpu, cm.dtype, timer=cm.timer,
                    comm_fits=cm.ctx.fits, moe_load=cm.moe_load, runtime=cm.stack_name, fsdp_impl=cm.ctx.fsdp_impl)
    same_program(out.ctx, cm.ctx)
    return out


COMPILE_MODES = ("none", "model", "model+loss")
# Runtimes whose programs run each chain of elementwise ops (norm, activation, residual add, RoPE,
# dropout, casts) as one kernel, from each stack's documentation: Megatron-LM / Megatron-Core fuse
# bias + GeLU / SwiGLU, bias + dropout + add, LayerNorm / RMSNorm (Apex / Transformer Engine), RoPE
# and the vocab-parallel cross-entropy (Shoeybi et al. 2019; Megatron-Core ``fusions/``); the
# 2021 DeepSpeed ZeRO-3 rows train Megatron's GPT model code with those kernels. Eager PyTorch
# launches one kernel per op: autopar's emitted programs (no torch.compile), llm-foundry (its
# MPT blocks call flash-attention and a low-precision LayerNorm, everything else eager), and
# torchtitan unless it compiles its blocks (``--compile``).
FUSED_RUNTIMES = ("megatron", "deepspeed")


def runtime_fuses_elementwise(runtime: str, compile: str = "none") -> bool:
    """Whether ``runtime``'s program fuses elementwise chains (``FUSED_RUNTIMES``, or a compiled
    torchtitan program); the templates are built fused or op by op accordingly."""
    return runtime in FUSED_RUNTIMES or (runtime == "torchtitan" and compile != "none")


def program_options(inp: Inputs) -> tuple[str, bool]:
    """(compile, loss_parallel) of the priced program. Only torchtitan's programs compile their
    blocks / loss or run DTensor's ``loss_parallel``; autopar's emitted program (runtime torch) does
    neither (pricing them would promise what ``emit`` does not run), Megatron's loss is always
    vocab-parallel and it does not compile."""
    if inp.compile not in COMPILE_MODES:
        raise InputError(f"--compile={inp.compile} is not one of {', '.join(COMPILE_MODES)}; fix: pick one of them")
    if (inp.compile != "none" or inp.loss_parallel) and program_of(inp.runtime) != "torchtitan":
        given = " ".join(f for f, on in ((f"--compile {inp.compile}", inp.compile != "none"),
                                         ("--loss-parallel", inp.loss_parallel)) if on)
        raise InputError(f"{given}: --runtime {inp.runtime} programs do not run it; fix: leave it out, "
                         "or price torchtitan's programs with --runtime torchtitan")
    return inp.compile, inp.loss_parallel


def default_seq_len(spec: ModelSpec) -> int:
    """Documented default: the model's own context, capped at 4096 (8192 for Llama 3)."""
    if spec.family == "custom":  # a non-token input: its tokens per sample (ViT: patches)
        return spec.sample_tokens or (spec.input_shape or [1, 1])[-1]
    return min(spec.max_seq_len, 8192 if spec.name.startswith("llama3") else 4096)


def _measured(inp: Inputs, gpu):
    if not inp.profile:
        return None, None
    from autopar.cost_models.measured import load_measured_profile

    path = Path(inp.profile)
    return load_measured_profile(path, gpu, inp.dtype)


def _capacity_factor(inp: Inputs, spec: ModelSpec) -> float | None:
    cf = inp.moe_capacity_factor
    if cf is not None and not (cf > 0 and spec.is_moe):
        raise InputError(f"--moe-capacity-factor={cf}: " + ("must be positive (1: each expert takes at most its "
                         "mean share of tokens); fix: give e.g. 1 or 1.25" if spec.is_moe else
                         "needs a mixture-of-experts model; fix: leave it out"))
    if cf is not None and inp.runtime == "torch":  # the emitted program routes every token (dropless)
        raise InputError(f"--moe-capacity-factor={cf}: autopar's emitted programs (--runtime torch) route dropless, "
                         "so pricing dropped tokens would promise what emit does not run; fix: leave it out, or "
                         "price another stack with --runtime megatron")
    return cf


def _moe_load(inp: Inputs, spec: ModelSpec):
    if not (inp.placement or inp.trace):
        return None
    if not spec.is_moe:
        raise InputError("--placement/--trace need a mixture-of-experts model")
    from autopar.cost_models.moe_load import load_ratio_from_files

    return load_ratio_from_files(inp.placement, inp.trace)


def default_global_batch(world: int, seq_len: int) -> int:
    """Documented default: about one million tokens per step, a multiple of the GPU count."""
    target = max(1, (1 << 20) // max(seq_len, 1))
    return max(world, (target // world) * world)
