"""The GEMMs and kernels Megatron-Core runs for a captured block's ops (``--runtime megatron``).

A captured Hugging Face block projects q, k and v with three linears and a gated MLP's gate and up
halves with two, with the activation and the product as two elementwise ops between them. Megatron-Core
builds one column-parallel linear for each group (``linear_qkv``: q, k and v interleaved per query
group; ``linear_fc1``: [gate; up], 2 x ffn wide, for a gated linear unit) and runs the gated activation
as one fused kernel (``--bias-swiglu-fusion``, on by default: ``bias_swiglu_impl``; its MoE experts'
``TEGroupedMLP`` the same on the grouped ``fc1``). Megatron-LM ``megatron/core/transformer/attention.py``
(``SelfAttention.get_query_key_value_tensors``) and ``mlp.py`` (``MLP.forward``). One GEMM instead of
two or three reads the shared input once (under fp8: one cast of it, ``fp8_cost.Fp8Cast``) and
runs as one larger kernel; the fused activation reads gate and up and writes their product once.

Before the attention: RoPE on q and k as Transformer Engine's fused kernel, or as Megatron-Core's unfused
one where the model's YaRN scaling multiplies cos and sin (``megatron_rope``).

Beside the blocks: the loss as the fused cross-entropy kernel the run names (``megatron_loss``,
``--cross-entropy``), and on an expert-parallel rank the memory passes Megatron-Core runs around the
expert GEMMs (``expert_passes_s``: the expert-major re-sort, the experts' output biases).
"""

from __future__ import annotations

from dataclasses import replace

from autopar.cost_models.comm import collective_time
from autopar.cost_models.compute import OpTimer
from autopar.cost_models.fp8_cost import te_expert_padding_bytes
from autopar.cost_models.layer_model import LayerTemplate, OpTerm
from autopar.cost_models.moe_cost import local_sort_bytes
from autopar.cost_models.overlap import userbuffers_tp_exposed

# Bytes per logit element the runtime's fused cross-entropy moves, forward and backward (bf16 logits in,
# bf16 logit gradient out; ``cross_entropy_bytes``). Choices of Megatron-Core's
# ``--cross-entropy-fusion-impl`` (``TransformerConfig.cross_entropy_fusion_impl``).
CROSS_ENTROPY_IMPLS = ("te", "native")
# Element passes over q and k of one RoPE application, forward + backward, as the op prices them (an elementwise
# op's backward at twice its forward, ``layer_cost._op_time``: the op carries a third of them). Fused (Transformer
# Engine ``fused_apply_rotary_pos_emb``): read and write once forward, priced 2 + 4. Unfused (megatron-core 0.16
# ``rope_utils._apply_rotary_pos_emb_bshd``): forward t * cos (2), ``_rotate_half``'s negation (1) and cat (2),
# * sin (2), the sum (3), the cat with the empty pass-through part (2) = 12; backward the two products' gradients
# (2 + 2), the negation's (1), ``chunk``'s gradient cat (2) and the two paths' sum (3) = 10.
ROPE_PASSES = {"fused": 6, "unfused": 22}


def _column(op: OpTerm) -> bool:
    return op.kind == "gemm" and op.gemm is not None and op.tp_dim == "n" and not op.batched


def _same_input(a: OpTerm, b: OpTerm) -> bool:
    """Two column linears over the same input: same rows, same reduction, same sharding and calls."""
    return _column(a) and _column(b) and a.shard == b.shard and a.calls == b.calls \
        and a.gemm[0] == b.gemm[0] and a.gemm[2] == b.gemm[2]


def merged_linear(parts: list[OpTerm]) -> OpTerm:
    """One column-parallel GEMM computing ``parts`` side by side: the output widths add up, and so do
    the FLOPs and the weight bytes (the input is read once)."""
    first = parts[0]
    m, _, k = first.gemm
    n = sum(p.gemm[1] for p in parts)
    per_element = first.bytes_rw / (m * k + k * first.gemm[1] + m * first.gemm[1])
    return replace(first, name="+".join(p.name for p in parts), gemm=(m, n, k), sig=None,
                   fwd_flops=sum(p.fwd_flops for p in parts), bwd_flops=sum(p.bwd_flops for p in parts),
                   bytes_rw=per_element * (m * k + k * n + m * n), op_kept=all(p.op_kept for p in parts))


def megatron_linears(ops: list[OpTerm]) -> list[OpTerm]:
    """``ops`` with Megatron-Core's fused linears: the q, k, v projections (three column linears over the
    same input in a row) as ``linear_qkv``, and a gated MLP's gate and up projections (two equal column
    linears over the same input, adjacent or with the gate's activation between them) as ``linear_fc1``,
    the activation folded into the elementwise product that follows (one fused kernel moving the
    product's bytes: gate and up read, their product written)."""
    out: list[OpTerm] = []
    i = 0
    while i < len(ops):
        op = ops[i]
        nxt = ops[i + 1:i + 4]
        if len(nxt) >= 2 and _same_input(op, nxt[0]) and _same_input(op, nxt[1]) and op.shard == "tp" \
                and nxt[0].gemm[1] == nxt[1].gemm[1]:  # q, k, v (k and v equally wide)
            out.append(merged_linear([op, nxt[0], nxt[1]]))
            i += 3
        elif nxt and _same_input(op, nxt[0]) and op.gemm == nxt[0].gemm:  # gate, up adjacent
            out.append(merged_linear([op, nxt[0]]))
            i += 2
        elif len(nxt) >= 3 and nxt[0].kind == "membound" and op.gemm == nxt[1].gemm and _same_input(op, nxt[1]) \
                and nxt[2].kind == "membound":  # gate, act(gate), up, act * up
            out += [merged_linear([op, nxt[1]]), nxt[2]]
            i += 4
        else:
            out.append(op)
            i += 1
    return out


def megatron_tp_reductions(layer: LayerTemplate, rows: int) -> int:
    """Tensor-parallel reductions of one block per pass (each an all-reduce, or a reduce-scatter with
    its all-gather under sequence parallel) in Megatron-style tensor parallelism: one per row-parallel
    linear (Shoeybi et al. 2019: attention and MLP); a parallel block (``parallel_block``) sums its
    attention and MLP outputs before the one reduction and gathers its single norm's output once
    (MegaScale, Jiang et al. NSDI 2024, Sec. 3.1, parallel transformer block; GPT-NeoX's parallel
    residual all-reduces ``attention + mlp`` together, Black et al. 2022). The emitted torch programs
    (one DTensor collective per module) keep their per-module count."""
    return min(rows, 1) if parallel_block(layer) else rows


def megatron_block_tp(layer: LayerTemplate, rows: int, one_s: float, act_bytes: float, s, ctx,
                      window_s: float) -> float:
    """Exposed tensor-parallel seconds of one block per micro-batch, forward + backward, under Megatron-Core
    (``s`` the Strategy, ``ctx`` the layer_cost.PricingContext): ``megatron_tp_reductions`` each way, each
    ``one_s`` (an all-reduce, or an all-gather and a reduce-scatter of ``act_bytes`` under sequence
    parallel). With ``--tp-comm-overlap`` (``ctx.tp_comm_overlap``; Megatron-Core requires sequence
    parallelism for it) Transformer Engine's userbuffers hide them as ``overlap.userbuffers_tp_exposed``
    says, beside the block's compute ``window_s``; a run that states no overlap hides the stack's fitted
    share ``tp_overlap``."""
    n = megatron_tp_reductions(layer, rows)
    if not (ctx.tp_comm_overlap and s.sequence_parallel):
        return 2 * n * one_s * (1.0 - ctx.timer.stack.tp_overlap)
    ag, rs = (collective_time(kind, act_bytes, s.tp, 1, ctx.cluster, fits=ctx.fits).time_s
              for kind in ("all_gather", "reduce_scatter"))
    return userbuffers_tp_exposed(ag, rs, n, window_s)


def parallel_block(layer: LayerTemplate) -> bool:
    """The block runs attention and MLP on one norm's output (``Block`` layout "parallel": the
    captured block has its attention norm and no MLP norm)."""
    names = [o.name for o in layer.ops]
    return layer.kind == "block" and any("attention_norm" in n for n in names) \
        and not any("ffn_norm" in n for n in names)


def rope_kernel(attention_factor: float) -> str:
    """Which RoPE Megatron-Core runs (``--apply-rope-fusion``): TE's fused kernel, unless YaRN's attention factor
    (``ModelSpec.rope_attention_factor``, the concentration factor on cos and sin) is not 1, where megatron-core
    0.16 ``rope_utils.apply_rotary_pos_emb`` warns "mscale=... is not supported by TE's fused RoPE. Using unfused
    implementation." and runs ``_apply_rotary_pos_emb_bshd`` (GPT-OSS: YaRN factor 32, 0.1 ln 32 + 1 = 1.35)."""
    return "fused" if attention_factor == 1.0 else "unfused"


def fused_rope_bytes(tokens: float, q_cols: float, k_cols: float, dtype_bytes: int, attention_factor: float = 1.0) \
        -> float:
    """Bytes of the op standing for Megatron-Core's RoPE over q and k: ``ROPE_PASSES`` of the kernel
    ``rope_kernel`` picks, a third of them (the op's forward), in the activations' dtype. Fused: each read and
    written once forward (Transformer Engine ``fused_apply_rotary_pos_emb``; Su et al. 2021 rotary embeddings)."""
    return ROPE_PASSES[rope_kernel(attention_factor)] / 3 * dtype_bytes * tokens * (q_cols + k_cols)


def megatron_rope(ops: list[OpTerm], dtype_bytes: int, attention_factor: float = 1.0) -> list[OpTerm]:
    """``ops`` with the elementwise ops between the last projection and the attention kernel (the captured fp32
    RoPE, its casts, the K/V expansion) as one op moving ``fused_rope_bytes`` (``layer_cost.runtime_ops``)."""
    attn = next((i for i, o in enumerate(ops) if o.kind == "attention" or o.attn_core), None)
    if attn is None:
        return ops
    last = max((i for i in range(attn) if ops[i].kind == "gemm"), default=-1)
    proj = [o for o in ops[:attn] if o.kind == "gemm" and o.shard == "tp" and o.gemm is not None][-3:]
    if len(proj) < 2 or not any(o.kind == "membound" for o in ops[last + 1:attn]):
        return ops  # no rotary region (fused QKV GPT, learned positions)
    q, k = proj[0], proj[1]  # (q, k, v) or MLA's (q, kv) projections
    rope = OpTerm(name=f"{rope_kernel(attention_factor)}_rope", kind="membound", shard="tp", fwd_flops=0.0,
                  bwd_flops=0.0, bytes_rw=fused_rope_bytes(q.gemm[0], q.gemm[1], k.gemm[1], dtype_bytes,
                                                           attention_factor))
    return ops[:last + 1] + [o for o in ops[last + 1:attn] if o.kind != "membound"] + [rope] + ops[attn:]


def cross_entropy_bytes(impl: str) -> tuple[int, int]:
    """(forward, backward) bytes per logit element of Megatron-Core's fused vocab-parallel cross-entropy.

    ``te`` (Transformer Engine ``parallel_cross_entropy``, transformer_engine/pytorch/triton/cross_entropy.py):
    one Triton pass reads the bf16 logits for the row max and sum (2), a second reads them again and
    writes the gradient in place (2 + 2); backward scales that gradient by the per-token loss gradient
    (``element_mul_kernel``: read and write, 4). ``native`` (megatron/core/fusions/fused_cross_entropy.py,
    megatron-core 0.16; each step a ``jit_fuser`` = torch.compile region): ``calculate_logits_max`` casts
    the logits to fp32 (read 2, write 4, the max fused), ``calculate_predicted_logits`` subtracts the max
    and exponentiates in place with the sum fused (read 4, write 4), ``calculate_cross_entropy_loss``
    divides in place (read 4, write 4): 22; backward ``calculate_gradients`` updates the saved fp32
    softmax in place, scales it and casts to bf16 (read 4, write 4 + 2): 10."""
    if impl not in CROSS_ENTROPY_IMPLS:
        raise ValueError(f"cross_entropy={impl!r} is not one of {', '.join(CROSS_ENTROPY_IMPLS)}")
    return (6, 4) if impl == "te" else (22, 10)


def megatron_loss(ops: list[OpTerm], impl: str) -> list[OpTerm]:
    """An output layer's ops with its loss (the elementwise op after the logits GEMM) as Megatron-Core's
    fused cross-entropy ``impl`` runs it: one op over the [tokens, vocab] logits (vocab-parallel: split
    by tp like the logits) moving ``cross_entropy_bytes``. Elementwise backward is priced at twice its
    forward (``layer_cost._op_time``), so the op carries a third of the forward + backward bytes. The
    elementwise ops after the GEMM (the captured upcast and loss) are the ones it replaces."""
    head = next((i for i, o in enumerate(ops) if o.kind == "gemm" and o.gemm is not None), None)
    tail = ops[head + 1:] if head is not None else []
    if not tail or any(o.kind != "membound" for o in tail):
        return ops
    m, n, _ = ops[head].gemm
    fwd, bwd = cross_entropy_bytes(impl)
    loss = replace(tail[0], name=f"{impl}_cross_entropy", sig=None, fwd_flops=sum(o.fwd_flops for o in tail),
                   bwd_flops=sum(o.bwd_flops for o in tail), bytes_rw=m * n * (fwd + bwd) / 3)
    return ops[:head + 1] + [loss]


def expert_bias_bytes(rows: float, hidden: float, dtype_bytes: int) -> tuple[float, float]:
    """(forward, backward) bytes of Megatron-Core adding the experts' fc2 biases after the grouped GEMM
    (megatron-core 0.16 ``TEGroupedMLP._apply_bias``, ``linear_fc2`` built with ``skip_bias_add``): per
    local expert ``t + b * p`` on its rows of the [rows, hidden] output (p the routing probability, in the
    activations' dtype without ``--moe-router-dtype``), then ``torch.cat`` of the experts' pieces. Forward:
    b * p written, t and it read and the sum written, the concatenation read and written: 6 element passes.
    Backward: the sum's and the concatenation's gradients pass through; the product's reduce
    (g * p).sum over rows for b and (g * b).sum over hidden for p, each writing and reading the product and
    reading g: 6 passes."""
    elements = rows * hidden
    return 6.0 * dtype_bytes * elements, 6.0 * dtype_bytes * elements


def glu_clamp_bytes(rows: float, ffn: float, dtype_bytes: int) -> tuple[float, float]:
    """(forward, backward) bytes of the eager clamp Megatron-Core runs before its fused gated activation when the
    model clamps the activation's inputs (GPT-OSS ``swiglu_limit`` 7: Megatron-Bridge ``GPTOSSProvider``
    ``activation_func_clamp_value`` 7.0 with ``bias_activation_fusion``). megatron-core 0.16
    ``fused_bias_geglu.weighted_bias_quick_geglu_impl`` (called by ``TEGroupedMLP.forward``) does, outside the
    fused kernel, ``x_glu, x_linear = input.chunk(2, -1)``, ``x_glu.clamp(max=c)``, ``x_linear.clamp(-c, c)`` and
    ``torch.cat`` of the two on the [rows, 2 ffn] fc1 output, ``ffn`` the local expert width. Per rows x ffn
    elements of ``dtype_bytes`` B: forward the two clamps read and write B each (4B) and the cat reads and writes
    2 ffn (4B): 8B. Backward (PyTorch derivatives.yaml): ``clamp_max`` -> ``where(self <= max, grad, 0)``, its
    mask written as bool (B + 1, then 1 + 2B); ``clamp`` -> ``where((self >= min).logical_and(self <= max), grad,
    0)`` (2(B + 1), 3, 1 + 2B); ``chunk``'s gradient is one ``cat`` of the two (4B): 11B + 8. The cat's own
    gradient is two views (no pass). The clamped copy the fused kernel saves: ``glu_clamp_saved_bytes``."""
    elements = rows * ffn
    return 8.0 * dtype_bytes * elements, (11.0 * dtype_bytes + 8.0) * elements


def glu_clamp_saved_bytes(rows: float, ffn: float, dtype_bytes: int) -> float:
    """Bytes one MoE layer saves per micro-batch beyond the unclamped program for the clamp ``glu_clamp_bytes``
    prices: megatron-core 0.16 ``weighted_bias_quick_geglu_impl`` hands the fused kernel the concatenated clamped
    copy, which ``WeightedBiasQuickGeGLUFunction.forward`` saves (``ctx.save_for_backward(input_for_backward,
    ...)``), while ``clamp`` and ``clamp_max`` save their inputs for their masks (derivatives.yaml: ``self``),
    views of the fc1 output the unclamped kernel would have saved alone. So one more [rows, 2 ffn] in the
    activations' dtype (``ffn`` the gate half's local width; ``activation_func_fp8_input_store`` would store it in
    1 byte: off by default and in Megatron-Bridge's GPT-OSS recipes). Run on megatron-core 0.16's own function
    (``benchmarks/megatron_clamp_saved.py``, CPU bf16, 4096 rows x 384): 6,291,456 B more saved, this count."""
    return 2.0 * rows * ffn * dtype_bytes


def expert_passes_s(timer: OpTimer, rows: float, local: float, hidden: float, dtype_bytes: int,
                    expert_bias: bool, clamp_ffn: float = 0.0) -> tuple[float, float]:
    """(forward, backward) seconds of the memory passes Megatron-Core runs on an expert-parallel rank's
    ``rows`` received tokens beside its ``local`` experts' GEMMs: the expert-major re-sort and back
    (``moe_cost.local_sort_bytes``, each direction), under fp8 the rows' padding for the fp8 GEMMs
    (``fp8_cost.te_expert_padding_bytes``), for a model with expert biases their addition
    (``expert_bias_bytes``) and, for one that clamps its gated activation's inputs, the eager clamp over the
    ``clamp_ffn``-wide halves (``glu_clamp_bytes``; 0: no clamp)."""
    sort = timer.membound(local_sort_bytes(rows, hidden, dtype_bytes, local))
    pad_f, pad_b = te_expert_padding_bytes(rows, hidden, local, dtype_bytes) if timer.dtype == "fp8" else (0.0, 0.0)
    fwd, bwd = expert_bias_bytes(rows, hidden, dtype_bytes) if expert_bias else (0.0, 0.0)
    clamp_f, clamp_b = glu_clamp_bytes(rows, clamp_ffn, dtype_bytes)
    return sort + timer.membound(pad_f + fwd + clamp_f), sort + timer.membound(pad_b + bwd + clamp_b)
