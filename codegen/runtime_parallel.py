"""Tensor/sequence parallel and data parallel (DDP, ZeRO, FSDP2); activation checkpointing is in runtime_ac.

Each ``apply_*`` takes one model part (the whole model, or one pipeline stage whose
missing layers were deleted) and modifies it in place; all work on the meta device except
``apply_dp`` in DDP mode, which wraps a materialized module (DDP broadcasts real tensors).
"""

from __future__ import annotations

import warnings

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor, Replicate, Shard
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    PrepareModuleInput,
    PrepareModuleInputOutput,
    RowwiseParallel,
    SequenceParallel,
    parallelize_module,
)

from autopar.codegen.runtime_mesh import ParallelMesh

# ----- tensor + sequence parallel ------------------------------------------------------
_COLWISE = ("wq", "wk", "wv", "wq_b", "wkv_b")   # attention projections split by heads


def apply_tp(model: nn.Module, mesh: ParallelMesh, sequence_parallel: bool = False) -> nn.Module:
    """Megatron tensor parallel with DTensor ``parallelize_module`` over the ``tp`` mesh dim.

    Attention: q/k/v (MLA: wq_b, wkv_b) column-wise (heads split), wo row-wise; dense MLP:
    w1/w3 column-wise, w2 row-wise; MoE: shared experts as a dense MLP, router and routed
    experts replicated (every tp rank routes the same tokens). Token embedding vocab-parallel
    (row-wise), output projection column-wise with the logits all-gathered (replicated), so
    the loss is the plain cross-entropy. With ``sequence_parallel`` the residual stream
    between sub-layers is split along the sequence (Korthikanti et al. 2022): norms run on
    ``Shard(1)``, an all-gather precedes each attention/MLP and a reduce-scatter follows it.
    """
    tp_mesh = mesh["tp"]
    if tp_mesh.size() == 1:
        return model
    seq, rep = Shard(1), Replicate()
    top = {}
    if model.tok_embeddings is not None:
        top["tok_embeddings"] = RowwiseParallel(input_layouts=rep, output_layouts=rep)
        if sequence_parallel:  # positions are added on the full sequence, then it is split
            top["emb_dropout"] = PrepareModuleInput(input_layouts=(rep,), desired_input_layouts=(seq,),
                                                    use_local_output=True)
    if model.norm is not None and sequence_parallel:
        top["norm"] = SequenceParallel()
    if model.output is not None:
        top["output"] = ColwiseParallel(input_layouts=seq if sequence_parallel else rep,
                                        output_layouts=rep, use_local_output=True)
    parallelize_module(model, tp_mesh, top)
    if model.tok_embeddings is not None and model.output is not None and model.spec.tie_embeddings:
        model.output.weight = model.tok_embeddings.weight  # both Shard(0) over the vocab: re-tie
    for block in model.layers.values():
        parallelize_module(block, tp_mesh, _block_plan(block, sequence_parallel))
        if hasattr(block.attention, "wkv_a"):
            _sum_rope_key_grad(block.attention, tp_mesh.get_group())
    return model


def _sum_rope_key_grad(attn: nn.Module, group) -> None:
    """MLA's decoupled RoPE key comes from the replicated ``wkv_a`` and is shared by all heads;
    each tp rank back-propagates only its heads' share, so its gradient is summed over tp
    (Megatron's "f" operator on that slice; the latent part reaches ``wkv_b``, which already
    does this)."""
    start = attn.kv_lora_rank

    def hook(module, args, out):
        return _SumGradColumns.apply(out, start, group)

    attn.wkv_a.register_forward_hook(hook)


class _SumGradColumns(torch.autograd.Function):
    """Identity forward; backward all-reduces the gradient of columns ``[start:]``."""

    @staticmethod
    def forward(ctx, x, start, group):
        ctx.start, ctx.group = start, group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone()
        part = grad[..., ctx.start:].contiguous()
        dist.all_reduce(part, group=ctx.group)
        grad[..., ctx.start:] = part
        return grad, None, None


def _block_plan(block: nn.Module, sp: bool) -> dict:
    seq, rep = Shard(1), Replicate()
    out = seq if sp else rep
    plan = {}
    if sp:
        plan["attention_norm"] = SequenceParallel()
        plan["attention"] = PrepareModuleInput(input_layouts=(seq, None, None), desired_input_layouts=(rep, None, None),
                                               use_local_output=True)
        plan["ffn_norm"] = SequenceParallel()
    for name in _COLWISE:
        if getattr(block.attention, name, None) is not None:
            plan[f"attention.{name}"] = ColwiseParallel()
    plan["attention.wo"] = RowwiseParallel(output_layouts=out)
    ff = block.feed_forward
    if hasattr(ff, "router"):  # MoE: only the shared experts are split; the rest is replicated
        if sp:  # the whole sequence enters the router, the output is split again
            plan["feed_forward"] = PrepareModuleInputOutput(
                input_layouts=(seq,), desired_input_layouts=(rep,), input_kwarg_layouts=None,
                output_layouts=(rep,), desired_output_layouts=(seq,), use_local_input=True, use_local_output=True)
        if ff.shared_experts is not None:
            plan.update(_mlp_plan("feed_forward.shared_experts", ff.shared_experts, rep))
        return plan
    if sp:
        plan["feed_forward"] = PrepareModuleInput(input_layouts=(seq,), desired_input_layouts=(rep,),
                                                  use_local_output=True)
    plan.update(_mlp_plan("feed_forward", ff, out))
    return plan


def _mlp_plan(prefix: str, mlp: nn.Module, out) -> dict:
    plan = {f"{prefix}.w1": ColwiseParallel(), f"{prefix}.w2": RowwiseParallel(output_layouts=out)}
    if hasattr(mlp, "w3"):
        plan[f"{prefix}.w3"] = ColwiseParallel()
    return plan


# ----- block list (also used by runtime_ac) -------------------------------------------
def blocks(model: nn.Module) -> list[nn.Module]:
    return list(block_list(model).children())


def block_list(model: nn.Module) -> nn.Module:
    layers = getattr(model, "layers", None)
    if isinstance(layers, (nn.ModuleDict, nn.ModuleList)):
        return layers
    for mod in model.modules():  # user modules: the first list of blocks
        if isinstance(mod, (nn.ModuleDict, nn.ModuleList)) and len(mod) > 0:
            return mod
    raise RuntimeError("model has no block list (nn.ModuleList / nn.ModuleDict)")


# ----- data parallel ------------------------------------------------------------------
def dp_mode(zero_stage: int, dp_cp: int, has_dtensor: bool, has_ep: bool, pipeline: bool = False) -> str:
    """Which torch API implements the data-parallel part of a plan.

    - ``none``: dp*cp = 1.
    - ``ddp``: zero 0/1 on plain parameters without a pipeline: ``DistributedDataParallel``
      (ZeRO-1 adds ``ZeroRedundancyOptimizer`` in ``make_optimizer``). Wraps a
      *materialized* module.
    - ``replicate``: zero 0 with tensor parallel (DTensor parameters, which DDP cannot hold)
      or with a pipeline (DDP's bucket rebuild breaks when schedules interleave microbatch
      backwards): FSDP2's ``replicate``, an all-reduce per block, no sharding.
    - ``fsdp2``: ZeRO-2 = ``fully_shard(reshard_after_forward=False)`` (parameters stay
      gathered from forward to backward, gradients and optimizer states sharded);
      ZeRO-3 = ``fully_shard`` (parameters re-gathered in backward). ZeRO-1 combined with
      tp, ep or pp also runs as ZeRO-2: ``ZeroRedundancyOptimizer`` cannot broadcast DTensors
      or expert shards that differ across ranks, nor sit on a pipelined DDP.
    """
    if dp_cp == 1:
        return "none"
    if zero_stage >= 2 or (zero_stage == 1 and (has_dtensor or has_ep or pipeline)):
        return "fsdp2"
    if has_dtensor or pipeline:
        return "replicate"
    return "ddp"


def apply_dp(model: nn.Module, mesh: ParallelMesh, zero_stage: int = 0, tp: int = 1,
             pipeline: bool = False) -> nn.Module:
    """Data parallel over the flattened ``dp_cp`` ranks (context-parallel ranks hold different
    tokens of the same sequences, so their gradients are averaged like data-parallel ones).

    Returns the module to train (DDP returns a wrapper). Expert parameters under expert
    parallel are replicated only over ``edp`` ranks: FSDP2 shards them over the ``edp`` mesh
    (when edp > 1); DDP and ``replicate`` leave them out. ``sync_grads`` finishes them."""
    experts = [m for m in model.modules() if getattr(m, "ep_group", None) is not None]
    mode = dp_mode(zero_stage, mesh.size("dp_cp"), tp > 1, bool(experts), pipeline)
    if mode == "none":
        return model
    if mode == "ddp":
        return _apply_ddp(model, mesh, experts)
    if mode == "replicate":
        return _apply_replicate(model, mesh, experts)
    from torch.distributed.fsdp import fully_shard

    reshard = zero_stage >= 3 and not pipeline  # a pipeline re-gathers per microbatch otherwise
    for ex in experts:
        if mesh.size("edp") > 1:  # FSDP averages over edp; sync_grads rescales to a dp*cp mean
            fully_shard(ex, mesh=mesh["edp"], reshard_after_forward=reshard)
            ex.grad_rescale = 1.0 / mesh.size("ep")
        else:  # nothing to shard them over: kept local, sync_grads averages their gradients
            ex.sync_outside_dp = True
    keep_local = bool(experts) and mesh.size("edp") == 1
    for block in blocks(model):  # one all-gather / reduce-scatter group per block
        fully_shard(block, mesh=mesh.dp_cp, reshard_after_forward=reshard,
                    ignored_params=_expert_params(block) if keep_local else None)
    fully_shard(model, mesh=mesh.dp_cp, reshard_after_forward=reshard,
                ignored_params=_expert_params(model) if keep_local else None)
    return model


def _apply_replicate(model: nn.Module, mesh: ParallelMesh, experts: list) -> nn.Module:
    from torch.distributed._composable.replicate_with_fsdp import replicate

    for ex in experts:  # kept out of the all-reduce; sync_grads averages them over edp
        ex.sync_outside_dp = True
    for block in blocks(model):  # one all-reduce per block, overlapping the backward
        replicate(block, mesh=mesh.dp_cp, ignored_params=_expert_params(block) or None)
    return replicate(model, mesh=mesh.dp_cp, ignored_params=_expert_params(model) or None)


def _expert_params(module: nn.Module) -> set:
    return {p for m in module.modules() if getattr(m, "ep_group", None) is not None for p in m.parameters()}


def _apply_ddp(model: nn.Module, mesh: ParallelMesh, experts: list) -> nn.Module:
    from torch.nn.parallel import DistributedDataParallel as DDP

    if any(p.device.type == "meta" for p in model.parameters()):
        raise RuntimeError("DDP wraps a materialized module: call apply_dp after materialize")
    if experts:  # expert shards differ across ep ranks: DDP must not average them
        keep = _expert_params(model)
        names = [n for n, p in model.named_parameters() if p in keep]
        DDP._set_params_and_buffers_to_ignore_for_model(model, names)
        for ex in experts:
            ex.sync_outside_dp = True
    device_ids = [model_device(model).index] if model_device(model).type == "cuda" else None
    with warnings.catch_warnings():  # torch asks rank-local buffers (expert ids) to keep this flag
        warnings.simplefilter("ignore", FutureWarning)
        return DDP(model, process_group=mesh.group("dp_cp"), device_ids=device_ids, broadcast_buffers=False)


def model_device(model: nn.Module) -> torch.device:
    p = next(model.parameters())
    return p.to_local().device if isinstance(p, DTensor) else p.device


# ----- gradients no wrapper owns --------------------------------------------------------
def sync_grads(parts: list[nn.Module], mesh: ParallelMesh) -> None:
    """Finish the gradients DDP/FSDP do not own (call after backward, before the optimizer).

    Expert weights are replicated over ``edp`` ranks only but receive gradients from the
    tokens of all dp*cp ranks: kept out of DDP/FSDP, they are summed over ``edp`` and divided
    by dp*cp (what data-parallel averaging means for them); sharded by FSDP over ``edp``
    (which averages over edp), they are scaled by edp/(dp*cp) = 1/ep (FSDP's
    ``set_gradient_divide_factor`` would do this but needs PREMUL_SUM, which gloo lacks).
    Embeddings tied across the two ends of a pipeline are summed over the stage pair."""
    for part in parts:
        inner = getattr(part, "module", part)  # DDP wraps
        for mod in inner.modules():
            if getattr(mod, "grad_rescale", None) is not None:
                for p in _with_grad(mod):
                    p.grad.mul_(mod.grad_rescale)
            if getattr(mod, "sync_outside_dp", False):
                _average_expert_grads(mod, mesh)
        for fqn, group in getattr(inner, "tied_grad_groups", []):
            _sum_tied_grad(inner.get_parameter(fqn), group)


def _with_grad(module: nn.Module) -> list:
    return [p for p in module.parameters() if p.grad is not None]


def _average_expert_grads(experts: nn.Module, mesh: ParallelMesh) -> None:
    for p in _with_grad(experts):
        if mesh.size("edp") > 1:
            dist.all_reduce(p.grad, group=mesh.group("edp"))
        p.grad.div_(mesh.size("dp_cp"))


def _sum_tied_grad(p: torch.Tensor, group) -> None:
    if p.grad is None:
        return
    if not isinstance(p.grad, DTensor):
        dist.all_reduce(p.grad, group=group)
        return
    if p.grad.placements != p.placements:  # a vocab-parallel embedding's gradient comes back Replicate
        p.grad = p.grad.redistribute(p.device_mesh, p.placements)
    dist.all_reduce(p.grad.to_local(), group=group)
