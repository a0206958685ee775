"""Activation checkpointing: which tensors a block keeps for backward and which it recomputes.

Policies (``Strategy.recompute``; per layer through ``recompute_layers``):

- ``full``: checkpoint the whole block; only its input is kept.
- ``selective``: Megatron's selective recomputation - the attention core is recomputed.
- ``op``: torch's per-op selective activation checkpointing as torchtitan configures it.
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from autopar.codegen.runtime_parallel import block_list


# ----- per-layer wrapping --------------------------------------------------------
def apply_ac(model: nn.Module, recompute: dict[int, str]) -> nn.Module:
    """Checkpoint blocks per layer: ``full`` recomputes the whole block in backward (keeps only
    its input); ``selective`` checkpoints the attention sub-layer and saves the outputs of its
    matmuls and collectives, so only the attention core (softmax(QK^T)V, masking, RoPE) is
    recomputed - Megatron's selective recomputation (Korthikanti et al. 2022, Sec. 5)."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    layers = block_list(model)
    for pos, (name, block) in enumerate(list(layers.named_children())):
        mode = recompute.get(int(name) if name.isdigit() else pos, "none")  # keys: global layer ids
        if mode == "full":
            layers.register_module(name, checkpoint_wrapper(block, preserve_rng_state=False))
        elif mode == "selective":
            block.attention = checkpoint_wrapper(block.attention, preserve_rng_state=False,
                                                 context_fn=_selective_context)
    return model


@functools.cache
def _save_ops() -> frozenset:
    aten, c10d = torch.ops.aten, torch.ops._c10d_functional
    return frozenset({aten.mm.default, aten.addmm.default, aten.bmm.default, aten.linear.default,
                      c10d.all_gather_into_tensor.default, c10d.reduce_scatter_tensor.default,
                      c10d.all_reduce.default, c10d.wait_tensor.default})


def _selective_context():
    from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

    def policy(ctx, op, *args, **kwargs):
        # projections (2-D matmuls) and collectives are saved; the core is recomputed
        if op in _save_ops() and (op is not torch.ops.aten.bmm.default or _is_projection(args)):
            return CheckpointPolicy.MUST_SAVE
        return CheckpointPolicy.PREFER_RECOMPUTE

    return create_selective_checkpoint_contexts(policy)


def _is_projection(args) -> bool:
    """A batched matmul against a 2-D weight expanded to 3-D is a projection, not QK^T."""
    w = args[1] if len(args) > 1 else None
    return isinstance(w, torch.Tensor) and w.ndim == 3 and w.stride(0) == 0
