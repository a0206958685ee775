"""Dense rows whose source leaves part of the run unstated (Llama 3 405B, Megatron / NeMo dense rows):
what the source's own figures imply, filled once here for ``published_rows``."""

from __future__ import annotations

import re

LLAMA3 = "llama3"  # published_rows.source_key of the Llama 3 row


def llama3_v(run: dict, source: str, pp: int) -> int:
    """V (virtual stages per pipeline rank) of the Llama 3 405B pretraining runs; 0 for other sources.

    The paper (Llama Team 2024, arXiv:2407.21783, Sec. 3.3.2) runs an interleaved schedule with V
    stages per rank without stating V, and removes one layer from the first and the last stage
    (126 = 16 x 8 - 2 layers on pp 16). Its Table 4 pins V through the bubble (p-1)/(V·m): at 8k tokens
    (TP 8, PP 16) the TFLOP/s per GPU fall from 430 to 400 (x 0.93) as the micro-batches per pipeline
    halve from 32 (8,192 GPUs) to 16 (16,384 GPUs). Priced with this row's mapping
    (``benchmarks/llama3_table4.py --vpp V``), the two configurations' errors are -26.6% / -34.0% at
    V = 2 (a x 0.84 fall), -19.2 / -22.1% at 4, -16.3 / -17.1% at 6 and -15.5 / -15.5% at 7: only
    about one layer per virtual stage reproduces the published fall, as the paper's layout allows
    (V = 8: one layer each, the first and last stages one fewer). autopar takes at most one chunk per
    layer (pp x V <= 126): V = 126 // 16 = 7. Figures on tree e1d9f0d. A row that states V keeps it."""
    if source != LLAMA3 or pp <= 1:
        return 0
    stated = run["parallel"].get("vpp")
    if isinstance(stated, int) and not isinstance(stated, bool) and stated > 0:
        return stated
    return max(1, int(run["model"]["layers"]) // pp)


# Stacks whose tensor parallelism runs sequence parallel (sp = 1 for tp > 1 in ``published_rows.strategy_of``):
# Megatron-Core / NeMo by default, torchtitan always (``SequenceParallel`` norms), and Meta's Llama 3 stack:
# the paper's tensor parallelism cites Shoeybi et al. 2019 and Korthikanti et al. 2023, the sequence-parallel
# scheme (norms, dropout and residual adds sharded over the sequence; all-reduce as all-gather +
# reduce-scatter), as torchtitan, Meta's open version of the same FSDP + TP + PP + CP recipe, runs it; without
# it a layer keeps s·b·h·(10 + 24/t) activation bytes against 34·s·b·h/t (Korthikanti et al. Table 2), 3x
# more at t = 8. Priced (``benchmarks/llama3_table4.py``, V = 7, tree e1bcecc): sp = 0 put Table 4's three
# configurations at -15.5 / -15.5 / -17.9%, sp = 1 at -4.0 / -3.3 / -14.0% (elementwise ops on 1/8 of the
# tokens; tensor-parallel collectives 1.86 -> 1.39 s of the 8,192-GPU step).
SEQUENCE_PARALLEL_STACKS = ("megatron", "torchtitan", "meta")


def llama3_zero(source: str, pp: int) -> int | None:
    """The autopar ZeRO stage whose program moves what Meta's FSDP moves in the Llama 3 405B pipeline;
    None for other rows (their ``zero_stage`` field decides).

    The paper (Llama Team 2024, arXiv:2407.21783, Sec. 3.3.2): FSDP "shards optimizer states and
    gradients, but for model shards we do not reshard after forward computation"; "we use FP32 gradient
    accumulation during backward computation over multiple micro-batches and also reduce-scatter
    gradients in FP32 across data parallel workers in FSDP"; DP is outermost "because it can tolerate
    longer network latency by asynchronously prefetching sharded model weights and reducing gradients".
    Gradients accumulated whole across the micro-batches and then reduce-scattered are one
    reduce-scatter per step, as torch.distributed.pipelining runs FSDP (the stage keeps its parameters
    gathered and its gradients unsharded to its last backward: ``cost_models.fsdp.syncs_once_per_step``),
    not the per-micro-batch reduce-scatter of autopar's ZeRO-2 program. autopar's ZeRO-1 program moves
    the same bytes: whole parameters and gradients through the step, one gradient reduce-scatter and
    one parameter all-gather per step, optimizer states sharded; Meta's overlap them with the last backward
    (the paper's "asynchronously ... reducing gradients"; ``overlap.grad_sync_exposed``), autopar's does not:
    the row runs ``fsdp_impl`` "meta" (``cost_models.fsdp.syncs_after_backward``). It keeps the rest
    of Meta's recipe that ``--runtime torch`` prices and torchtitan's runtime would not: the all-gather
    context parallelism (``cp_cost``), tensor parallelism without async overlap. Its gradients are 16-bit
    (Meta's accumulators fp32: 2 bytes per parameter fewer; the rows state no memory). Priced
    (``benchmarks/llama3_table4.py``, 377d54e + this): ZeRO-2 per micro-batch -21.1 / -20.7 / -21.4%,
    this -4.0 / -3.3 / -15.8%."""
    if source != LLAMA3 or pp <= 1:
        return None
    return 1


MT_NLG = "mt-nlg"  # published_rows.source_key of the MT-NLG row
# Smith et al. 2022 (MT-NLG 530B, arXiv:2201.11990), Sec. 2.4: global batch 1,920 sequences of 2,048 tokens,
# 8-way tensor x 35-way pipeline per replica (280 GPUs = 35 DGX A100 nodes), on 280 / 350 / 420 nodes:
# "iteration time of 60.1, 50.2, and 44.4 seconds ... 126, 121, and 113 teraFLOP/s per GPU" (each pair
# agrees with Narayanan et al. eq. 3 to 0.5%). The shared row holds the 350-node figure only.
MT_NLG_STEP_S = {280: 60.1, 350: 50.2, 420: 44.4}
MT_NLG_GLOBAL_BATCH, MT_NLG_PP, MT_NLG_REPLICA_NODES = 1920, 35, 35


def one_f_one_b_microbatch(step_s: dict[int, float], global_batch: int, pp: int, replica_nodes: int) -> float:
    """The micro-batch size (sequences) under which a 1F1B pipeline's step, (m + p - 1) x one micro-batch's
    time with m = global_batch / (dp x mbs) micro-batches per pipeline, scales between the smallest and
    the largest of ``step_s`` (nodes -> published step seconds) as published (Narayanan et al. 2021,
    Sec. 2.2: the 1F1B bubble is p - 1 micro-batch slots whatever m is). Solves
    T_a / T_b = (B/(dp_a k) + p - 1) / (B/(dp_b k) + p - 1) for k; the per-micro-batch time cancels."""
    (na, ta), (nb, tb) = min(step_s.items()), max(step_s.items())
    ma, mb = global_batch / (na // replica_nodes), global_batch / (nb // replica_nodes)  # sequences per pipeline
    ratio = ta / tb
    return (ma - ratio * mb) / ((ratio - 1.0) * (pp - 1))


def mt_nlg_microbatch(source: str) -> int:
    """Sequences per micro-batch of the MT-NLG run (0 for other sources). The paper states none; its three
    configurations of one global batch pin it through the bubble (``one_f_one_b_microbatch``): 60.1 / 44.4 s
    on 280 / 420 nodes (240 / 160 sequences per pipeline) give k = 1.95, i.e. 2 sequences (120 / 96 / 80
    micro-batches); with one sequence per micro-batch the 420-node step would be 194 / 274 of the 280-node
    one (42.6 s, published 44.4). Priced with the row's mapping on 280 / 350 / 420 nodes
    (``benchmarks/mt_nlg_scaling.py``, shipped constants, tree 4740079): mbs 1 -> +24.5 / +25.9 / +29.4%,
    mbs 2 -> +12.0 / +10.8 / +11.7%:
    only mbs 2 reproduces the scaling; what is left is a per-micro-batch rate (the 2021 DeepSpeed pipeline
    engine against Megatron-LM's at the same shape, Narayanan et al. Table 1 530B, priced -2.4%)."""
    if source != MT_NLG:
        return 0
    return round(one_f_one_b_microbatch(MT_NLG_STEP_S, MT_NLG_GLOBAL_BATCH, MT_NLG_PP, MT_NLG_REPLICA_NODES))


def parallel_block(run: dict) -> bool:
    """The row's own system runs GPT with the parallel transformer block (PTB): attention and MLP
    read one LayerNorm's output and their outputs join the residual together, y = x + Attn(LN(x)) +
    MLP(LN(x)) (MegaScale, Jiang et al. NSDI 2024, Sec. 3.1; GPT-J; PaLM, Chowdhery et al. 2022,
    Sec. 2). The MegaScale rows' notes name it ("PTB"); the Megatron-LM baseline rows beside them
    (whose arch text only says MegaScale uses it) run the sequential block."""
    return "ptb" in re.findall(r"[a-z]+", str(run.get("notes") or "").lower())


def parallel_block_config(m: dict) -> dict:
    """GPT (LayerNorm with biases, GeLU MLP 4h, multi-head attention, fused QKV) in the one-norm
    parallel layout: the Falcon configuration with ``parallel_attn`` and a single LayerNorm
    (``profiles.hf_families.falcon``: ``block_layout="parallel"``)."""
    return dict(model_type="falcon", hidden_size=m["hidden"], num_hidden_layers=m["layers"],
                num_attention_heads=m["heads"], multi_query=False, new_decoder_architecture=False,
                parallel_attn=True, num_ln_in_parallel_attn=1, bias=True, alibi=False,
                ffn_hidden_size=m.get("ffn_hidden") or 4 * m["hidden"], vocab_size=m["vocab"],
                tie_word_embeddings=True)


def tp_comm_overlap_of(run: dict) -> bool:
    """Whether the row's Megatron-Core run states ``--tp-comm-overlap`` (Transformer Engine userbuffers:
    ``overlap.userbuffers_tp_exposed``), in its parallel note or notes: the Megatron-Core README's H100
    weak-scaling rows ("overlap flags: --overlap-grad-reduce --overlap-param-gather --tp-comm-overlap").
    A row that does not state it prices the stack's fitted ``tp_overlap``."""
    text = f"{run.get('parallel', {}).get('note') or ''} {run.get('notes') or ''}".lower()
    return "--tp-comm-overlap" in text or "tp_comm_overlap=true" in text.replace(" ", "")
