"""Per-GPU memory of the programs a runtime other than autopar's own runs (``--runtime torchtitan``; Megatron-Core's
saved block bytes: ``fused_saved``).

``CostModel.rank_memory`` prices autopar's emitted programs; with ``PricingContext.runtime ==
"torchtitan"`` it hands its per-rank components to ``torchtitan_memory``, which re-prices what
torchtitan does differently. Outside a pipeline torchtitan runs what autopar emits (FSDP2 blocks
resharded after forward, per-op SAC, DTensor TP + SP, ``loss_parallel``): nothing changes. Under a
pipeline (torchtitan at the Dec 2024 benchmark commit 9dec370 on torch 2.6, read in torchtitan's
``parallelize_llama.apply_fsdp`` / ``pipeline_llama`` and torch's ``distributed.pipelining``):

- ``apply_fsdp(pp_enabled=True)`` sets ``reshard_after_forward=False`` on every block and the root
  ("do not reshard after forward to avoid per-microbatch all-gathers"), and the pipeline stage runs
  every backward but the last micro-batch's with ``set_reshard_after_backward(False)``: the stage's
  parameters stay gathered in ``param_dtype`` (bf16) for the whole step (``gathered_param_bytes``);
- the same stage call (``PipelineStage.backward_maybe_with_nosync``) turns gradient sync off but on
  the last micro-batch, and FSDP2 keeps the unsharded gradients in ``reduce_dtype`` (torchtitan:
  fp32) meanwhile (``FSDPParam.to_accumulated_grad_if_needed``): ``nosync_grad_bytes``; they exist
  from a rank's first backward on, beside the activations still in flight
  (``activations_beside_grads``); the sharded gradients are ``None`` until the last reduce-scatter
  (``zero_grad(set_to_none=True)`` each step);
- stage-to-stage tensors are the local block outputs, split along the sequence under SP
  (torchtitan's TP plan: ``RowwiseParallel(output_layouts=Shard(1))``): ``boundary_bytes``; every
  stage allocates one receive buffer per micro-batch for activations and one for gradients
  (``_prepare_forward_infra`` / ``_prepare_backward_infra``: ``recv_buffer_bytes``) and keeps each
  in-flight micro-batch's output in ``fwd_cache`` until its backward;
- the last stage appends every micro-batch's output to ``output_chunks`` (merged at the end of
  ``step``): the logits, vocabulary-sharded under ``loss_parallel``, for all but the current
  micro-batch on top of its loss phase (``retained_logits_bytes``). They are 16-bit as in
  torchtitan 0.1.0's source (``Transformer.forward`` returns ``self.output(h)``, the loss function
  upcasts); a 2024 model that returned ``self.output(h).float()`` would retain twice that (not
  verified for 9dec370);
- the ZeRO-3 prefetch buffers of ``_comm_buffer_bytes`` do not exist (everything is gathered) and
  a layer's recompute workspace adds only its excess over the loss phase.

Not modelled: FSDP float8 all-gather (``enable_fsdp_float8_all_gather``, fp8 gathered linears).
"""

from __future__ import annotations

from dataclasses import replace

from autopar.core.gpu import VIEW_OUTPUT_STACKS
from autopar.core.strategy import Strategy
from autopar.cost_models import fsdp
from autopar.cost_models.layer_cost import LayerCost, shards_for
from autopar.cost_models.layer_model import expert_gate_gemm, saved_bytes, terms_bytes, tied_copy_params
from autopar.cost_models.loss_memory import gathered_loss_bytes, logits_bytes
from autopar.cost_models.megatron_ops import glu_clamp_saved_bytes
from autopar.cost_models.memory import (
    bytes_per_param,
    expert_rank_excess,
    expert_shard_group,
    megatron_block_bytes,
    model_state_bytes,
    zero1_reduce_bytes,
)

FP32_BYTES = 4  # torchtitan's mixed_precision_reduce default


def torchtitan_stages(layers: int, n: int) -> list[tuple[int, int]]:
    """How torchtitan splits ``layers`` blocks into ``n`` pipeline stages when the job names no split
    points (``pipelining_utils.generate_split_points`` at 9dec370: ``n`` = pp x stages per rank, 1
    for single-stage schedules, 2 for looped ones): ``layers // n`` per stage, the remainder one
    each to the middle stages from the second on, so the first and the last stage are the short
    ones (autopar's ``even_stages`` lengthens the first)."""
    base, extra = divmod(layers, n)
    bounds = [0, base]
    for _ in range(n - 2):
        bounds.append(bounds[-1] + base + (1 if extra > 0 else 0))
        extra -= 1
    bounds = bounds[:n] + [layers]
    return [(bounds[j], bounds[j + 1]) for j in range(n)]


def gathered_param_bytes(stage_params: float, param_bytes: int) -> float:
    """Parameters FSDP2 holds gathered for the whole step under torchtitan's pipeline
    (``apply_fsdp``: ``reshard_after_forward = False`` if ``pp_enabled``): every parameter of the
    rank's stages (already divided by tp) in ``param_dtype``."""
    return stage_params * param_bytes


def nosync_grad_bytes(stage_params: float, block_params: float, grad_bytes: int,
                      accum_bytes: int = FP32_BYTES) -> float:
    """Unsharded gradients accumulated across micro-batches without sync: ``reduce_dtype`` copies
    (torchtitan: fp32) of every stage parameter (torch ``FSDPParam.to_accumulated_grad_if_needed`` /
    ``accumulate_unsharded_grad_if_needed``) plus one block's 16-bit gradients before they are added."""
    return stage_params * accum_bytes + block_params * grad_bytes


def activations_beside_grads(per_microbatch: float, in_flight: float, microbatches: int, grads: float) -> float:
    """The activation bytes to add to the accumulated gradients ``grads`` for the rank's peak. In
    the 1F1B steady state ``in_flight`` micro-batches are live with the gradients; a rank whose
    warm-up runs every micro-batch forward (``in_flight >= m``) peaks either at the end of its
    warm-up (every micro-batch, no gradients yet) or after its first backward (one fewer, with
    the gradients), whichever is larger."""
    if in_flight < microbatches:
        return per_microbatch * in_flight
    return max(per_microbatch * in_flight - grads, per_microbatch * (in_flight - 1))


def schedule_order(warm: int, p: int, m: int, v: int, schedule: str) -> list[tuple[str, int]] | None:
    """The ops one pipeline rank runs, ``("F" | "B", local stage)``, as torch's schedules of Dec 2024
    (torch 2.6 ``distributed.pipelining.schedules``) order them, given the rank's ``warm`` warm-up
    forwards; None for schedules not listed. ``Schedule1F1B``: ``min(m, p - rank)`` warm-up forwards,
    then backward / forward pairs. ``ScheduleInterleaved1F1B``: ``(v - 1) * per_round + 2 * (p - 1 -
    rank)`` warm-up forwards (at most ``m * v``; ``per_round = m // max(1, m // p)``), then forward /
    backward pairs; the k-th forward runs local stage ``(k // per_round) % v``, the k-th backward
    ``v - 1 -`` that (``pipeline.in_flight_microbatches`` gives the warm-up, + 1, in micro-batches)."""
    if schedule == "gpipe":
        return [("F", 0)] * m + [("B", 0)] * m
    if schedule == "1f1b":
        return [("F", 0)] * warm + [op for _ in range(m - warm) for op in (("B", 0), ("F", 0))] + [("B", 0)] * warm
    if schedule != "interleaved":
        return None
    per_round, n = m // max(1, m // p), m * v
    warm = min(warm, n)
    fwd = [("F", (k // per_round) % v) for k in range(n)]
    bwd = [("B", v - 1 - (k // per_round) % v) for k in range(n)]
    steady = [op for i in range(n - warm) for op in (fwd[warm + i], bwd[i])]
    return fwd[:warm] + steady + bwd[n - warm:]


def peak_beside_grads(order: list[tuple[str, int]], chunk: list[float], grads: float) -> float:
    """The activation bytes at a rank's peak beside its accumulated gradients, replaying ``order``
    (``schedule_order``): ``chunk[j]`` bytes per in-flight micro-batch of local stage j; a stage's
    unsharded gradients (``grads`` / stages) exist from its first backward on. Returns the peak of
    activations + gradients minus ``grads`` (the gradients component counts them whole)."""
    v = len(chunk)
    live, started, peak = 0.0, set(), 0.0
    for kind, j in order:
        if kind == "F":
            live += chunk[j]
        else:
            live -= chunk[j]
            started.add(j)
        peak = max(peak, live + grads * len(started) / v)
    return peak - grads


def boundary_bytes(s: Strategy, seq_len: int, hidden: int, dtype_bytes: int) -> float:
    """One stage-to-stage tensor: the block output ``[mbs, s/cp, h]``, sequence-split over tp under
    sequence parallelism (torchtitan's TP plan leaves the residual stream ``Shard(1)`` local)."""
    split = s.tp if s.sequence_parallel else 1
    return s.micro_batch * seq_len / s.cp / split * hidden * dtype_bytes


def recv_buffer_bytes(microbatches: int, links: int, boundary: float) -> float:
    """torch.distributed.pipelining allocates a receive buffer per micro-batch for every local stage
    link (activations into a non-first stage, gradients into a non-last one), up front
    (``_create_act_recv_info`` / ``_create_grad_recv_info`` per chunk)."""
    return microbatches * links * boundary


def retained_logits_bytes(s: Strategy, seq_len: int, vocab: int, vocab_split: int, logit_bytes: int) -> float:
    """The last stage's ``output_chunks`` (torch ``PipelineStage.forward_one_chunk``): the logits of
    every micro-batch but the current one (whose loss phase ``layer_cost`` prices),
    ``[mbs, s/cp, V/split]`` each."""
    per_microbatch = s.micro_batch * seq_len / s.cp * vocab / vocab_split * logit_bytes
    return (s.num_micro_batches - 1) * per_microbatch


def torchtitan_memory(cm, s: Strategy, parts: list[LayerCost], modes: list[str],
                      extra: list[LayerCost], in_flight: float, first: bool, last: bool,
                      mem: dict[str, float]) -> dict[str, float]:
    """``mem`` (``CostModel.rank_memory``'s components) as torchtitan runs the strategy (module
    docstring); unchanged without a pipeline or without FSDP (ZeRO-2/3: under a pipeline torchtitan runs both
    as one program, ``reshard_after_forward=False``; ``fsdp.syncs_once_per_step`` prices its time; optimizer
    offload is that program at any stage, ``fsdp_copy.program``, its shards on the host). ``cm``:
    the ``CostModel`` (not imported: estimate.py imports this module)."""
    if s.pp == 1 or (s.zero_stage < 2 and not s.offload_optimizer) or not parts:
        return mem
    pbytes = cm.ctx.dtype_bytes
    dense = sum(c.params_dense for c in parts + extra)
    expert = sum(c.params_expert for c in parts)
    block = max(c.params_dense + c.params_expert for c in parts)
    grads = nosync_grad_bytes(dense + expert, block, pbytes)
    boundary = boundary_bytes(s, cm.seq_len, cm.spec.hidden or 1, pbytes)
    m = s.num_micro_batches
    acts = sum(c.act_bytes[mo] for c, mo in zip(parts, modes)) / s.vpp  # one chunk (even stages)
    # the loss's saved tensors: one micro-batch (the last stage runs each loss's backward next)
    loss_acts = sum(c.act_bytes["none"] for c in extra)
    work = max(c.work_bytes[mo] for c, mo in zip(parts, modes))
    outputs = in_flight * s.vpp * boundary  # each in-flight chunk's stage output, in fwd_cache
    if last:
        split = s.tp if cm.ctx.loss_parallel and s.tp > 1 else 1
        outputs += retained_logits_bytes(s, cm.seq_len, cm.spec.vocab, split, pbytes)
    # the ZeRO-3 gradient shards are None during the step (zero_grad(set_to_none=True)) until the
    # last micro-batch's reduce-scatter: the unsharded fp32 accumulators stand in their place
    # (torchtitan shards expert weights over its expert-data-parallel mesh when ep > 1)
    dense3, expert3 = model_state_bytes(dense, cm.dtype, 3, s.dp * s.cp), \
        model_state_bytes(expert, cm.dtype, 3, s.edp if s.ep > 1 else s.dp * s.cp)
    shards = 0.0 if s.offload_optimizer else dense3.grads + expert3.grads  # CPUOffloadPolicy: on the host
    at_rest = mem["parameters"] if s.zero_stage >= 3 else dense3.params + expert3.params  # ZeRO-2 as ZeRO-3
    at_rest = 0.0 if s.offload_optimizer else at_rest
    return {**mem,
            "parameters": at_rest + gathered_param_bytes(dense + expert, pbytes),
            "gradients": mem["gradients"] - shards + grads,
            "activations": _activations(s, modes, acts, boundary, in_flight, first, grads) + loss_acts,
            "recompute_workspace": max(0.0, work - mem["logits_and_temporaries"]),
            "comm_buffers": 0.0,
            "pipeline_buffers": recv_buffer_bytes(m, 2 * s.vpp - first - last, boundary) + outputs}


def _activations(s: Strategy, modes: list[str], chunk: float, boundary: float, in_flight: float, first: bool,
                 grads: float) -> float:
    """Activations beside the gradients at the rank's peak, replaying its schedule (``schedule_order``;
    others: ``activations_beside_grads``). Under full recompute a non-first stage's first block
    input is the receive buffer itself (non-reentrant checkpoint keeps its inputs alive, the stage's
    first input is ``args_recv_info[chunk].buffer``), already counted in the pipeline buffers."""
    v = s.vpp
    warm = round(in_flight * v) - (1 if s.schedule == "interleaved" else 0)
    order = schedule_order(warm, s.pp, s.num_micro_batches, v, s.schedule)
    if order is None:
        return activations_beside_grads(chunk * v, in_flight, s.num_micro_batches, grads)
    recv = boundary if all(mo == "full" for mo in modes) else 0.0
    per_stage = [chunk - (0.0 if first and j == 0 else recv) for j in range(v)]
    return peak_beside_grads(order, per_stage, grads)


def deferred_fsdp_memory(cm, s: Strategy, parts: list[LayerCost], extra: list[LayerCost], last: bool,
                         mem: dict[str, float]) -> dict[str, float]:
    """``mem`` (``CostModel.rank_memory``'s components) as autopar's program runs FSDP2 under a
    zero-bubble schedule (``fsdp.deferred``: torch's deferral kept, one gather and one reduce-scatter
    per unit per step). ZeRO-2 and optimizer offload shard with ``reshard_after_forward=False``, so
    the stage's parameters are gathered for the whole step as priced already; what changes is the
    gradients: every micro-batch's backward accumulates into the unsharded gradients of every stage
    parameter (``nosync_grad_bytes`` without the cast: autopar's ``MixedPrecisionPolicy`` reduces in
    the compute dtype, so autograd accumulates in place, ``FSDPParam.to_accumulated_grad_if_needed``
    returns early), held to the stage's ``REDUCE_GRAD``; the sharded gradients are ``None`` until then
    (``zero_grad(set_to_none=True)``), and the one block's unsharded gradients ``_comm_buffer_bytes``
    counts are among them. ZeRO-3 under these schedules is an emit-rule refusal (``techniques.pipeline``).
    Unchanged for other runtimes, schedules, and programs without FSDP2 (``codegen.runtime_parallel.dp_mode``)."""
    n = s.dp * s.cp
    if not parts or not fsdp.plan_holds_stage_grads(cm, s):
        return mem
    gbytes = bytes_per_param(cm.dtype)[1]
    dense = sum(c.params_dense for c in parts + extra)
    dense += tied_copy_params(cm.output, s.pp, s.tp) if last else 0.0
    expert = sum(c.params_expert for c in parts)
    block = max(c.params_dense + c.params_expert for c in parts)
    edp = expert_shard_group(s, "torch")
    shards = 0.0 if s.offload_optimizer else (model_state_bytes(dense, cm.dtype, 2, n).grads
                                              + model_state_bytes(expert, cm.dtype, 2, edp).grads)
    return {**mem,
            "gradients": mem["gradients"] - shards + nosync_grad_bytes(dense + expert, 0.0, gbytes, gbytes),
            "comm_buffers": max(0.0, mem["comm_buffers"] - block * gbytes)}


def replicated_embedding_grad(cm, s: Strategy) -> float:
    """DTensor's vocab-parallel embedding backward gives every tp rank the full-vocabulary gradient
    ((tp-1)/tp of it beyond the shard); Megatron's VocabParallelEmbedding keeps the shard."""
    if s.tp == 1 or cm.embedding is None or cm.ctx.runtime == "megatron":
        return 0.0
    return cm.embedding.params_vocab * (1 - 1 / s.tp) * bytes_per_param(cm.dtype)[1]


def zero1_bucket_bytes(cm, s: Strategy, dense: float, expert: float, first: bool, last: bool) -> float:
    """``memory.zero1_reduce_bytes`` of a rank holding the input embedding (``first``) and / or the output head
    (``last``): the vocab-parallel tables the program's dense bucket reduces alone, at the ends ``fsdp.zero1_ends``
    puts them."""
    ends = fsdp.zero1_ends(cm, s, first, last)
    table = vocab_local_numel(cm, s) if cm.embedding is not None else 0.0
    first_numel = table if ends.head_first else 0.0
    last_numel = table if ends.table_last or ends.tied_last else 0.0
    dense += tied_copy_params(cm.output, s.pp, s.tp) if last else 0.0   # its gradient is in the bucket too
    return zero1_reduce_bytes(dense, expert, s, cm.dtype, first_numel, last_numel)


def vocab_local_numel(cm, s: Strategy) -> float:
    """Elements of a rank's shard of a vocab-parallel table (``cm.embedding.params_vocab``: vocab x hidden):
    DTensor's ``Shard(0)`` over tp gives the first ranks ``ceil(vocab / tp)`` rows."""
    total, spec = cm.embedding.params_vocab, cm.spec
    if spec.vocab and spec.hidden and spec.vocab * spec.hidden == total:
        return float(-(-spec.vocab // s.tp) * spec.hidden)
    return total / s.tp


def fused_saved(cost, template, s: Strategy, cm):
    """``cost`` (a ``LayerCost`` of ``template``) with a block's saved bytes without recompute
    (``act_bytes["none"]``) counted by ``megatron_block_bytes`` under Megatron-Core (``cm``: the
    ``CostModel``, its spec and pricing context), so that the estimate, the recompute choice and the
    stage partition all see them. An MoE block keeps its captured expert and router tensors (dispatched
    tokens, grouped fc1 / activation outputs, routing probabilities) and swaps only the rest, its norms
    and attention; a clamped gated activation adds its copy (``glu_clamp_copy_bytes``) in every mode that
    keeps the experts' tensors, and the SiLU output its fused bias-SwiGLU does not keep is taken off
    (``fused_swiglu_unsaved_bytes``). Other layers, other runtimes and the recompute modes keep the captured bytes."""
    if template.kind != "block":
        return cost
    block = closed_form_saved(template, cost.act_bytes["none"], s, cm)
    experts = glu_clamp_copy_bytes(template, s, cm.ctx) - fused_swiglu_unsaved_bytes(template, s, cm.ctx)
    copy = attention_output_copy_bytes(template, s, cm.ctx)
    if block is None and not experts and not copy:
        return cost
    acts = cost.act_bytes if block is None else {**cost.act_bytes, "none": block}
    return replace(cost, act_bytes=by_mode_less_copies(acts, copy, experts))


def closed_form_saved(template, captured_none: float, s: Strategy, cm, less: float = 0.0) -> float | None:
    """A block's saved bytes without recompute as Megatron-Core keeps them (``megatron_block_bytes``' closed form;
    None where it has none: other runtimes), given the captured ones ``captured_none``: an MoE block keeps its
    captured expert and router tensors (less ``less``) beside the closed form's norms and attention, which stand
    in for its captured ones (``captured_dense_bytes``). Read by ``fused_saved`` and ``floor_block_saved``."""
    block = megatron_block_bytes(cm.spec, s, cm.ctx.seq_len, cm.ctx.runtime, template.is_moe, cm.dtype == "fp8")
    if block is not None and template.is_moe:
        block += captured_none - captured_dense_bytes(template, s) - less
    return block


def by_mode_less_copies(by_mode: dict[str, float], copy: float, experts: float) -> dict[str, float]:
    """A block's saved bytes ``by_mode`` less the attention-output ``copy`` the stack does not make (in the modes
    that keep ``template.saved``'s copy: none, selective) plus ``experts`` (a change to the experts' tensors, in
    every mode that keeps them: all but full). Read by ``fused_saved`` and ``floor_block_saved``."""
    return {m: b - (copy if m in ("none", "selective") else 0.0) + (experts if m != "full" else 0.0)
            for m, b in by_mode.items()}


def attention_output_copy_bytes(template, s: Strategy, ctx) -> float:
    """The copy of a block's attention output that the captured graph saves for the output projection and the
    stack's program does not make (``template.saved``'s ``reshape`` of the SDPA output's bytes, the rank's
    share as ``layer_model.saved_bytes`` scales it). The capture runs on meta tensors, whose SDPA output is
    ``[b, heads, s, d]``-contiguous, so ``out.transpose(1, 2).reshape(b, s, -1)`` copies; llm-foundry's MPT
    attention calls flash-attention on ``[b, s, heads, d]`` views of the fused qkv output and reads its output
    as ``attn_output.view(b, s, -1)`` (llm-foundry 0.3.0 ``models/layers/attention.py``
    ``triton_flash_attn_fn``), so the kernel's saved output is the projection's input. 0 for other stacks: on
    CPU torch 2.13's SDPA also returns a ``[b, s, heads, d]``-strided output whose reshape is a view (not checked
    on a GPU), but the torch stack's captured memory is left as it is (docs/validation.md)."""
    if ctx.stack_name not in VIEW_OUTPUT_STACKS or template.kind != "block":
        return 0.0
    outs = [t for t in template.saved if t.name == "scaled_dot_product_attention"]
    copies = [t for t in template.saved if t.name.startswith("reshape") and not t.const
              and any(t.bytes == o.bytes and t.shard == o.shard for o in outs)][:len(outs)]
    return terms_bytes(copies, shards_for(s, template))


def floor_block_saved(template, by_mode: dict[str, float], s: Strategy, cm) -> dict[str, float]:
    """A block's saved bytes by mode for the search's memory floor (``planner.memory_floor._floor_acts``;
    ``by_mode``: the captured ones), less what ``fused_saved`` takes off whatever the expert parallelism, so that
    the floor stays under the priced peak of every sharding sharing it (those differing in ep / etp alone): the
    attention-output copy the stack does not make, Megatron-Core's closed form of the norms and attention where
    smaller, and a Megatron MoE block's share of the SiLU output its fused SwiGLU does not keep (the busiest expert
    rank's excess only adds to the price, and the clamp copy too: both left out, so the floor stays under)."""
    silu = fused_swiglu_share_bytes(template, s, cm.ctx)   # the busiest rank's excess on top is >= 0: left out
    out = by_mode_less_copies(by_mode, attention_output_copy_bytes(template, s, cm.ctx), -silu)
    block = None if "none" not in out else closed_form_saved(template, by_mode["none"], s, cm, silu)
    return out if block is None else {**out, "none": min(out["none"], block)}


def floor_output_bytes(layer, s: Strategy, sh, ctx) -> tuple[float, float]:
    """(saved, loss-phase) bytes of a non-block layer for the search's memory floor (``sh``: the floor's
    ``Shards``): the captured saved bytes less what a fused or vocab-parallel loss keeps fewer
    (``loss_memory.gathered_loss_bytes`` where negative), and the captured forward temporaries, no more than the
    loss phase ``loss_memory.logits_bytes`` prices (a fused loss's single 16-bit gradient)."""
    temps = layer.temp_bytes * sh.tokens / (sh.tp if layer.kind == "output" else 1)
    saved = saved_bytes(layer, sh, "none") + min(0.0, gathered_loss_bytes(layer, s, sh, ctx))
    return saved, min(temps, logits_bytes(layer, s, sh, ctx))


def captured_dense_bytes(template, s: Strategy) -> float:
    """An MoE block's captured norm and attention terms (replicated / tensor-parallel shards), as ``saved_bytes``
    counts them without recompute: what ``megatron_block_bytes``' closed form stands in for."""
    return terms_bytes([t for t in template.saved if t.shard in ("rep", "tp") and not t.const],
                       shards_for(s, template))


def fused_swiglu_unsaved_bytes(template, s: Strategy, ctx) -> float:
    """The expert activation's output (the captured eager loop's ``silu_out``, the rank's share as
    ``layer_model.saved_bytes`` scales it, plus the busiest expert rank's excess) that Megatron-Core does not keep:
    its grouped MLP runs the fused bias-SwiGLU (``TEGroupedMLP.forward``: ``bias_swiglu_impl``, 0.11;
    ``weighted_bias_swiglu_impl``, 0.16), whose ``SwiGLUFunction`` / ``WeightedSwiGLUFunction`` saves its input
    (fc1's output, both halves) and the gate weights, and re-runs the SiLU in backward; fc2 keeps the product,
    as the dense block's closed form counts it (``memory.fused_block_activation_bytes``: fc1 output and fc2
    input). 0 for other runtimes and blocks without experts."""
    act = fused_swiglu_share_bytes(template, s, ctx)
    return act + expert_rank_excess(act, s, ctx) if act else 0.0


def fused_swiglu_share_bytes(template, s: Strategy, ctx) -> float:
    """``fused_swiglu_unsaved_bytes`` of a mean rank (its share of the experts' ``silu_out``, without the busiest
    rank's excess): what the search's memory floor takes off (``floor_block_saved``)."""
    if ctx.runtime != "megatron" or not template.is_moe:
        return 0.0
    return terms_bytes([t for t in template.saved if t.shard == "expert" and not t.const
                        and t.name.endswith(":silu_out")], shards_for(s, template))


def glu_clamp_copy_bytes(template, s: Strategy, ctx) -> float:
    """The clamped copy of an MoE block's fc1 output Megatron-Core saves per micro-batch when the model clamps its
    gated activation (``megatron_ops.glu_clamp_saved_bytes``; ``ctx.glu_clamp``, ``--runtime megatron`` only):
    the gate GEMM's rows x width of every expert for one sequence, scaled to the rank's tokens as
    ``layer_model.saved_bytes`` scales the captured expert terms (the same rows and local width
    ``layer_cost._expert_passes`` prices the clamp on), plus the busiest expert rank's excess
    (``expert_rank_excess``). 0 for anything else."""
    w1 = expert_gate_gemm(template) if template.is_moe else None
    if ctx.runtime != "megatron" or not ctx.glu_clamp or w1 is None:
        return 0.0
    m, n, _ = w1.gemm
    sh = shards_for(s, template)
    copy = glu_clamp_saved_bytes(m * w1.calls * sh.tokens / sh.of("expert"), n, ctx.dtype_bytes)
    return copy + expert_rank_excess(copy, s, ctx)
