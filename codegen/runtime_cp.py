"""Context parallel: each ``cp`` rank holds a slice of every sequence.

Implementation: all-gather K/V attention (the variant Llama 3 uses for context parallel,
Llama 3 paper Sec. 3.3.2), not torch's experimental ring attention, which dispatches only
the CUDA SDPA kernels. Each rank keeps its queries, all-gathers keys and values over the
``cp`` group (backward: reduce-scatter of their gradients; grouped-query K/V once per K/V head,
repeated after the gather) and masks by global position, so the result equals full causal
attention up to summation order.

Load balance: the sequence is cut into ``2*cp`` chunks and rank ``c`` holds chunks ``c`` and
``2*cp-1-c``, so every rank gets the same share of the causal triangle.

Hooks, all outside the model code: the rank's position ids / RoPE tables replace the
model's buffers (the model slices them to the local length), and attention modules switch
to SDPA (mathematically the eager path) and run under a ``TorchFunctionMode`` that turns
``F.scaled_dot_product_attention(is_causal=True)`` into the gathered attention above.
"""

from __future__ import annotations

import torch
import torch.distributed._functional_collectives as fc
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from autopar.codegen.runtime_mesh import ParallelMesh


def cp_positions(seq_len: int, cp: int, rank: int) -> torch.Tensor:
    """Global positions held by context-parallel rank ``rank`` (load-balanced chunks)."""
    if cp == 1:
        return torch.arange(seq_len)
    chunk = seq_len // (2 * cp)
    first = torch.arange(rank * chunk, (rank + 1) * chunk)
    second = torch.arange((2 * cp - 1 - rank) * chunk, (2 * cp - rank) * chunk)
    return torch.cat([first, second])


def apply_cp(model: nn.Module, mesh: ParallelMesh, seq_len: int) -> nn.Module:
    """Shard the sequence over the ``cp`` mesh dim (see the module docstring)."""
    cp = mesh.size("cp")
    if cp == 1:
        return model
    group = mesh.group("cp")
    mine = cp_positions(seq_len, cp, mesh.rank("cp"))
    every = torch.cat([cp_positions(seq_len, cp, r) for r in range(cp)])  # gathered K/V order
    attns = [m for m in model.modules() if hasattr(m, "wo") and hasattr(m, "eager")]  # Attention / MLAttention
    mode = _GatheredAttention(group, mine, every, _kv_repeat(attns))
    for mod in attns:
        mod.eager = False
        _run_under(mod, mode)
    _shard_position_buffers(model, mine)
    return model


def _kv_repeat(attns: list[nn.Module]) -> int:
    """Query heads per K/V head (grouped-query attention repeats each K/V head this many times
    before SDPA); 1 for multi-head and latent attention (no ``wk``)."""
    a = next((m for m in attns if hasattr(m, "wk") and hasattr(m, "wq")), None)
    return a.wq.out_features // a.wk.out_features if a is not None else 1


def _run_under(module: nn.Module, mode: TorchFunctionMode) -> None:
    """Swap ``module``'s class for a subclass whose forward runs under ``mode`` (the
    FSDP2 trick: FQNs, parameters and hooks stay as they are)."""
    cls = module.__class__

    def forward(self, *args, **kwargs):
        with mode:
            return cls.forward(self, *args, **kwargs)

    module.__class__ = type(f"ContextParallel{cls.__name__}", (cls,), {"forward": forward})


def _shard_position_buffers(model: nn.Module, positions: torch.Tensor) -> None:
    """After ``reset_buffers`` rebuilds the full tables (at materialization), keep this rank's
    rows: the model slices ``[:local_len]`` and so reads exactly its own positions."""
    original = model.reset_buffers

    def reset_buffers():
        original()
        idx = positions.to(model.pos_ids.device)
        model.pos_ids = model.pos_ids[idx]
        if model.rope_cos is not None:
            model.rope_cos, model.rope_sin = model.rope_cos[idx], model.rope_sin[idx]

    model.reset_buffers = reset_buffers


class _GatheredAttention(TorchFunctionMode):
    def __init__(self, group, mine: torch.Tensor, every: torch.Tensor, rep: int = 1):
        super().__init__()
        self.group, self.rep = group, rep
        self.mine, self.every = mine, every
        self._mask: torch.Tensor | None = None

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention and kwargs.get("is_causal", False):
            return self.attention(*args, **kwargs)
        return func(*args, **kwargs)

    def attention(self, q, k, v, attn_mask=None, dropout_p=0.0, is_causal=True, **kw):
        k, v = self._gather(k), self._gather(v)  # [b, n, S, d]
        if self._mask is None or self._mask.device != q.device or self._mask.dtype != q.dtype:
            # query at position i sees keys at positions <= i, wherever they were gathered from. An
            # additive mask in q's dtype, built once: SDPA would convert a boolean one to this in every
            # layer and keep each copy for backward ([s/cp, s] per block); this one is shared by all
            seen = self.mine.to(q.device)[:, None] >= self.every.to(q.device)[None, :]
            self._mask = torch.zeros(seen.shape, dtype=q.dtype, device=q.device).masked_fill_(~seen, float("-inf"))
        return F.scaled_dot_product_attention(q, k, v, attn_mask=self._mask, dropout_p=dropout_p, **kw)

    def _gather(self, t: torch.Tensor) -> torch.Tensor:
        """All-gather one of K/V over the cp group along the sequence. Grouped-query K/V arrive
        repeated per query head (``repeat_interleave``: head ``j * rep + i`` is K/V head ``j``), so
        one copy of each K/V head is gathered and repeated after: ``rep`` times less traffic, the
        same tensors (their gradients sum over the copies either way)."""
        if self.rep == 1:
            return fc.all_gather_single_autograd(t.contiguous(), 2, self.group)
        one = fc.all_gather_single_autograd(t[:, ::self.rep].contiguous(), 2, self.group)
        return one.repeat_interleave(self.rep, dim=1)
