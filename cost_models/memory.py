"""Memory formulas: model states under ZeRO, activations under TP/SP/CP/recompute.

Model states (Rajbhandari et al. 2020, ZeRO, Sec. 3.1 / Fig. 1): mixed-precision Adam
keeps ``2Ψ`` bytes of 16-bit parameters, ``2Ψ`` of 16-bit gradients and ``12Ψ`` of
optimizer state (fp32 master weights, momentum, variance). ZeRO-1 shards the ``12Ψ``
over the data-parallel group ``N_d``, ZeRO-2 also the gradients, ZeRO-3 (FSDP) also the
parameters. In fp32 training parameters and gradients take 4 bytes each and the
optimizer 8 (momentum, variance; the parameters are the master copy).

Activations per transformer layer come from the captured graph's saved tensors (see
``activation_bytes``); Korthikanti et al. 2022, Table 2 is the closed form they must
reproduce for GPT: ``s·b·h·(34 + 5·a·s/h)`` with no parallelism, ``s·b·h·(10 + 24/t +
5·a·s/(h·t))`` with tensor parallel t, ``s·b·h/t·(34 + 5·a·s/h)`` with t and sequence
parallel, ``s·b·h·(10 + 24/t)`` with t and selective recompute, ``34·s·b·h/t`` with t,
SP and selective, and ``2·s·b·h`` (the layer input) with full recompute.
"""

from __future__ import annotations

from dataclasses import dataclass

from autopar.core.model_spec import ModelSpec
from autopar.core.strategy import Strategy
from autopar.cost_models.moe_cost import capped_load
from autopar.techniques.dp_program import ZERO1_BUCKET_BYTES, whole_backward

GiB = 1024**3


@dataclass(frozen=True)
class StateBytes:
    params: float
    grads: float
    optimizer: float

    @property
    def total(self) -> float:
        return self.params + self.grads + self.optimizer


def bytes_per_param(dtype: str) -> tuple[int, int, int]:
    """(parameter, gradient, optimizer) bytes per parameter for Adam.

    16-bit mixed precision: 2 + 2 + 12 (ZeRO paper, K = 12: fp32 master copy, momentum,
    variance). fp8 training keeps 16-bit master-facing weights in Transformer Engine,
    so it is priced like bf16. fp32: 4 + 4 + 8.
    """
    if dtype == "fp32":
        return 4, 4, 8
    return 2, 2, 12


def model_state_bytes(params: float, dtype: str, zero_stage: int, shard_group: int) -> StateBytes:
    """Bytes one GPU holds for ``params`` parameters replicated over ``shard_group`` ranks
    (the data-parallel group, or the expert-data-parallel group for expert weights).

    ZeRO paper, Sec. 5: stage 1 divides optimizer states by N_d, stage 2 also gradients,
    stage 3 also parameters.
    """
    p, g, o = bytes_per_param(dtype)
    n = max(shard_group, 1)
    return StateBytes(
        params=params * p / (n if zero_stage >= 3 else 1),
        grads=params * g / (n if zero_stage >= 2 else 1),
        optimizer=params * o / (n if zero_stage >= 1 else 1),
    )


def expert_shard_group(s: Strategy, runtime: str) -> int:
    """Ranks over which ZeRO shards the expert weights' states. With expert parallel (ep*etp > 1)
    the expert-data-parallel group ``edp`` (MoE Parallel Folding). Without it, autopar's programs
    (runtime torch) keep the routed experts replicated on every tp rank inside the blocks' own
    data-parallel units (``codegen.runtime_parallel.apply_dp``): sharded over dp*cp like the dense
    weights, not over the tp ranks ``edp`` also counts (contract sweep, docs/codegen.md). Other
    stacks keep edp (Megatron-Core folds experts over dp*cp*tp)."""
    if s.ep * s.etp > 1 or runtime != "torch":
        return s.edp
    return s.dp * s.cp


def runs_sharded_adamw(s: Strategy, dtype: str, runtime: str) -> bool:
    """ZeRO-1 as autopar's programs run it beside tensor, expert or pipeline parallel or with 16-bit
    weights: ``runtime_zero1.ShardedAdamW`` (``codegen.runtime_parallel.dp_mode`` 'zero1'), not DDP."""
    if runtime != "torch" or s.zero_stage != 1 or s.offload_optimizer:
        return False
    return dtype != "fp32" or (s.dp * s.cp > 1 and (s.tp > 1 or s.ep * s.etp > 1 or s.pp > 1))


def zero1_reduce_bytes(dense: float, expert: float, s: Strategy, dtype: str, first_numel: float = 0.0,
                       last_numel: float = 0.0) -> float:
    """``runtime_zero1.Bucket``s from the end of the last backward to the step, beyond parameters, whole
    gradients and states, for the rank's ``dense`` parameters (reduced over dp*cp) and ``expert`` ones (over
    edp), per model chunk. The flat copies replace the gradients span by span during the backward; the
    dense bucket packs its last span at the end of it (``Bucket._pack``: allocated while that span's
    gradients live; spans of ``ZERO1_BUCKET_BYTES``), beside the reduce-scatter outputs (1/n) of the spans
    issued before it; then ``sync_grads`` waits bucket after bucket: the outputs and each bucket's fp32
    gradient (under 16-bit weights; in fp32 the outputs are it). ``first_numel`` / ``last_numel``: elements
    of a parameter larger than a span that the dense bucket reduces first (an untied output head) / last
    (the input embedding, or a pipeline's tied copy), 0 where none: alone in its span, copied whole where
    its elements do not divide by dp*cp (``packed_bytes``), before anything is issued for the first.
    No gloo copy of the input shows since the reduce-scatters went async (contract sweep s28's peak dump,
    ``AUTOPAR_MEM_PEAK_DUMP``: the span's flat copy beside the gradients it packs); measured on CPU in
    tests/test_zero1_memory.py."""
    gbytes = bytes_per_param(dtype)[1]
    grads = [dense * gbytes / s.vpp, expert * gbytes / s.vpp]
    n = [s.dp * s.cp, s.edp]
    out = [g / k if k > 1 else 0.0 for g, k in zip(grads, n)]
    up = [g / k * 4 / gbytes if gbytes < 4 else 0.0 for g, k in zip(grads, n)]
    span = min(grads[0], ZERO1_BUCKET_BYTES)   # fp32: the outputs are one buffer, allocated with the first span
    lone = last_numel * gbytes > ZERO1_BUCKET_BYTES
    last = packed_bytes(last_numel, n[0], gbytes) if lone else span
    mine = (last_numel * gbytes if lone else last) / n[0]   # the last span's own output, allocated after it
    issued = 0.0 if grads[0] <= max(span, mine * n[0]) or n[0] <= 1 else out[0] - (mine if gbytes < 4 else 0.0)
    first = packed_bytes(first_numel, n[0], gbytes) if first_numel * gbytes > ZERO1_BUCKET_BYTES else 0.0
    packing = max(first, last + issued) + out[1]
    return max(packing, out[0] + out[1] + up[0], out[1] + up[0] + up[1])


def packed_bytes(numel: float, n: int, gbytes: int) -> float:
    """Bytes of the flat [n, ceil(numel / n)] copy ``runtime_zero1.Bucket._pack`` makes of a parameter of
    ``numel`` elements alone in its span, reduced over ``n`` ranks: none where ``numel`` divides by ``n``
    (``Bucket._whole``: the gradient itself is the flat layout, reduced and gathered in place), else the
    whole gradient, zero-padded to ``n`` rows, while the gradient it copies still lives."""
    k = int(numel)
    return 0.0 if n <= 1 or k % n == 0 else n * -(-k // n) * gbytes


def warmup_only_activations(acts: float, grads: float, in_flight: float, micro_batches: int) -> float:
    """A pipeline rank whose warm-up holds every micro-batch of the step (GPipe; 1F1B with m <= pp -
    rank) runs all its forwards before any backward: no gradient exists at that activation peak
    (``zero_grad`` freed them), and its backward frees activations as the gradients appear.
    ``grads``: gradients and the buffers that hold them (DDP-style / ZeRO-1/2 gradient buffers; not
    ZeRO-3's gathered blocks, which the forward gathers too). Peak = max(activations, grads): only
    the activations' excess over the gradients adds (contract sweep: GPipe measured 0.84x the sum)."""
    if in_flight < micro_batches:  # a steady state: forwards run while gradients are live
        return acts
    return max(0.0, acts - grads)


def grads_freed_before_activation_peak(s: Strategy, runtime: str) -> bool:
    """Whether the step's activation peak comes before any gradient exists, so that
    ``warmup_only_activations`` prices it: the program frees last step's gradients
    (``optimizer.zero_grad(set_to_none=True)``: autopar's ``codegen.runtime.optimizer_step``, also for
    ZeroRedundancyOptimizer and ``runtime_zero1.ShardedAdamW``; torchtitan's ``train_step`` calls
    ``optimizers.zero_grad()``, whose default is ``set_to_none=True``) and runs every forward of the
    step before its first backward: one micro-batch per step outside a pipeline (``gpt-small dp4 mbs4``
    on 4 CPU ranks: 218.6 MiB measured, 255 predicted with the gradients added), and autopar's
    non-zero-bubble pipelines (the rank's warm-up; torchtitan's pipeline is ``runtime_memory``'s).
    Megatron-Core and DeepSpeed keep a persistent contiguous gradient buffer: never."""
    if runtime == "torch" and s.pp > 1:
        return whole_backward(s.schedule)
    return runtime in ("torch", "torchtitan") and s.pp == 1 and s.num_micro_batches == 1


def warmup_gradient_bytes(s: Strategy, runtime: str, mem: dict[str, float]) -> float:
    """The gradients, and the buffers that hold them, whose bytes a warm-up rank's activations reuse
    (``warmup_only_activations``' ``grads``; ``mem``: the rank's memory by kind): DDP-style and ZeRO-1/2
    gradient buffers of a pipeline rank count too, ZeRO-3's gathered blocks do not (the forward
    gathers them as well). 0 where the program keeps gradients live at its activation peak."""
    if not grads_freed_before_activation_peak(s, runtime):
        return 0.0
    bufs = mem["comm_buffers"] if s.pp > 1 and s.zero_stage < 3 and not s.offload_optimizer else 0.0
    return mem["gradients"] + bufs


def busiest_rank_expert_excess(expert_saved: float, load: float) -> float:
    """Saved expert activations the busiest expert-parallel rank holds beyond the mean rank's
    ``expert_saved``: dropless routing sends it ``load`` times the mean routed tokens (a routing
    trace's or placement's straggler ratio, ``moe_load.stats``; capped by a capacity factor), and
    every routed-token tensor of the grouped experts (the dispatched tokens, both up-projections,
    the activation, their product, the combine) scales with that count. The mean over layers of
    each layer's busiest rank bounds the rank whose layers are summed at the peak from above, so
    memory is not under-priced. Measured (``AUTOPAR_MEM_TRACE``, moe-tiny ``dp4 ep4 mbs1`` on 4 CPU
    ranks, step 2): rank 2 received 1128-1201 routed token copies per micro-batch over its 3 MoE
    layers against a mean of 768 (1.47-1.56x), and its forward held 1.08 MiB more than rank 0's,
    all in those tensors."""
    return expert_saved * (max(load, 1.0) - 1.0)


def expert_rank_excess(expert_saved: float, s: Strategy, ctx) -> float:
    """``busiest_rank_expert_excess`` of a mean rank's ``expert_saved`` bytes at the job's straggler ratio (a routing
    trace's or placement's ``ctx.expert_load_ratio``, capped: ``moe_cost.capped_load``); 0 without expert
    parallelism, where every rank runs all experts on its own tokens. Read by ``layer_cost._expert_load_excess``
    and ``runtime_memory.glu_clamp_copy_bytes``."""
    if s.ep == 1:
        return 0.0
    return busiest_rank_expert_excess(expert_saved, capped_load(ctx.expert_load_ratio, ctx.moe_capacity_factor))


def korthikanti_activation_bytes(s: int, b: int, h: int, a: int, t: int = 1, sp: bool = False,
                                 recompute: str = "none") -> float:
    """Closed form of Korthikanti et al. 2022, Table 2 (16-bit activations, 1-byte
    dropout masks), per transformer layer. Reference for tests and docs."""
    if recompute == "full":
        return 2 * s * b * h / (t if sp else 1)
    attn = 0.0 if recompute == "selective" else 5 * a * s / h
    if sp:
        return s * b * h / t * (34 + attn)
    return s * b * h * (10 + 24 / t + attn / t)


def megatron_pipeline_buffer_bytes(hidden_bytes: float, links: int, tp: int, sp: bool) -> float:
    """Pipeline bytes of a Megatron-Core rank beyond its layers' saved activations: one receive buffer per
    local stage link (activations from the previous stage, gradients from the next, allocated per step).
    The stage outputs are not kept: Megatron-LM runs with ``deallocate_pipeline_outputs=True``
    (``core_transformer_config_from_args``), and ``schedules.deallocate_output_tensor`` frees each
    output's data once sent, keeping only its ``grad_fn``; a received input is the first layer's saved
    input (already in the activations); the last stage computes the loss inside its forward step, so no
    logits wait for a backward beyond the output layer's own saved tensors. Under sequence parallelism the
    tensors exchanged are ``[s/(cp·tp), b, h]`` (``schedules.get_tensor_shapes``). ``hidden_bytes``: one
    micro-batch's ``[s/cp, b, h]`` in the training dtype."""
    return links * hidden_bytes / (tp if sp and tp > 1 else 1)


def fused_block_activation_bytes(tokens: float, hidden: int, q_dim: int, kv_dim: int, ffn: int, gated: bool,
                                 dropout: bool, tp: int, sp: bool, qk_norm: bool = False) -> float:
    """Bytes one dense pre-norm block saves per micro-batch under fused kernels (Megatron-Core with
    Transformer Engine: ``LayerNormLinear`` keeps the norm's input and its output, the linear's input;
    flash attention keeps q, k, v (grouped K/V as they are, not repeated per head), its output (the
    projection's input, one tensor) and a per-row logsumexp; the fused bias-SwiGLU/GeLU keeps the fc1
    output; fc2 keeps the activation's output; 1-byte dropout masks after attention and MLP when the
    model has dropout), 16-bit. Korthikanti et al. 2022 §4.1 / Table 2 count the same tensors: with
    ``q = kv = h``, ``ffn = 4h``, GeLU and dropout this is their ``34·s·b·h`` (no s² terms: flash
    attention) and Megatron-LM's own estimate ``s·b·h·(18 + 4·ffn/h)``
    (``megatron/training/theoretical_memory_usage.compute_activation_memory``). Under tp the norms'
    inputs and outputs and the masks (``10·s·b·h``) stay whole unless sequence parallel shards them.
    ``qk_norm``: a fused norm of q and k keeps their inputs too (its outputs are the q and k above);
    ``ffn`` 0: the attention half of an MoE block (its experts priced apart)."""
    rep = 2 * hidden * 4 + (2 * hidden if dropout else 0)   # two norms' input + output, two masks
    split = 4 * q_dim + 4 * kv_dim + 2 * ffn * (2 if gated else 1) + 2 * ffn  # q and the attention output: q wide
    split += (2 * q_dim + 2 * kv_dim) if qk_norm else 0
    return tokens * (rep / (tp if sp else 1) + split / tp)


def fp8_linear_inputs_delta_bytes(tokens: float, hidden: int, q_dim: int, ffn: int, tp: int, sp: bool) -> float:
    """What a dense block's saved bytes (``fused_block_activation_bytes``, 16-bit) change by when its Transformer
    Engine linears run fp8: each saves its input quantized, 1 byte per element, not 16-bit (TE 2.20
    ``pytorch/module/linear.py`` lines 689-717: ``saved_inputmat = inputmat``, the quantizer's output, column-wise
    data only; ``layernorm_linear.py`` 244-268 and 469: the norm kernel writes ``ln_out`` quantized and that is
    saved). So the two norm outputs (qkv's and fc1's inputs, sequence-split under sp) and fc2's input (the
    activation output) take half their bytes, and the output projection keeps an fp8 copy of the attention
    output beside the 16-bit one the attention kernel saves (bf16 attention: Megatron-Core's fp8 dot-product
    attention is off unless asked). ``ffn`` 0: an MoE block's attention half (its second norm feeds the router
    and the experts, left as counted)."""
    norms = (2 if ffn else 1) * hidden / (tp if sp else 1)
    return tokens * (q_dim / tp - ffn / tp - norms)


def megatron_block_bytes(spec: ModelSpec, s: Strategy, seq_len: int, runtime: str, moe: bool = False,
                         fp8: bool = False) -> float | None:
    """``fused_block_activation_bytes`` for a block of ``spec`` under Megatron-Core (``runtime``
    megatron; ``moe``: its attention half only; ``fp8``: Transformer Engine's fp8 linears,
    ``fp8_linear_inputs_delta_bytes``), or None where the captured graph's saved tensors stand:
    another runtime (autopar's own programs and torchtitan save what the captured eager graph saves),
    eager attention (s² scores), multi-head latent attention, custom modules, shared experts (no closed
    form here)."""
    if runtime != "megatron" or spec.family in ("deepseek_v3", "custom") or spec.attention != "sdpa" \
            or (moe and (spec.shared_experts or spec.shared_ffn_hidden)):
        return None
    head = spec.head_dim or spec.hidden // max(spec.heads, 1)
    tokens, ffn = s.micro_batch * seq_len / s.cp, 0 if moe else spec.ffn_hidden
    block = fused_block_activation_bytes(
        tokens, spec.hidden, spec.heads * head, (spec.kv_heads or spec.heads) * head, ffn,
        spec.resolved_mlp in ("swiglu", "geglu"), spec.dropout > 0, s.tp, s.sequence_parallel, spec.qk_norm != "none")
    if fp8:
        block += fp8_linear_inputs_delta_bytes(tokens, spec.hidden, spec.heads * head, ffn, s.tp, s.sequence_parallel)
    return block


def in_flight_activation_bytes(per_microbatch_bytes: float, in_flight: float) -> float:
    """Activations a pipeline rank holds at its peak: one micro-batch's saved tensors
    times the micro-batches in flight (``pipeline.in_flight_microbatches``)."""
    return per_microbatch_bytes * in_flight


def offload_grad_shard_bytes(sharded_params: float) -> float:
    """Host bytes of the gradient shards FSDP2's ``CPUOffloadPolicy`` keeps: the sharded gradient
    takes the sharded parameter's dtype, fp32 in every plan (bf16 plans keep fp32 shards under
    ``MixedPrecisionPolicy``, ``codegen.runtime_parallel.apply_dp``), so 4 bytes per parameter of
    the shard, whatever the training dtype (of the 16 host bytes per parameter, the rest are the
    fp32 shard and the two AdamW states)."""
    return 4.0 * sharded_params


def host_grads_at_device_peak(s: Strategy, runtime: str) -> bool:
    """Whether offload's host gradient shards already exist when the device peaks (the loss and
    the first blocks' backward, where every activation of the micro-batch is still live). They
    are written block by block as the backward reduce-scatters, so not yet with one micro-batch
    per step, nor under a zero-bubble pipeline of autopar's programs (FSDP2 reduces there after
    the step's final backward only: not ``techniques.dp_program.whole_backward``); with gradient
    accumulation the earlier micro-batches' shards are live (contract sweep traces,
    ``AUTOPAR_MEM_TRACE``: s02, s30, s11 peak at the loss without them, s06, s31 with them)."""
    if s.num_micro_batches <= 1:
        return False
    return not (runtime == "torch" and s.pp > 1 and not whole_backward(s.schedule))


def pooled_peak_bytes(device: dict[str, float], host: float, grad_shards: float, grads_at_peak: bool) -> float:
    """Device and host bytes of one rank together at their joint peak: what a rank holds when both
    are one memory (CPU ranks, where offload's host copies share the rank's RAM: the contract
    sweep measures this). Not the sum of the two peaks: the host peaks at the end of the backward,
    once every gradient shard is written (``grad_shards``) and the activations are freed; the device
    at the loss. Peak = max(device peak + host without the shards not yet written then, host peak +
    the gathered parameters and one block's unsharded gradients, which the end of the backward
    still holds)."""
    at_device_peak = sum(device.values()) + host - (0.0 if grads_at_peak else grad_shards)
    at_host_peak = host + device.get("parameters", 0.0) + device.get("comm_buffers", 0.0)
    return max(at_device_peak, at_host_peak)


def kv_bytes_per_token(spec: ModelSpec, dtype_bytes: int) -> float:
    """K + V bytes per token a block produces (and context parallel moves): ``2 * kv_heads * head_dim``;
    multi-head latent attention rebuilds per-head keys of nope + rope width and values of ``v_head_dim``."""
    if spec.family == "deepseek_v3":
        return spec.heads * (spec.qk_nope_head_dim + spec.qk_rope_head_dim + spec.v_head_dim) * dtype_bytes
    return 2 * spec.kv_heads * spec.head_dim * dtype_bytes


def sdpa_kv_bytes_per_token(spec: ModelSpec, dtype_bytes: int) -> float:
    """K + V bytes per token as the attention kernel receives them in autopar's models: grouped-query
    K/V are repeated to every query head first (``profiles.models.layers.causal_attention``), so
    ``2 * heads * head_dim``; latent attention as ``kv_bytes_per_token`` (already per head)."""
    if spec.family == "deepseek_v3":
        return kv_bytes_per_token(spec, dtype_bytes)
    return 2 * spec.heads * (spec.head_dim or spec.hidden // max(spec.heads, 1)) * dtype_bytes


def cp_gathered_kv_bytes(mbs: float, seq_len: int, cp: int, tp: int, kv_bytes_per_token: float) -> float:
    """Extra bytes one block keeps for backward under the emitted context parallelism
    (``codegen.runtime_cp``: all-gather K/V attention, Llama 3 Sec. 3.3.2). SDPA saves the gathered
    ``[mbs, heads/tp, s, d]`` K and V of the whole sequence, while the rank's own K/V, which the
    captured graph (cp = 1) counts as saved, are freed (the all-gather keeps no input for its
    reduce-scatter backward): ``(cp - 1)`` more copies of the local K/V. Measured
    (tests/test_cp_memory.py, saved-tensor hooks; moe-tiny cp2 mbs16 seq 128 on gloo,
    ``AUTOPAR_MEM_PEAK_DUMP``: 8 ``cat`` outputs [16, 4, 128, 16], no local repeat_interleave copies)."""
    if cp <= 1:
        return 0.0
    return (cp - 1) * mbs * seq_len / cp * kv_bytes_per_token / tp


def cp_kept_kv_bytes(recompute: str, mbs: float, seq_len: int, cp: int, tp: int, kv_bytes: float,
                     sdpa_kv_bytes: float) -> float:
    """Extra bytes one block keeps for backward under the emitted context parallelism, per recompute mode
    (``codegen.runtime_ac``): ``none``, SDPA's gathered K/V (``cp_gathered_kv_bytes``, at the repeated
    ``sdpa_kv_bytes`` per token); ``selective``, the all-gather's own output (its policy saves
    collectives; SDPA and the GQA repeat are recomputed): the whole sequence's K/V at ``kv_bytes`` per
    token; ``op`` and ``full``, none (the all-gather is recomputed in backward; the per-op policy does not
    save it). Measured with saved-tensor hooks plus the checkpoint policy's cache (tests/test_cp_recompute.py,
    llama-tiny / moe-tiny at cp 2 and 4 against cp 1 over the same local tokens)."""
    if cp <= 1 or recompute in ("op", "full"):
        return 0.0
    if recompute == "selective":
        return mbs * seq_len * kv_bytes / tp
    return cp_gathered_kv_bytes(mbs, seq_len, cp, tp, sdpa_kv_bytes)


def cp_mask_bytes(seq_len: int, cp: int, dtype_bytes: int, chunks: int = 1) -> float:
    """The additive position mask ``[s/cp, s]`` in the activation dtype that the emitted cp attention
    builds once per model chunk and every block's SDPA shares (and keeps for backward) for the
    whole run: ``chunks`` (= vpp) copies per rank, whatever the batch."""
    if cp <= 1:
        return 0.0
    return chunks * seq_len / cp * seq_len * dtype_bytes
