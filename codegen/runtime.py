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
peak memory, and checkpoints with ``torch.distributed.checkpoint``.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor

from autopar.codegen.runtime_ac import apply_ac
from autopar.codegen.runtime_cp import apply_cp, cp_positions
from autopar.codegen.runtime_mem import LiveTensorBytes, peak_memory_bytes, reset_peak_memory
from autopar.codegen.runtime_mesh import ParallelMesh, build_mesh, init_distributed, shutdown
from autopar.codegen.runtime_moe import apply_ep
from autopar.codegen.runtime_parallel import apply_dp, apply_tp, dp_mode, sync_grads
from autopar.codegen.runtime_pp import apply_pp, even_stages, lm_loss, pp_step, split_stages
from autopar.core.model_spec import ModelSpec
from autopar.profiles.models import build_model
from autopar.profiles.models.layers import GroupedExperts

__all__ = [
    "LiveTensorBytes", "ParallelMesh", "apply_ac", "apply_cp", "apply_dp", "apply_ep", "apply_pp", "apply_tp",
    "build_mesh", "build_meta_model", "cp_positions", "dp_mode", "even_stages", "get_batch", "init_distributed",
    "initial_values", "latest_checkpoint", "lm_loss", "load_checkpoint", "local_batch", "make_optimizer",
    "materialize", "peak_memory_bytes", "pp_step", "reset_peak_memory", "save_checkpoint", "shutdown",
    "split_stages", "sync_grads", "synthetic_batch", "token_file_batch", "train_step",
]

_WRAPPER_PREFIXES = ("_checkpoint_wrapped_module.", "module.", "_orig_mod.")


# ----- model ------------------------------------------------------------------------
def load_spec(plan_path: str | os.PathLike) -> ModelSpec:
    from autopar.core.plan import Plan

    return Plan.load(plan_path).model


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
def _generator(seed: int, step: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + step)


def synthetic_batch(seed: int, step: int, global_batch: int, seq_len: int, vocab: int) -> torch.Tensor:
    """Tokens ``[global_batch, seq_len + 1]``: a function of (seed, step) only, so every
    strategy trains on the same global batch and each rank takes its slice."""
    return torch.randint(0, vocab, (global_batch, seq_len + 1), generator=_generator(seed, step))


def token_file_batch(path: str, dtype: str, seed: int, step: int, global_batch: int, seq_len: int,
                     rows: slice = slice(None)) -> torch.Tensor:
    """Windows of a flat binary token file (nanoGPT's ``train.bin``: uint16 or int32), at
    offsets drawn from (seed, step); ``rows`` reads only this rank's share."""
    data = np.memmap(path, dtype=np.dtype(dtype), mode="r")
    if len(data) <= seq_len + 1:
        raise ValueError(f"--data {path}: {len(data)} tokens, fewer than seq_len+1 = {seq_len + 1}")
    starts = torch.randint(0, len(data) - seq_len - 1, (global_batch,), generator=_generator(seed, step))
    return torch.stack([torch.from_numpy(data[s: s + seq_len + 1].astype(np.int64)) for s in starts[rows].tolist()])


def dp_rows(mesh: ParallelMesh, global_batch: int) -> slice:
    """Rows of the global batch this rank's data-parallel index owns."""
    per = global_batch // mesh.size("dp")
    return slice(mesh.rank("dp") * per, (mesh.rank("dp") + 1) * per)


def local_batch(tokens: torch.Tensor, mesh: ParallelMesh, seq_len: int):
    """(inputs, targets) of this rank from its rows ``[b, seq_len + 1]``: its context-parallel positions."""
    pos = cp_positions(seq_len, mesh.size("cp"), mesh.rank("cp"))
    return tokens[:, :-1][:, pos].contiguous(), tokens[:, 1:][:, pos].contiguous()


def get_batch(data: str | None, data_dtype: str, seed: int, step: int, global_batch: int, seq_len: int,
              vocab: int, mesh: ParallelMesh, device: torch.device | None = None):
    """This rank's (inputs, targets) of step ``step``: synthetic tokens, or windows of ``data``."""
    rows = dp_rows(mesh, global_batch)
    if data:
        tokens = token_file_batch(data, data_dtype, seed, step, global_batch, seq_len, rows)
    else:
        tokens = synthetic_batch(seed, step, global_batch, seq_len, vocab)[rows]
    x, y = local_batch(tokens, mesh, seq_len)
    dev = device or _default_device()
    return x.to(dev), y.to(dev)


def _default_device() -> torch.device:
    if torch.cuda.is_available() and dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


# ----- optimizer --------------------------------------------------------------------
def make_optimizer(parts: list[nn.Module], lr: float, weight_decay: float = 0.1, betas=(0.9, 0.95),
                   zero1: bool = False, mesh: ParallelMesh | None = None) -> list[torch.optim.Optimizer]:
    """AdamW per model part, decaying matrices only (nanoGPT). ``zero1``: each data-parallel
    rank keeps the states of a partition of the parameters (``ZeroRedundancyOptimizer``)."""
    opts = []
    for part in parts:
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
    """fp32 runs as is; bf16 (and fp16/fp8 plans, see docs) under bf16 autocast with fp32 weights."""
    if dtype == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


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
               autocast=contextlib.nullcontext()) -> float:
    """Forward/backward over ``n_micro`` microbatches of the rank's batch, gradients of the
    mean loss; returns the sum of token losses on this rank (for the global mean)."""
    total = 0.0
    for i, (x, y) in enumerate(zip(inputs.chunk(n_micro), targets.chunk(n_micro))):
        with _grad_sync(model, i == n_micro - 1):
            with autocast:
                loss = lm_loss(model(x), y)
            (loss / n_micro).backward()
        total += loss.item() * y.numel()
    return total


def global_mean_loss(local_sum: float, contributes: bool, tokens: int, device: torch.device) -> float:
    """Mean loss over the global batch: the sum over the ranks that hold distinct tokens of the
    last stage (tp rank 0 of each dp/cp rank), all-reduced so every rank logs the same value."""
    t = torch.tensor([local_sum if contributes else 0.0], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.item() / tokens


def max_over_ranks(value: int, device: torch.device) -> int:
    t = torch.tensor([value], dtype=torch.int64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


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


# ----- checkpoints ------------------------------------------------------------------
def _state_dicts(parts: list[nn.Module], optimizers: list) -> tuple[list, list]:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    opts = StateDictOptions(flatten_optimizer_state_dict=True)
    models, optims = [], []
    for part, opt in zip(parts, optimizers):
        m, o = get_state_dict(part, getattr(opt, "optim", opt), options=opts)  # ZeRO-1: its local AdamW
        models.append(m)
        optims.append(o)
    return models, optims


def _per_expert(sd: dict, parts: list[nn.Module]) -> dict:
    """Expert-parallel weights differ across ranks under one name; give each expert its own key
    (``...experts.w1.expert5``) so the checkpoint holds every expert once, whatever the placement."""
    ids = {}
    for part in parts:
        for name, mod in part.named_modules():
            if hasattr(mod, "local_expert_ids"):
                for pname, p in mod.named_parameters():
                    ids[clean_fqn(f"{name}.{pname}")] = (mod.local_expert_ids, p)
    out = {}
    for key, val in sd.items():
        fqn = key.removeprefix("state.").rsplit(".", 1)[0] if key.startswith("state.") else key
        hit = ids.get(fqn)
        if hit is None or not isinstance(val, torch.Tensor) or val.ndim == 0:
            out[key] = val
            continue
        expert_ids, _ = hit
        local, offset = val, 0
        if isinstance(val, DTensor):  # FSDP over edp: this rank holds rows [offset, offset+n)
            from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

            offset = compute_local_shape_and_global_offset(val.shape, val.device_mesh, val.placements)[1][0]
            local = val.to_local()
        for j in range(local.shape[0]):
            out[f"{key}.expert{expert_ids[offset + j]}"] = local[j]
    return out


def _flat(dicts: list[dict], parts) -> dict:
    merged = {}
    for d in dicts:
        merged.update(d)
    return _per_expert(merged, parts)


def save_checkpoint(ckpt_dir: str | os.PathLike, step: int, parts: list[nn.Module], optimizers: list) -> Path:
    """Save model and optimizer (DCP, sharded: each rank writes its shards) as ``step_NNNNNNN``;
    written to a temporary folder renamed at the end, so a crash never leaves a partial one."""
    import torch.distributed.checkpoint as dcp

    models, optims = _state_dicts(parts, optimizers)
    path = Path(ckpt_dir) / f"step_{step:07d}"
    tmp = path.with_name(path.name + ".tmp")
    dcp.save({"model": _flat(models, parts), "optim": _flat(optims, parts), "train": {"step": step}},
             checkpoint_id=str(tmp))
    dist.barrier()
    if dist.get_rank() == 0:
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    dist.barrier()
    return path


def latest_checkpoint(ckpt_dir: str | os.PathLike) -> Path | None:
    found = sorted(p for p in Path(ckpt_dir).glob("step_*") if p.is_dir() and not p.name.endswith(".tmp"))
    return found[-1] if found else None


def load_checkpoint(path: str | os.PathLike, parts: list[nn.Module], optimizers: list) -> int:
    """Load a checkpoint saved by ``save_checkpoint`` (any rank layout DCP can reshard to) in
    place; returns the step it was saved at."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    models, optims = _state_dicts(parts, optimizers)
    state = {"model": _flat(models, parts), "optim": _flat(optims, parts), "train": {"step": 0}}
    dcp.load(state, checkpoint_id=str(path))  # fills the tensors above (views of the real ones)
    opts = StateDictOptions(flatten_optimizer_state_dict=True)
    for part, opt, m, o in zip(parts, optimizers, models, optims):
        set_state_dict(part, getattr(opt, "optim", opt), model_state_dict=m, optim_state_dict=o, options=opts)
    return int(state["train"]["step"])
