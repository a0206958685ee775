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
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    PrepareModuleInput,
    PrepareModuleInputOutput,
    RowwiseParallel,
    SequenceParallel,
    parallelize_module,
)

from autopar.codegen.runtime_mesh import ParallelMesh
from autopar.codegen.runtime_moe import SumGradColumns, route_local_tokens
from autopar.techniques.dp_program import dp_mode, whole_backward  # noqa: F401  (the program reads the one rule; re-exported)
from autopar.techniques.moe_program import moe_tokens_local

# ----- tensor + sequence parallel ------------------------------------------------------
_COLWISE = ("wq", "wk", "wv", "wq_b", "wkv_b")   # attention projections split by heads


def apply_tp(model: nn.Module, mesh: ParallelMesh, sequence_parallel: bool = False) -> nn.Module:
    """Megatron tensor parallel with DTensor ``parallelize_module`` over the ``tp`` mesh dim.

    Attention: q/k/v (MLA: wq_b, wkv_b) column-wise (heads split), wo row-wise; dense MLP:
    w1/w3 column-wise, w2 row-wise; MoE: shared experts as a dense MLP, router and routed
    experts replicated (every tp rank routes the same tokens; under sp with expert parallel each
    rank routes its own sequence shard, the shared experts gathering theirs:
    ``runtime_moe.route_local_tokens``).
    Token embedding vocab-parallel (row-wise), output projection column-wise with the logits
    all-gathered (replicated), so the loss is the plain cross-entropy. With ``sequence_parallel`` the residual stream
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
        ff = block.feed_forward
        if hasattr(ff, "router") and moe_tokens_local(sequence_parallel, mesh.size("ep"), mesh.size("etp")):
            route_local_tokens(ff, tp_mesh.get_group())
        parallelize_module(block, tp_mesh, _block_plan(block, sequence_parallel))
        if hasattr(block.attention, "wkv_a"):
            _sum_rope_key_grad(block.attention, tp_mesh.get_group())
        if hasattr(ff, "router") and ff.shared_experts is not None and not getattr(ff, "tokens_local", False):
            _moe_hooks(ff, tp_mesh, sequence_parallel)
    return model


def _sum_rope_key_grad(attn: nn.Module, group) -> None:
    """MLA's decoupled RoPE key comes from the replicated ``wkv_a`` and is shared by all heads;
    each tp rank back-propagates only its heads' share, so its gradient is summed over tp
    (Megatron's "f" operator on that slice; the latent part reaches ``wkv_b``, which already
    does this). The sums stay above ``q_norm`` / ``kv_norm`` (at wq_b's / wkv_b's input): summed
    below them, the norms' replicated weights would get Partial gradients."""
    start = attn.kv_lora_rank

    def hook(module, args, out):
        return SumGradColumns.apply(out, start, group)

    attn.wkv_a.register_forward_hook(hook)


def _partial_grad_input(tp_mesh):
    """Forward pre-hook: the module's (replicated) input as a Replicate DTensor whose gradient comes back
    Partial (each rank's share; the caller sums it once)."""
    def hook(module, args):
        x = DTensor.from_local(args[0], tp_mesh, [Replicate()], run_check=False, grad_placements=[Partial()])
        return (x, *args[1:])
    return hook


class _OnFirstRank(torch.autograd.Function):
    """A tensor every tp rank holds whole (routed experts' output, or the input gradient of a replicated
    module) as a Partial share: forward keeps it on the group's first rank, zeros elsewhere (the sum over
    ranks is the tensor); backward passes the gradient through (every rank's replica of the routed path
    receives the whole gradient, as a replicated module must). ``backward=True``: the other way round."""

    @staticmethod
    def forward(ctx, x, first, backward):
        ctx.first, ctx.backward = first, backward
        return x.view_as(x) if backward or first else torch.zeros_like(x)

    @staticmethod
    def backward(ctx, grad):
        return (grad if not ctx.backward or ctx.first else torch.zeros_like(grad)), None, None


def _moe_hooks(ff: nn.Module, tp_mesh, sp: bool) -> None:
    """MoE with shared experts under tp on the whole sequence (no sp, or experts replicated over tp: else
    ``runtime_moe.route_local_tokens``): one reduce-scatter (sp) or all-reduce each way, not an all-reduce
    per shared linear. The router and routed experts run replicated on the whole (gathered) sequence; the
    shared experts column-/row-parallel. Forward: the routed output, kept on the first tp rank
    (``_OnFirstRank``), plus the shared experts' Partial output is reduce-scattered (sp) or all-reduced
    once. Backward: the routed path's input gradient, kept on the first rank, plus the shared experts'
    Partial input gradient is reduced once by the input gather's backward. Qwen2-MoE's gate scales the
    shared output by a replicated linear of the input, whose weight gradient needs the whole shared
    output: there the shared experts all-reduce it in forward and the routed output is not split."""
    src, first = (Shard(1) if sp else Replicate()), tp_mesh.get_local_rank() == 0
    gated = ff.shared_gate is not None

    def gather(module, args):  # the sub-layer input, whole; its gradient is reduced from Partial shares
        x = args[0] if isinstance(args[0], DTensor) else DTensor.from_local(args[0], tp_mesh, [src], run_check=False)
        return (x.redistribute(tp_mesh, [Replicate()]).to_local(grad_placements=[Partial()]),)

    def scatter(module, args, out):  # Partial shares (gated: whole) -> this rank's part
        x = DTensor.from_local(out, tp_mesh, [Replicate() if gated else Partial()], run_check=False)
        return x.redistribute(tp_mesh, [src]).to_local()

    def grad_on_first(module, args):
        return (_OnFirstRank.apply(args[0], first, True), *args[1:])

    ff.register_forward_pre_hook(gather)
    ff.register_forward_hook(scatter)
    for mod in (ff.router, ff.experts, ff.shared_gate):
        if mod is not None:
            mod.register_forward_pre_hook(grad_on_first)
    if not gated:
        ff.experts.register_forward_hook(lambda m, a, out: _OnFirstRank.apply(out, first, False))
    ff.shared_experts.register_forward_pre_hook(_partial_grad_input(tp_mesh))


def _block_plan(block: nn.Module, sp: bool) -> dict:
    """One block's parallelize plan. The sub-layer input enters the column-parallel linears as a Replicate
    DTensor (torchtitan's plan): autograd sums their Partial input gradients and one collective reduces
    them (sp: the gather's reduce-scatter; else from_local's all-reduce), not one per linear (q, k, v;
    w1, w3). MLA: replicated wq_a / wkv_a take a local tensor (``_sum_rope_key_grad``); MoE with shared
    experts: ``_moe_hooks``."""
    seq, rep = Shard(1), Replicate()
    src = seq if sp else rep
    mla = hasattr(block.attention, "wkv_a")
    plan = {}
    if sp:
        plan["attention_norm"] = SequenceParallel()
        plan["ffn_norm"] = SequenceParallel()
    plan["attention"] = PrepareModuleInput(input_layouts=(src, None, None), desired_input_layouts=(rep, None, None),
                                           use_local_output=mla)
    for name in _COLWISE:
        if getattr(block.attention, name, None) is not None:
            plan[f"attention.{name}"] = ColwiseParallel()
    plan["attention.wo"] = RowwiseParallel(output_layouts=src)
    ff = block.feed_forward
    if not hasattr(ff, "router"):
        plan.update(_gathered_mlp_plan("feed_forward", ff, src))
    elif getattr(ff, "tokens_local", False):  # routed experts dispatching the rank's shard
        plan["feed_forward"] = PrepareModuleInput(input_layouts=(seq,), desired_input_layouts=(seq,),
                                                  use_local_output=True)
        if ff.shared_experts is not None:  # the MoE flattens its shard to [tokens, hidden]: dim 0 is split
            plan.update(_gathered_mlp_plan("feed_forward.shared_experts", ff.shared_experts, Shard(0)))
    elif ff.shared_experts is not None:  # the rest of the MoE is replicated (every tp rank routes the same tokens)
        gated = ff.shared_gate is not None
        plan.update(_mlp_plan("feed_forward.shared_experts", ff.shared_experts, rep if gated else Partial()))
    elif sp:  # routed experts only, replicated: the whole sequence enters the router, the output is split again
        plan["feed_forward"] = PrepareModuleInputOutput(
            input_layouts=(seq,), desired_input_layouts=(rep,), input_kwarg_layouts=None,
            output_layouts=(rep,), desired_output_layouts=(seq,), use_local_input=True, use_local_output=True)
    return plan


def _gathered_mlp_plan(prefix: str, mlp: nn.Module, src) -> dict:
    """An MLP taking its input in layout ``src`` (sp: a sequence shard, all-gathered here) and returning it so
    (sp: reduce-scattered), its input entering as a Replicate DTensor (``_block_plan``)."""
    prepare = PrepareModuleInput(input_layouts=(src,), desired_input_layouts=(Replicate(),), use_local_output=False)
    return {prefix: prepare, **_mlp_plan(prefix, mlp, src)}


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
def mp_policy(dtype: str):
    """FSDP2 mixed precision as priced: 16-bit compute weights, all-gathers and reduce-scatters
    (2-byte collectives), fp32 sharded weights and gradients for the optimizer. fp16/fp8 plans
    run bf16 (the emitted note says so)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    if dtype == "fp32":
        return MixedPrecisionPolicy()
    return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.bfloat16)


def offload_policy(offload: bool, device_type: str):
    """``CPUOffloadPolicy`` for optimizer offload: sharded parameters, their gradients and the
    AdamW states on the host; parameters copied in at each all-gather, gradients copied out
    after each reduce-scatter, the optimizer step on the CPU (priced in ``offload_step_time``)."""
    from torch.distributed.fsdp import CPUOffloadPolicy, OffloadPolicy

    return CPUOffloadPolicy(pin_memory=device_type == "cuda") if offload else OffloadPolicy()


def apply_dp(model: nn.Module, mesh: ParallelMesh, zero_stage: int = 0, tp: int = 1,
             pipeline: bool | str = False, offload: bool = False, dtype: str = "fp32",
             micro_batches: int = 0) -> nn.Module:
    """Data parallel over the flattened ``dp_cp`` ranks (context-parallel ranks hold different
    tokens of the same sequences, so their gradients are averaged like data-parallel ones).
    ``micro_batches``: backward passes per step of this part, which ZeRO-1 counts to reduce-scatter
    during the last one (0: after the backward, in ``sync_grads``).

    Returns the module to train (DDP returns a wrapper). Expert parameters under expert
    parallel are replicated only over ``edp`` ranks: FSDP2 shards (or ``replicate`` copies)
    them over the ``edp`` mesh; DDP leaves them out. ``sync_grads`` finishes them."""
    experts = [m for m in model.modules() if getattr(m, "ep_group", None) is not None]
    dtensor = tp > 1 or mesh.size("etp") > 1  # expert tensor parallel weights are DTensors too
    mode = dp_mode(zero_stage, mesh.size("dp_cp"), dtensor, bool(experts), bool(pipeline), offload, dtype)
    if mode == "none":
        return model
    if mode == "ddp":
        return _apply_ddp(model, mesh, experts)
    full_backward = whole_backward(pipeline)
    if mode == "zero1":
        return _apply_zero1(model, mesh, dtype, micro_batches if full_backward else 0)
    if mode == "replicate":
        return _apply_replicate(model, mesh, experts, mp_policy(dtype))
    from torch.distributed.fsdp import fully_shard

    # ZeRO-3 reshards after forward also under a pipeline (priced so: params / dp per rank,
    # re-gathered in each micro-batch's backward); ZeRO-2 and offload-without-ZeRO-3 keep them.
    # Zero-bubble schedules split backward into input- and weight-gradient passes: resharding
    # between them gave wrong losses in the contract sweep, so there parameters stay gathered and
    # torch's deferred reduce runs once per step (priced so: cost_models.fsdp.syncs_once_per_step).
    kw = dict(reshard_after_forward=zero_stage >= 3 and full_backward, mp_policy=mp_policy(dtype),
              offload_policy=offload_policy(offload, mesh.dp_cp.device_type))
    for ex in experts:  # FSDP averages over edp; sync_grads rescales to a dp*cp mean
        fully_shard(ex, mesh=mesh["edp"], **kw)
        ex.grad_rescale = mesh.size("edp") / mesh.size("dp_cp")
    for block in blocks(model):  # one all-gather / reduce-scatter group per block
        fully_shard(block, mesh=mesh.dp_cp, **kw)
    fully_shard(model, mesh=mesh.dp_cp, **kw)
    if pipeline:
        _prefetch_within_the_microbatch(model)
    if pipeline and full_backward:  # the schedule's name, or True
        _keep_per_microbatch_sharding(model)
    return model


def _prefetch_within_the_microbatch(model: nn.Module) -> None:
    """Each block's backward prefetches the block before it (the first block: the stage's root). FSDP2's
    default prefetches the group before it in the order of post-forwards, which runs across micro-batches:
    a pipeline stage forwards several before a backward, so a block whose predecessor there is the previous
    micro-batch's last block re-gathers that block just resharded by its own backward (counted on gloo:
    1.5x the priced gathers of a stage's last block, tests/test_pipeline_dp_sync.py)."""
    shards = blocks(model)
    for prev, block in zip([model, *shards], shards):
        block.set_modules_to_backward_prefetch([prev])


def _keep_per_microbatch_sharding(model: nn.Module) -> None:
    """``torch.distributed.pipelining`` turns FSDP's resharding after backward and its gradient
    reduce-scatter off for every micro-batch but the step's last (stage.backward_maybe_with_nosync):
    whole parameters and unsharded gradients then stay through the step, ZeRO-1 memory. ZeRO-2/3
    are priced sharded per micro-batch, as without a pipeline, so the stage's setters become no-ops
    on this part (the hooks run each micro-batch; the stage's final post-backward finds nothing
    left to reduce)."""
    def keep(*args, **kwargs) -> None:
        return None

    for name in ("set_reshard_after_backward", "set_requires_gradient_sync", "set_is_last_backward"):
        setattr(model, name, keep)


def buffers_to(parts: list[nn.Module], device) -> None:
    """Move every buffer (RoPE tables, position and expert ids) to ``device``: under optimizer
    offload the parts are materialized on the host, where FSDP2's CPUOffloadPolicy keeps the
    parameter shards, but the forward reads buffers on the device."""
    for part in parts:
        for mod in part.modules():
            for name, buf in list(mod._buffers.items()):
                if buf is not None:
                    mod._buffers[name] = buf.to(device)


def _apply_replicate(model: nn.Module, mesh: ParallelMesh, experts: list, mp) -> nn.Module:
    from torch.distributed._composable.replicate_with_fsdp import replicate

    half = mp.param_dtype is not None
    for ex in experts:
        if half:  # bf16 weights need the policy: their own all-reduce over edp, rescaled by sync_grads
            replicate(ex, mesh=mesh["edp"], mp_policy=mp)
            ex.grad_rescale = mesh.size("edp") / mesh.size("dp_cp")
        else:  # kept out of the all-reduce (no unsharded copy); sync_grads averages them over edp
            ex.sync_outside_dp = True
    ignored = set() if half else _expert_params(model)
    for block in blocks(model):  # one all-reduce per block, overlapping the backward
        replicate(block, mesh=mesh.dp_cp, mp_policy=mp, ignored_params=(ignored & set(block.parameters())) or None)
    return replicate(model, mesh=mesh.dp_cp, mp_policy=mp, ignored_params=ignored or None)


def _apply_zero1(model: nn.Module, mesh: ParallelMesh, dtype: str, backwards: int) -> nn.Module:
    """No wrapper: gradients accumulate whole on each rank over the micro-batches; one ``Bucket`` per
    reduction group (dense weights over dp*cp, expert weights over edp, both divided by dp*cp) and
    ``make_optimizer`` builds ``ShardedAdamW`` on them. The buckets reduce-scatter during the last of
    ``backwards`` backward passes (0: a zero-bubble schedule, whose weight gradients torch accumulates
    outside autograd's hooks: in ``sync_grads``) and gather after the step, waited in the forward
    pre-hook of each span's first module (Megatron-Core's overlapped distributed optimizer). A
    pipeline's tied embedding reduces last, after ``sync_grads`` summed it over the stage pair."""
    from autopar.codegen.runtime_zero1 import Bucket

    keep, late = _expert_params(model), [model.get_parameter(f) for f, _ in getattr(model, "tied_grad_groups", [])]
    n, edp = mesh.size("dp_cp"), mesh.size("edp")
    half = torch.float32 if dtype == "fp32" else torch.bfloat16
    params = list(model.parameters())
    model.zero1_buckets = [Bucket([p for p in params if p not in keep], mesh.group("dp_cp") if n > 1 else None, n,
                                  half, late, backwards)]
    if keep:
        model.zero1_buckets.append(Bucket([p for p in params if p in keep], mesh.group("edp") if edp > 1 else None,
                                          n, half, late, backwards))
    homes = _forward_homes(model)
    for bucket in model.zero1_buckets:
        bucket.land_before(homes)
    return model


def _forward_homes(model: nn.Module) -> dict[int, nn.Module]:
    """id of each parameter -> the module whose forward pre-hook waits for its all-gather: its block, else
    the root's child holding it (embeddings, final norm, output head), else the root."""
    homes: dict[int, nn.Module] = {}
    try:
        units = blocks(model)
    except RuntimeError:  # a user module without a block list
        units = []
    for top in [*units, *model.children(), model]:
        for p in top.parameters():
            homes.setdefault(id(p), top)
    return homes


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
    (which averages over edp), they are scaled by edp/(dp*cp) (FSDP's
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
        for bucket in getattr(inner, "zero1_buckets", []):  # ZeRO-1: the reduce-scatters left, after the tied sum
            bucket.reduce()


def _with_grad(module: nn.Module) -> list:
    return [p for p in module.parameters() if p.grad is not None]


def _average_expert_grads(experts: nn.Module, mesh: ParallelMesh) -> None:
    for p in _with_grad(experts):
        if mesh.size("edp") > 1:
            dist.all_reduce(p.grad.to_local() if isinstance(p.grad, DTensor) else p.grad, group=mesh.group("edp"))
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
