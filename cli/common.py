"""Options shared by the commands that price strategies (estimate, memory, plan)."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Optional

import typer

from autopar.cli.app import disable_cache
from autopar.core.units import seconds  # noqa: F401  (the commands print through c.seconds)
from autopar.errors import InputError
from autopar.profiles.intake import PRESETS

if TYPE_CHECKING:  # the cost model imports numpy and the planner: only the command bodies need them
    from autopar.cost_models.session import Inputs

Model = typer.Argument(..., help="preset name (" + ", ".join(PRESETS) + "), a config.json path, "
                       "or a pkg.mod:fn factory")
Gpu = typer.Option(None, "--gpu", help="GPU profile (h100-sxm, a100-80g, h200, h800, a100-40g, cpu) or a file; "
                   "--gpu G --nodes N assumes that GPU's DGX network (its cluster preset): NVSwitch inside a node "
                   "and one InfiniBand NIC per GPU between nodes, 48 GB/s per GPU for H100/H200 (NDR 400 Gb/s), "
                   "24 GB/s for A100 (HDR 200 Gb/s), 50 GB/s for H800; --cluster FILE for any other network")
Nodes = typer.Option(None, "--nodes", min=1, help="number of nodes (default 1)")
GpusPerNode = typer.Option(None, "--gpus-per-node", min=1, help="GPUs per node (default 8; 1 for cpu)")
Cluster = typer.Option(None, "--cluster", help="cluster preset (dgx-a100, dgx-h100, ...) or YAML file")
# 2^24 tokens: 128x the longest trained context we know of (Llama 3's 128k) and far below where the capture's
# s x s attention scores overflow a tensor's size (about 3e9 tokens for 32 heads: a traceback, not an answer)
MAX_SEQ_LEN = 1 << 24
SeqLen = typer.Option(None, "--seq-len", min=1, max=MAX_SEQ_LEN,
                      help="sequence length (default: the model's, capped at 4096/8192)")
GlobalBatch = typer.Option(None, "--global-batch", min=1, help="sequences per optimizer step")
Dtype = typer.Option("auto", "--dtype",
                     help="bf16 | fp16 | fp32 | fp8 (auto: bf16, fp32 where the profile has no bf16)")
Runtime = typer.Option("torch", "--runtime",
                       help="software that runs the plan: torch (autopar's emitted FSDP2/DTensor programs) | "
                            "torchtitan | megatron (Megatron-LM/Core, NeMo) | deepspeed (ZeRO) | llm-foundry "
                            "(MosaicML, Composer FSDP; torch's program with its own fitted constants)")
Compile = typer.Option("none", "--compile", help="what the priced program compiles with torch.compile: none | "
                       "model (each block) | model+loss (and the loss); --runtime torchtitan only")
LossParallel = typer.Option(False, "--loss-parallel", help="the loss runs on vocabulary-sharded logits (DTensor "
                            "loss_parallel, torchtitan under tp); --runtime torchtitan only")
MoeCapacityFactor = typer.Option(None, "--moe-capacity-factor", help="token-drop routing: each expert takes at "
                                 "most this x its mean share of tokens (1 also prices forced load balancing, "
                                 "Megatron-Core --moe-router-force-load-balancing); default: dropless")
NoA2aOverlap = typer.Option(False, "--no-a2a-overlap", help="the run blocks on its MoE all-to-alls (Megatron-Core "
                            "without --overlap-moe-expert-parallel-comm): the stack's fitted overlap is not applied")
CrossEntropy = typer.Option("te", "--cross-entropy", help="--runtime megatron: Megatron-Core's fused loss kernel, "
                            "te (Transformer Engine's) | native (Megatron-Core's fp32 kernels)")
TpCommOverlap = typer.Option(False, "--tp-comm-overlap", help="--runtime megatron: the run hides its sequence-parallel "
                             "tp collectives with Transformer Engine userbuffers (Megatron-Core --tp-comm-overlap)")
Profile = typer.Option(None, "--profile", help="measured profile JSON from `autopar profile`")
Placement = typer.Option(None, "--placement", help="expert placement JSON from `autopar experts`")
Trace = typer.Option(None, "--trace", help="routing trace JSON from `autopar trace-routing`")
Json = typer.Option(False, "--json", help="print one JSON object")
InputShape = typer.Option(None, "--input-shape", help="example input shape of a factory or non-token model, "
                          "e.g. 2,128 or 1,3,224,224")
InputDtype = typer.Option("int64", "--input-dtype", help="example input dtype: int64 (tokens), float32, bfloat16, "
                          "float16")
Hf = typer.Option(False, "--hf", help="build the transformers module of MODEL's config.json and capture it as "
                  "itself, even when its model_type is in the built-in catalog")
NoCache = typer.Option(False, "--no-cache", callback=disable_cache, expose_value=False,
                       help="capture the model graph again instead of reading the capture cache")
STRATEGY_KEYS = ("keys: dp data parallel (-1 = the rest), tp tensor parallel, pp pipeline stages, cp context "
                 "parallel, ep expert parallel, etp expert tensor parallel, vpp interleaved chunks per GPU, mbs "
                 "micro-batch, gbs global batch, zero ZeRO stage 0-3 (3 = FSDP), recompute none|selective|op|full, "
                 "sp sequence parallel 0|1, schedule gpipe|1f1b|interleaved, offload ZeRO-Offload 0|1")


def inputs(model: str, gpu: Optional[str], nodes: Optional[int], gpus_per_node: Optional[int],
           cluster: Optional[str], seq_len: Optional[int], dtype: str, profile: Optional[str],
           placement: Optional[str] = None, trace: Optional[str] = None,
           input_shape: Optional[str] = None, runtime: str = "torch", input_dtype: str = "int64",
           hf: bool = False, compile: str = "none", loss_parallel: bool = False,
           moe_capacity_factor: Optional[float] = None, no_a2a_overlap: bool = False,
           cross_entropy: str = "te", tp_comm_overlap: bool = False) -> Inputs:
    shape = _shape(input_shape)
    model = hf_model(model, hf)
    precheck(model, gpu, nodes, gpus_per_node, cluster, shape, input_dtype)
    from autopar.cost_models.session import Inputs

    return Inputs(model=model, gpu=gpu, nodes=nodes, gpus_per_node=gpus_per_node, cluster=cluster,
                  seq_len=seq_len, dtype=dtype, profile=profile, placement=placement, trace=trace,
                  input_shape=shape, runtime=runtime, input_dtype=input_dtype, compile=compile,
                  loss_parallel=loss_parallel, moe_capacity_factor=moe_capacity_factor,
                  a2a_overlap=not no_a2a_overlap, cross_entropy=cross_entropy, tp_comm_overlap=tp_comm_overlap)


INPUT_DTYPES = ("int64", "float32", "bfloat16", "float16")


def hf_model(model: str, hf: bool) -> str:
    """``--hf``: the ``hf:`` model prefix (capture the transformers module itself)."""
    return model if not hf or model.startswith("hf:") else f"hf:{model}"


def _shape(text: Optional[str]) -> Optional[list[int]]:
    if not text:
        return None
    try:
        shape = [int(x) for x in text.split(",")]
    except ValueError:
        raise InputError(f"--input-shape={text}: comma-separated positive integers, e.g. 2,128") from None
    if any(d < 1 for d in shape):
        raise InputError(f"--input-shape={text}: every dimension must be at least 1")
    return shape


def precheck(model: str, gpu: Optional[str], nodes: Optional[int], gpus_per_node: Optional[int],
             cluster: Optional[str], shape: Optional[list[int]], input_dtype: str = "int64") -> None:
    """The common input errors (unknown preset, GPU or cluster, a malformed file) before the cost
    model and the planner load: a one-line error in a fraction of a second. Cheap to repeat:
    ``build_cost_model`` resolves the same names again."""
    from autopar.profiles.hw import load_cluster, load_gpu_profile
    from autopar.profiles.intake import resolve_model

    if input_dtype not in INPUT_DTYPES:
        raise InputError(f"--input-dtype={input_dtype} is not one of {', '.join(INPUT_DTYPES)}")
    resolve_model(model, input_shape=shape, input_dtype=input_dtype)
    if cluster:
        load_cluster(cluster, nodes=nodes, gpus_per_node=gpus_per_node, gpu=gpu)
    elif gpu:
        load_gpu_profile(gpu)


def console():
    """A rich console that does not wrap tables at 80 columns when stdout is a pipe. There it writes no
    colours, so it skips the highlighter's regular expressions (what they find would only be coloured)."""
    from rich.console import Console

    con = Console()
    return con if con.is_terminal else Console(width=140, highlight=False)


def print_json(obj) -> None:
    typer.echo(json.dumps(obj, indent=2, default=float))


def gib(x: float) -> str:
    return f"{x / 2**30:.1f} GiB"
