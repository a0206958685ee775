"""Learning-rate schedule and gradient clipping of the emitted programs (torchtitan's loop).

- ``lr_lambda`` / ``make_schedulers``: linear warm-up, then cosine or linear decay to
  ``min_lr_ratio * lr`` (nanoGPT / torchtitan), one ``LambdaLR`` per optimizer so
  checkpoints can save its state.
- ``clip_grad_norm_``: the global L2 norm of every gradient of the model, whatever holds
  it: DTensor shards (FSDP2, tensor parallel), plain replicas (DDP), expert-parallel experts
  (distinct on every ep rank), pipeline stages (distinct on every pp rank), a tied embedding
  held by the first and the last stage. Each rank adds the squares of what it holds divided
  by the number of ranks holding the same values, one all-reduce over the world sums them,
  so every element of the model counts exactly once and all ranks get the same norm.
"""

from __future__ import annotations

import math
import random
from typing import Literal

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor, Shard

Decay = Literal["cosine", "linear", "constant"]


def lr_lambda(i: int, warmup_steps: int, decay_steps: int, decay: Decay = "cosine",
              min_lr_ratio: float = 0.1) -> float:
    """Multiplier of the peak learning rate at optimizer step ``i`` (0-based): ``(i+1)/warmup``
    during warm-up (nanoGPT), then from 1 down to ``min_lr_ratio`` at ``decay_steps``
    (cosine: ``min + (1-min) (1 + cos(pi t)) / 2``; linear: ``1 - (1-min) t``), flat after."""
    if i < warmup_steps:
        return (i + 1) / warmup_steps
    if decay == "constant" or decay_steps <= warmup_steps:
        return 1.0
    t = min(1.0, (i - warmup_steps) / (decay_steps - warmup_steps))
    if decay == "linear":
        return 1.0 - (1.0 - min_lr_ratio) * t
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * t))


def make_schedulers(optimizers: list, warmup_steps: int, decay_steps: int, decay: Decay = "cosine",
                    min_lr_ratio: float = 0.1) -> list:
    """One ``LambdaLR`` per optimizer; ``step()`` each after the optimizer step."""
    def fn(i: int) -> float:
        return lr_lambda(i, warmup_steps, decay_steps, decay, min_lr_ratio)

    return [torch.optim.lr_scheduler.LambdaLR(opt, fn) for opt in optimizers]


def seed_everything(seed: int) -> None:
    """Python, CPU and CUDA generators from ``seed`` (dropout, anything the model draws); the
    weights come from ``materialize`` and the data order from the sampler, both seeded apart."""
    random.seed(seed)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def current_lr(optimizers: list) -> float:
    return float(optimizers[0].param_groups[0]["lr"])


# ----- gradient clipping ------------------------------------------------------------
def _copies(p: torch.Tensor, model_ranks: int, ep: int, expert: bool) -> int:
    """How many ranks of a pipeline stage hold the same values as this rank's ``p``: the
    stage has ``model_ranks = dp*cp*tp`` ranks; shards along DTensor ``Shard`` dims and
    experts along ``ep`` are distinct, everything else is a copy."""
    distinct = ep if expert else 1
    if isinstance(p, DTensor):
        for size, placement in zip(p.device_mesh.shape, p.placements):
            if isinstance(placement, Shard):
                distinct *= size
    return max(1, model_ranks // distinct)


def _expert_param_ids(parts: list[nn.Module]) -> set[int]:
    return {id(p) for part in parts for mod in part.modules() if hasattr(mod, "local_expert_ids")
            for p in mod.parameters()}


def _tied_param_ids(parts: list[nn.Module]) -> set[int]:
    """Tied embedding held by the first and the last pipeline stage: counted on each, halved."""
    out = set()
    for part in parts:
        for name, _group in getattr(part, "tied_grad_groups", []):
            out.add(id(part.get_parameter(_unwrapped_name(part, name))))
    return out


def _unwrapped_name(part: nn.Module, name: str) -> str:
    names = dict(part.named_parameters())
    if name in names:
        return name
    return next(k for k in names if k.endswith(name))


@torch.no_grad()
def grad_norm_sq_local(parts: list[nn.Module], model_ranks: int, ep: int = 1) -> torch.Tensor:
    """This rank's share of the squared global norm (fp32), before the all-reduce."""
    experts, tied = _expert_param_ids(parts), _tied_param_ids(parts)
    total = None
    seen: set[int] = set()
    for part in parts:
        for p in part.parameters():
            if p.grad is None or id(p) in seen:
                continue
            seen.add(id(p))
            if isinstance(p.grad, DTensor) and tuple(p.grad.placements) != tuple(p.placements):
                # the gradient in the weight's own layout: a norm under sequence parallel holds the
                # partial gradient of its tokens (Partial: summed once here, not at every optimizer
                # op); a vocab-parallel embedding's comes back whole (Replicate: this rank's rows)
                p.grad = p.grad.redistribute(p.grad.device_mesh, p.placements)
            g = p.grad.to_local() if isinstance(p.grad, DTensor) else p.grad
            sq = g.detach().float().pow(2).sum() / _copies(p, model_ranks, ep, id(p) in experts)
            if id(p) in tied:
                sq = sq / 2
            total = sq if total is None else total + sq
        for bucket in getattr(part, "zero1_buckets", []):  # ZeRO-1 (runtime_zero1): reduced slices,
            for p, g in bucket.shards():                    # distinct over the bucket's ranks
                sq = g.pow(2).sum() * bucket.n / _copies(p, model_ranks, ep, id(p) in experts)
                total = sq / (2 if id(p) in tied else 1) + (0.0 if total is None else total)
    if total is None:
        dev = next((p.device for part in parts for p in part.parameters()), torch.device("cpu"))
        total = torch.zeros((), device=dev if dev.type != "meta" else "cpu")
    return total


@torch.no_grad()
def clip_grad_norm_(parts: list[nn.Module], max_norm: float, model_ranks: int, ep: int = 1) -> torch.Tensor:
    """Global gradient norm over every rank (a 0-d tensor, no host sync) and, when
    ``max_norm > 0``, gradients scaled by ``min(1, max_norm / (norm + 1e-6))`` as
    ``torch.nn.utils.clip_grad_norm_`` does in one process. ``model_ranks = dp*cp*tp``."""
    sq = grad_norm_sq_local(parts, model_ranks, ep)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(sq)
    norm = sq.sqrt()
    if max_norm > 0:
        coef = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
        for part in parts:
            for p in part.parameters():
                if p.grad is not None:
                    g = p.grad.to_local() if isinstance(p.grad, DTensor) else p.grad
                    g.mul_(coef.to(g.device))
            for bucket in getattr(part, "zero1_buckets", []):
                if bucket.grad is not None:
                    bucket.grad.mul_(coef.to(bucket.grad.device))
    return norm
