"""ZeRO-1 as priced: parameters and gradients replicated, optimizer states sharded.

``ShardedAdamW`` (Rajbhandari et al. 2020, ZeRO stage 1 / P_os): every data-parallel rank
keeps the whole model in the training dtype and accumulates whole gradients locally over
the micro-batches (no wrapper, no per-micro-batch reduction). At the step, each reduction
group (dp*cp for dense weights, edp for expert-parallel ones) reduce-scatters one flat
gradient bucket, so rank ``r`` receives the summed gradient of its ``1/n`` slice of every
parameter; AdamW updates the rank's fp32 master slice (its moments live only there), and
an all-gather of the updated slices, cast to the training dtype, rewrites every parameter.

This is what the cost model prices for zero=1: parameters ``P``, gradients ``G`` whole,
``K / n`` optimizer bytes (fp32 master + moments; K = 12 for 16-bit, 8 for fp32 where the
parameters are the master), one gradient-sized bucket in flight, reduce-scatter +
all-gather traffic with nothing beside it (``sync_grads`` reduces after the last backward, the
step gathers: ``cost_models.fsdp.syncs_after_backward`` prices the whole sync exposed). It works
on DTensor (tensor-parallel) parameters - each rank shards its local tensor - and on expert
shards that differ across ranks (their own group), which ``ZeroRedundancyOptimizer`` cannot.
Imports only torch (the emitted programs run without autopar's planner dependencies).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor


class _Slot:
    """One parameter's shard bookkeeping: this rank holds flat elements [start, start+size)."""

    def __init__(self, p: nn.Parameter, n: int, rank: int, chunk: int):
        self.p, self.n, self.chunk = p, n, chunk
        self.start = min(rank * chunk, p_numel(p))
        self.size = max(0, min(chunk, p_numel(p) - self.start))


def p_numel(p: torch.Tensor) -> int:
    return local(p).numel()


def local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


def _local_grad(p: nn.Parameter) -> torch.Tensor | None:
    """The gradient as a plain tensor laid out like the local parameter (a DTensor gradient
    that came back Replicate or Partial is redistributed to the parameter's placements)."""
    g = p.grad
    if g is None:
        return None
    if isinstance(g, DTensor) and g.placements != p.placements:
        g = g.redistribute(p.device_mesh, p.placements)
    return local(g)


class Bucket:
    """The parameters reduced over one process group, with one divisor (the data-parallel mean).

    ``reduce()`` (called by ``sync_grads`` after backward) leaves the mean gradient of this
    rank's slices in ``grad`` (fp32, [width]) and frees the whole gradients; gradient clipping
    reads and scales ``grad`` through ``shards()``; ``ShardedAdamW.step`` consumes it."""

    def __init__(self, params: list[nn.Parameter], group, divide: int):
        self.group, self.divide = group, divide
        self.n = dist.get_world_size(group) if group is not None else 1
        rank = dist.get_rank(group) if group is not None else 0
        self.slots = [_Slot(p, self.n, rank, -(-p_numel(p) // self.n)) for p in params]
        self.width = sum(s.chunk for s in self.slots)  # elements per rank in the flat bucket
        self.grad: torch.Tensor | None = None

    @torch.no_grad()
    def reduce(self, dtype: torch.dtype) -> None:
        """Reduce-scatter the whole gradients (in the training dtype: priced 2-byte collectives
        under bf16) so this rank holds the summed gradient of its slices, then divide."""
        if not self.slots:
            return
        device = local(self.slots[0].p).device
        flat = torch.zeros(self.n, self.width, dtype=dtype, device=device)
        col = 0
        for s in self.slots:
            g = _local_grad(s.p)
            if g is not None:
                padded = torch.zeros(s.chunk * self.n, dtype=dtype, device=device)
                padded[: g.numel()] = g.reshape(-1)
                flat[:, col: col + s.chunk] = padded.view(self.n, s.chunk)
            s.p.grad = None  # whole gradients are freed before the step's all-gather (priced peak)
            col += s.chunk
        out = flat.view(-1)
        if self.n > 1:
            out = torch.empty(self.width, dtype=dtype, device=device)
            dist.reduce_scatter_tensor(out, flat.view(-1), group=self.group)
        self.grad = out.float().div_(self.divide)

    def shards(self):
        """``(parameter, this rank's slice of its reduced gradient)`` for every parameter."""
        col = 0
        for s in self.slots:
            if self.grad is not None:
                yield s.p, self.grad[col: col + s.size]
            col += s.chunk

    @torch.no_grad()
    def all_gather(self, mine: torch.Tensor) -> None:
        """Every rank's updated slices -> the whole parameters (in their own dtype)."""
        full = mine
        if self.n > 1:
            full = torch.empty(self.n * self.width, dtype=mine.dtype, device=mine.device)
            dist.all_gather_into_tensor(full, mine, group=self.group)
        rows, col = full.view(self.n, self.width), 0
        for s in self.slots:
            data = local(s.p)
            data.view(-1).copy_(rows[:, col: col + s.chunk].reshape(-1)[: data.numel()])
            col += s.chunk


class ShardedAdamW(torch.optim.AdamW):
    """AdamW over this rank's fp32 master slices (its moments follow them), matrices decayed.

    ``buckets``: the ``Bucket``s ``apply_dp`` made; ``param_dtype``: the dtype the model trains
    in (the parameters are cast to it after the fp32 masters are taken). An ``AdamW`` so that
    learning-rate schedulers drive it like any optimizer."""

    def __init__(self, buckets: list[Bucket], lr: float, betas, weight_decay: float,
                 param_dtype: torch.dtype = torch.float32):
        self.buckets, self.param_dtype = buckets, param_dtype
        self.masters = [[self._master(s, param_dtype) for s in b.slots] for b in buckets]
        pairs = [(s, m) for b, ms in zip(buckets, self.masters) for s, m in zip(b.slots, ms)]
        super().__init__([{"params": [m for s, m in pairs if s.p.ndim >= 2], "weight_decay": weight_decay},
                          {"params": [m for s, m in pairs if s.p.ndim < 2], "weight_decay": 0.0}],
                         lr=lr, betas=betas)
        with torch.no_grad():
            for s, _ in pairs:  # in place (DTensors too): modules and checkpoints keep their parameters
                if s.p.dtype != param_dtype:
                    torch.utils.swap_tensors(s.p, nn.Parameter(s.p.detach().to(param_dtype)))

    @staticmethod
    def _master(s: _Slot, param_dtype: torch.dtype) -> torch.Tensor:
        """This rank's fp32 slice: a view of the parameter itself when it trains in fp32 (the cost
        model counts no separate master copy there: 4 + 4 + 8/n bytes), a copy under bf16 (the
        fp32 master inside the 12/n optimizer bytes)."""
        flat = local(s.p).detach().reshape(-1)[s.start: s.start + s.size]
        return flat if param_dtype == torch.float32 and s.p.dtype == torch.float32 else flat.float().clone()

    @torch.no_grad()
    def step(self, closure=None):
        for b, ms in zip(self.buckets, self.masters):
            if b.grad is None:
                b.reduce(self.param_dtype)  # sync_grads was not called
            for (_, g), m in zip(b.shards(), ms):
                m.grad = g
        super().step()
        for b, ms in zip(self.buckets, self.masters):
            if not b.slots:
                continue
            mine = torch.zeros(b.width, dtype=self.param_dtype, device=local(b.slots[0].p).device)
            col = 0
            for s, m in zip(b.slots, ms):
                mine[col: col + s.size] = m
                m.grad = None
                col += s.chunk
            b.grad = None
            b.all_gather(mine)

    def zero_grad(self, set_to_none: bool = True) -> None:
        for b in self.buckets:
            b.grad = None
            for s in b.slots:
                s.p.grad = None
