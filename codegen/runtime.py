"""Runtime of the training programs ``autopar emit`` writes.

``train.py`` imports this module (``from autopar.codegen import runtime as rt``) instead of
pasting it. One ``apply_<technique>`` per parallel technique, each mapping to torch-native
APIs (see docs/codegen.md):

- ``apply_pp`` / ``split_stages`` / ``pp_step``: ``torch.distributed.pipelining`` (runtime_pp)
- ``apply_tp``: DTensor ``parallelize_module``, sequence parallel (runtime_parallel)
- ``apply_cp``: all-gather K/V context parallel (runtime_cp)
- ``apply_ep``: expert parallel with all-to-all dispatch (runtime_moe)
- ``apply_ac``: activation checkpointing, full, selective or per-op (runtime_ac)
- ``apply_dp``: DDP, ZeRO-1 (+``ZeroRedundancyOptimizer``), ZeRO-2/3 (FSDP2) (runtime_parallel)

and the pieces around them: the mesh, strategy-independent weight initialisation,
synthetic or file data split over data/context-parallel ranks, the global-mean loss,
peak memory. Checkpoints live in ``runtime_ckpt`` (``torch.distributed.checkpoint``, plan-independent).
"""

from __future__ import annotations

import contextlib
import os
import time
from typing import TYPE_CHECKING

import torch
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor

from autopar.codegen.runtime_ac import apply_ac
from autopar.codegen.runtime_cp import apply_cp, cp_positions
from autopar.codegen.runtime_data import (
    DataError,
    TokenSampler,
    dp_rows,
    get_batch,
    local_batch,
    make_sampler,
    synthetic_batch,
)
from autopar.codegen.runtime_hf import apply_hf_tp, split_hf_stages
from autopar.codegen.runtime_mem import LiveTensorBytes, peak_memory_bytes, reset_peak_memory
from autopar.codegen.runtime_mesh import ParallelMesh, build_mesh, init_distributed, shutdown
from autopar.codegen.runtime_metrics import FlopBasis, MetricsLogger, StepProfiler, parse_step_list
from autopar.codegen.runtime_moe import apply_ep
from autopar.codegen.runtime_optim import clip_grad_norm_, current_lr, make_schedulers, seed_everything
from autopar.codegen.runtime_parallel import apply_dp, apply_tp, buffers_to, dp_mode, sync_grads
from autopar.codegen.runtime_pp import apply_pp, even_stages, lm_loss, pp_step, split_stages
from autopar.codegen.runtime_spec import RunSpec, load_run_spec
from autopar.codegen.runtime_zero1 import wait_params
from autopar.profiles.models import build_model
from autopar.profiles.models.layers import GroupedExperts

__all__ = [
    "LiveTensorBytes", "ParallelMesh", "apply_ac", "apply_cp", "apply_dp", "apply_ep", "apply_pp", "apply_tp",
    "apply_hf_tp", "split_hf_stages",
    "DataError", "FlopBasis", "MetricsLogger", "RunSpec", "StepProfiler", "TokenSampler", "clip_grad_norm_",
    "buffers_to", "current_lr", "dp_rows", "make_sampler", "make_schedulers", "parse_step_list", "seed_everything",
    "build_mesh", "build_meta_model", "cp_positions", "dp_mode", "even_stages", "get_batch", "init_distributed",
    "initial_values", "lm_loss", "local_batch", "make_optimizer",
    "materialize", "peak_memory_bytes", "pp_step", "reset_peak_memory", "shutdown",
    "split_stages", "sync_grads", "synthetic_batch", "train_step", "wait_params",
]

if TYPE_CHECKING:  # the run directory's runtime reads plans without pydantic (RunSpec)
    from autopar.core.model_spec import ModelSpec

_WRAPPER_PREFIXES = ("_checkpoint_wrapped_module.", "module.", "_orig_mod.")


# ----- model ------------------------------------------------------------------------
def load_spec(plan_path: str | os.PathLike) -> RunSpec:
    """The plan's model without pydantic (``runtime_spec``): nodes need only torch."""
    return load_run_spec(plan_path)


def build_meta_model(spec: ModelSpec) -> nn.Module:
    """The full model on the meta device: shapes only, no memory, built in well under a second."""
    return build_model(spec, "meta")


def initial_values(spec: ModelSpec, seed: int):
    """``(name, full tensor)`` per parameter, identical to a single-process initialisation:
    built-ins via ``Transformer.initial_values`` (shapes only), user modules by building them
    on the CPU under ``torch.manual_seed(seed)`` (their own initialisation)."""
    if spec.family != "custom":
        yield from build_meta_model(spec).initial_values(seed)
        return
    torch.manual_seed(seed)
    ref = build_model(spec, "cpu")
    yield from ref.named_parameters()
    yield from ref.named_buffers()  # user buffers (masks, tables) are garbage after to_empty


def clean_fqn(name: str) -> str:
    for prefix in _WRAPPER_PREFIXES:
        name = name.replace(prefix, "")
    return name


@torch.no_grad()
def materialize(parts: list[nn.Module], spec: ModelSpec, seed: int, device: torch.device) -> None:
    """Allocate the (already sharded) parameters on ``device`` and fill each with its piece of
    the full initial tensor, so every strategy starts from the single-process weights."""
    local: dict[str, list[tuple[nn.Module, nn.Parameter]]] = {}
    for part in parts:
        part.to_empty(device=device)
        if hasattr(part, "reset_buffers"):
            part.reset_buffers()  # position ids, RoPE tables (context parallel keeps its rows)
        for mod in part.modules():  # to_empty left the expert id buffers uninitialised
            if isinstance(mod, GroupedExperts):
                ids = getattr(mod, "local_expert_ids", None) or list(range(mod.w1.shape[0]))
                mod.expert_ids = torch.tensor(ids, device=device)
        named = list(part.named_parameters(remove_duplicate=False))
        if spec.family == "custom":
            named += list(part.named_buffers())
        for name, p in named:
            owner = part.get_submodule(name.rsplit(".", 1)[0]) if "." in name else part
            local.setdefault(clean_fqn(name), []).append((owner, p))
    if spec.family != "custom" and spec.tie_embeddings:
        local.setdefault("tok_embeddings.weight", []).extend(local.pop("output.weight", []))
    for name, full in initial_values(spec, seed):
        for owner, p in local.get(name, []):
            value = full[owner.local_expert_ids] if hasattr(owner, "local_expert_ids") else full
            _copy_into(p, value.to(p.dtype))


def _copy_into(p: torch.Tensor, value: torch.Tensor) -> None:
    if isinstance(p, DTensor):  # take this rank's shard of the full tensor, no communication
        value = distribute_tensor(value.to(p.to_local().device), p.device_mesh, p.placements,
                                  src_data_rank=None).to_local()
        p.to_local().copy_(value)
    else:
        p.copy_(value)


# ----- data -------------------------------------------------------------------------
# runtime_data: memory-mapped token files, the resumable sampler, dp rows and cp positions.


# ----- optimizer --------------------------------------------------------------------
def make_optimizer(parts: list[nn.Module], lr: float, weight_decay: float = 0.1, betas=(0.9, 0.95),
                   zero1: bool = False, mesh: ParallelMesh | None = None) -> list[torch.optim.Optimizer]:
    """AdamW per model part, decaying matrices only (nanoGPT). ``zero1`` (fp32 DDP plans): each
    data-parallel rank keeps the states of a partition of the parameters
    (``ZeroRedundancyOptimizer``). A part ``apply_dp`` prepared for ZeRO-1 (``zero1_buckets``:
    DTensor, expert, pipelined or 16-bit plans) gets ``ShardedAdamW`` (runtime_zero1)."""
    from autopar.codegen.runtime_zero1 import ShardedAdamW

    opts = []
    for part in parts:
        if getattr(part, "zero1_buckets", None) is not None:
            opts.append(ShardedAdamW(part.zero1_buckets, lr=lr, betas=betas, weight_decay=weight_decay))
            continue
        params = [p for p in part.parameters() if p.requires_grad]
        groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay},
                  {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
        if zero1:
            from torch.distributed.optim import ZeroRedundancyOptimizer

            opts.append(ZeroRedundancyOptimizer(groups, optimizer_class=torch.optim.AdamW,
                                                process_group=mesh.group("dp_cp"), lr=lr, betas=betas))
        else:
            opts.append(torch.optim.AdamW(groups, lr=lr, betas=betas))
    return opts


def optimizer_step(optimizers: list) -> None:
    for opt in optimizers:
        opt.step()
        opt.zero_grad(set_to_none=True)


# ----- training step ----------------------------------------------------------------
def precision(dtype: str, device: torch.device):
    """No autocast: a 16-bit plan's weights are 16-bit where they compute (FSDP2 / replicate
    ``MixedPrecisionPolicy``, or ZeRO-1's bf16 parameters with fp32 masters; ``apply_dp``), so
    parameters, gradients and collectives have the widths the cost model prices. Kept so
    programs emitted earlier still run."""
    return contextlib.nullcontext()


def _grad_sync(model: nn.Module, last: bool):
    """Skip the data-parallel reduction on all but the last microbatch (gradient accumulation)
    where gradients are full-size anyway (DDP, replicate). Sharded FSDP2 (ZeRO-2/3) reduce-
    scatters every microbatch: skipping it would accumulate unsharded gradients of the whole
    model on every rank, the memory ZeRO exists to save (and that plans do not count)."""
    if hasattr(model, "no_sync"):  # DDP
        return contextlib.nullcontext() if last else model.no_sync()
    if hasattr(model, "set_requires_gradient_sync"):  # FSDP2 / replicate
        from torch.distributed._composable.replicate_with_fsdp import ReplicateModule

        model.set_requires_gradient_sync(last or not isinstance(model, ReplicateModule))
    return contextlib.nullcontext()


def train_step(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, n_micro: int,
               autocast=contextlib.nullcontext()) -> torch.Tensor:
    """Forward/backward over ``n_micro`` microbatches of the rank's batch, gradients of the
    mean loss; returns the sum of token losses on this rank (for the global mean) as a device
    tensor: no host sync per micro-batch (the logger syncs once per logging interval)."""
    total = torch.zeros((), dtype=torch.float64, device=inputs.device)
    for i, (x, y) in enumerate(zip(inputs.chunk(n_micro), targets.chunk(n_micro))):
        with _grad_sync(model, i == n_micro - 1):
            with autocast:
                loss = lm_loss(model(x), y)
            (loss / n_micro).backward()
        total += loss.detach().double() * y.numel()
    return total


class StepTimer:
    """Wall time of one step (CUDA work synchronised), with the peak memory reset at start."""

    def __init__(self, device: torch.device, tracker: LiveTensorBytes | None = None):
        self.device, self.tracker = device, tracker

    def __enter__(self):
        self._sync()
        reset_peak_memory(self.device, self.tracker)
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self._sync()
        self.seconds = time.perf_counter() - self.t0
        self.peak_bytes = peak_memory_bytes(self.device, self.tracker)

    def _sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
