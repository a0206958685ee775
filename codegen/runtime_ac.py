"""Activation checkpointing: which tensors a block keeps for backward and which it recomputes.

Policies (``Strategy.recompute``; per layer through ``recompute_layers``):

- ``full``: checkpoint the whole block; only its input is kept.
- ``selective``: Megatron's selective recomputation - the attention core is recomputed.
- ``op``: torch's per-op selective activation checkpointing as torchtitan configures it
  (``torchtitan/distributed/activation_checkpoint.py``: ``_save_list`` and the per-op SAC policy):
  the outputs of matmuls are saved except every second one, the outputs of attention kernels,
  reduce-scatters and ``max`` (fp8 amax) are saved, everything else (norms, activations, RoPE,
  elementwise, all-gathers) is recomputed in backward. The cost model prices the same set from
  the captured graph (``profiles.layer_stats.op_policy``).
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from autopar.codegen.runtime_parallel import block_list


def _ignore_profiler_markers() -> None:
    """torch's selective checkpointing looks every op of the recompute up in what the forward
    stored; FSDP2 and replicate wrap their hooks in ``record_function`` markers, which run a
    different number of times in forward and recompute ("invocation index ... not found"). They
    carry no tensors, so they join ``SAC_IGNORED_OPS`` (torch's own set for such ops)."""
    from torch.utils import checkpoint

    prof = torch.ops.profiler
    checkpoint.SAC_IGNORED_OPS.update({prof._record_function_enter.default, prof._record_function_enter_new.default,
                                       prof._record_function_exit.default, prof._record_function_exit._RecordFunction})


_ignore_profiler_markers()


# ----- per-layer wrapping --------------------------------------------------------
def apply_ac(model: nn.Module, recompute: dict[int, str]) -> nn.Module:
    """Checkpoint blocks per layer: ``full`` recomputes the whole block in backward (keeps only
    its input); ``op`` checkpoints the whole block under the per-op policy (``op_context``);
    ``selective`` checkpoints the attention sub-layer and saves the outputs of its
    matmuls and collectives, so only the attention core (softmax(QK^T)V, masking, RoPE) is
    recomputed - Megatron's selective recomputation (Korthikanti et al. 2022, Sec. 5)."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    layers = block_list(model)
    for pos, (name, block) in enumerate(list(layers.named_children())):
        mode = recompute.get(int(name) if name.isdigit() else pos, "none")  # keys: global layer ids
        rng = has_dropout(block)  # the recompute must draw the forward's masks; else skip the RNG copies
        if mode == "full":
            layers.register_module(name, checkpoint_wrapper(block, preserve_rng_state=rng))
        elif mode == "selective":
            block.attention = checkpoint_wrapper(block.attention, preserve_rng_state=rng,
                                                 context_fn=_selective_context)
        elif mode == "op":  # the whole block, like full, but the policy keeps the listed op outputs
            layers.register_module(name, checkpoint_wrapper(block, preserve_rng_state=rng,
                                                            context_fn=op_context))
    return model


def has_dropout(block: nn.Module) -> bool:
    """Whether the block draws random numbers in training: an ``nn.Dropout`` with p > 0 or an
    attention module whose ``dropout`` probability is > 0 (``profiles.models.layers``). Only then
    does a recompute need the forward's RNG state back (``preserve_rng_state=True``)."""
    for m in block.modules():
        p = m.p if isinstance(m, nn.Dropout) else getattr(m, "dropout", 0.0)
        if isinstance(p, (int, float)) and not isinstance(p, bool) and p > 0:
            return True
    return False


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


# ----- per-op selective checkpointing (torchtitan's policy) --------------------------------
@functools.cache
def op_matmuls() -> frozenset:
    """The matmuls the policy counts: torchtitan counts ``aten.mm``; ``addmm`` (a linear with a
    bias) is the same matmul and is counted alike. Batched attention matmuls (``bmm``) are not."""
    aten = torch.ops.aten
    return frozenset({aten.mm.default, aten.addmm.default})


@functools.cache
def op_save_list() -> frozenset:
    """torchtitan's ``_save_list``: matmuls, the fused attention kernels (flash / memory-efficient /
    cuDNN; the CPU flash kernel stands in for them on CPU), reduce-scatter outputs (sequence
    parallel) and ``max`` (the amax of fp8 scaling)."""
    aten = torch.ops.aten
    attention = [getattr(aten, name).default for name in (
        "_scaled_dot_product_flash_attention", "_scaled_dot_product_efficient_attention",
        "_scaled_dot_product_cudnn_attention", "_scaled_dot_product_flash_attention_for_cpu") if hasattr(aten, name)]
    return op_matmuls() | frozenset(attention) | frozenset({
        torch.ops._c10d_functional.reduce_scatter_tensor.default, aten.max.default})


def op_policy(counts: dict):
    """The per-op policy: save what ``op_save_list`` names except every second matmul (counted
    separately in the forward and in the recompute, so both see the same choices)."""
    from torch.utils.checkpoint import CheckpointPolicy

    def policy(ctx, op, *args, **kwargs):
        key = "recompute" if ctx.is_recompute else "forward"
        if op in op_matmuls():
            counts[key] += 1
            if counts[key] % 2 == 0:  # every second matmul is recomputed: half the memory of saving all
                return CheckpointPolicy.PREFER_RECOMPUTE
        return CheckpointPolicy.MUST_SAVE if op in op_save_list() else CheckpointPolicy.PREFER_RECOMPUTE

    return policy


def op_context():
    """``context_fn`` of one block's checkpoint: a fresh matmul count per block and forward."""
    from torch.utils.checkpoint import create_selective_checkpoint_contexts

    return create_selective_checkpoint_contexts(op_policy({"forward": 0, "recompute": 0}))
