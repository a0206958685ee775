"""Mixture-of-experts and context-parallel terms of one layer: pure formulas, each with its source;
their constants are per GPU type and software stack (``core.gpu.StackConstants``, fitted by
``benchmarks/calibrate_modern.py``; neutral defaults leave the pricing as it was).

- ``grouped_expert_time``: the local experts of one MoE layer run as one grouped GEMM
  (Megatron-Core ``--moe-grouped-gemm``: Transformer Engine ``GroupedLinear`` / CUTLASS grouped
  GEMM; MegaBlocks, Gale et al. 2023, Sec. 5) instead of a loop of per-expert GEMMs (autopar's own
  ``codegen/runtime_moe.py``). One kernel schedules the tiles of every expert together, so the
  fixed launch and wave-tail cost is paid once per group (the efficiency curve is read at the
  group's FLOPs); each expert's rows are still padded to the row tile, so tokens per expert set
  the padding waste (``tile_fill``).
- ``capped_load``: token-drop routing with a capacity factor (or forced balancing) bounds the
  busiest expert's load, which dropless routing leaves to the router's imbalance.
- ``ep_exposed``: the token dispatch / combine all-to-alls of one micro-batch run beside the
  compute of another (Megatron-Core ``--overlap-moe-expert-parallel-comm``, the 1F1B
  all-to-all overlap; DeepSeek-V3 technical report, Liu et al. 2024, Sec. 3.2.1, DualPipe);
  a share ``overlap`` can hide, and only as long as the compute window lasts
  (``overlap.exposed_behind``).
- ``etp_gathered_bytes``: expert tensor parallel gathers the tokens each rank received over the
  ``etp`` group before the expert GEMMs and reduce-scatters the outputs after them, so both
  collectives move ``etp`` times the rank's own received tokens.
- ``local_sort_bytes``: a Megatron-Core expert-parallel rank holding several experts re-sorts the
  tokens the dispatch all-to-all delivered (grouped by source rank) into expert order, and back
  before the combine: one more read and write of every received token each way.
- ``expert_loop_bytes``: autopar's torch programs run a layer's local experts as a loop of per-expert
  GEMMs on views of the stacked weights (``profiles/models/layers.py`` ``GroupedExperts.run_sorted``):
  the forward concatenates the experts' outputs, the backward stacks their weight gradients.
- ``ring_exposed``: context parallelism as a ring (Liu et al. 2023, Ring Attention; Megatron-Core /
  Transformer Engine ``AttnFuncWithCPAndKVP2P``): ``cp - 1`` steps each pass a K,V chunk while the
  attention kernel works on the previous one; backward passes K, V, dK, dV (twice the bytes)
  beside 2.5x the forward work. Only what outlasts the attention kernel of the step shows.
"""

from __future__ import annotations

import math

from autopar.cost_models.overlap import exposed_behind

ROW_TILE = 128  # rows of one GEMM output tile (CUTLASS / cuBLAS Hopper grouped GEMM tiles: 128 x 128/256)


def tile_fill(rows: float, tile: int = ROW_TILE) -> float:
    """Share of the computed rows that are real when ``rows`` tokens of one expert are padded to
    whole row tiles (MegaBlocks, Gale et al. 2023, Sec. 3: per-expert padding of grouped GEMMs)."""
    if rows <= 0:
        return 1.0
    return rows / (math.ceil(rows / tile) * tile)


def grouped_expert_time(per_call_s: float, calls: float, group_s: float, rows: float) -> float:
    """Time of ``calls`` expert GEMMs of one layer on one rank run as one grouped GEMM:
    ``group_s`` is one GEMM of all their FLOPs (one launch, one tail), slowed by the row-tile
    padding of each expert's ``rows`` tokens; never slower than the per-expert loop
    (``calls`` x ``per_call_s``), which a grouped kernel falls back to."""
    if calls <= 1:
        return per_call_s * max(calls, 0.0)
    return min(calls * per_call_s, group_s / tile_fill(rows))


def capped_load(load: float, capacity_factor: float | None) -> float:
    """Busiest expert's tokens over the mean once the router caps each expert at ``capacity_factor``
    x its mean share (Switch Transformer, Fedus et al. 2022, Sec. 2.1: expert capacity = capacity
    factor x tokens / experts; the tokens over it are dropped, so no expert computes or receives
    more). Forced balancing (Megatron-Core ``--moe-router-force-load-balancing``, the benchmark
    mode of its MoE performance tables) routes every expert the mean: capacity 1. ``None``:
    dropless routing, the load as it comes."""
    return load if capacity_factor is None else min(load, capacity_factor)


def local_sort_bytes(received_rows: float, hidden: float, dtype_bytes: float, local_experts: float) -> float:
    """Bytes one direction (forward or backward) of a layer's token re-sort moves on an expert-parallel
    rank: Megatron-Core's all-to-all dispatcher (``MoEAlltoAllTokenDispatcher``,
    megatron/core/transformer/moe/token_dispatcher.py) receives its tokens grouped by source rank,
    then by expert; when the rank holds more than one expert it reorders them expert-major for the
    grouped GEMM (``sort_chunks_by_idxs`` after the dispatch all-to-all) and back before the combine
    all-to-all: two permutations of the ``received_rows`` token copies of ``hidden`` values, each
    reading and writing them once. Backward runs the inverse permutations on the gradients (the same
    bytes). One local expert: the tokens already arrive in expert order, no sort."""
    if local_experts <= 1:
        return 0.0
    return 2 * 2.0 * received_rows * hidden * dtype_bytes


def etp_gathered_bytes(received_bytes: float, etp: int) -> float:
    """Bytes of the gathered buffer of one expert-tensor-parallel all-gather (its output) and of the
    matching reduce-scatter (its input), per direction of one MoE layer: each of the ``etp`` ranks
    of a group received ``received_bytes`` of routed tokens from the dispatch all-to-all, and every
    rank's ffn shard needs all of them. Megatron-Core ``MoEAlltoAllTokenDispatcher``
    (megatron/core/transformer/moe/token_dispatcher.py, v0.11): "permute -> A2A(EP) -> AG(TP) ->
    sort_chunk" and "sort_chunk -> RS(TP) -> A2A(EP) -> unpermute", the TP group being the expert
    tensor-parallel one (plain Megatron-Core before MoE Parallel Folding: etp = tp; Liu et al.
    2025, Sec. 3); autopar's own ``codegen/runtime_moe.py`` gathers and reduce-scatters the same
    rows over etp. Backward runs the pair reversed on the gradients (the same bytes)."""
    return received_bytes * etp if etp > 1 else 0.0


def ep_exposed(a2a_s: float, compute_s: float, overlap: float) -> float:
    """Exposed seconds of a layer's all-to-alls (dispatch + combine, forward + backward) when a
    share ``overlap`` of them runs beside ``compute_s`` of another micro-batch's work."""
    return exposed_behind(a2a_s, compute_s, overlap)


def ring_exposed(cp: int, step_s: float, attn_fwd_s: float) -> float:
    """Exposed seconds of one layer's context-parallel ring per micro-batch (forward + backward):
    each of the ``cp - 1`` steps moves K,V (``step_s``) beside ``attn_fwd_s / cp`` of attention
    forward, and in backward K,V,dK,dV (``2 step_s``) beside 2.5x that (FlashAttention's backward
    / forward FLOP ratio). ``attn_fwd_s`` is the kernels' priced time, i.e. of the score blocks a
    causal kernel performs (``compute.causal_block_fraction``), not of the full s^2."""
    if cp <= 1:
        return 0.0
    per_step = attn_fwd_s / cp
    return (cp - 1) * (max(0.0, step_s - per_step) + max(0.0, 2 * step_s - 2.5 * per_step))


def expert_loop_bytes(rows: float, hidden: float, local_params: float, dtype_bytes: float) -> tuple[float, float]:
    """(forward, backward) bytes one MoE layer's per-expert loop moves in autopar's torch programs beyond
    the captured dispatch, GEMMs, SwiGLU and combine (``GroupedExperts.run_sorted``): the forward's
    ``torch.cat`` of the experts' outputs reads and writes the ``rows`` received token copies of ``hidden``
    values once; the experts read their weights through ``unbind``, whose backward is one ``torch.stack``
    of the per-expert weight gradients (PyTorch tools/autograd/derivatives.yaml, ``unbind``:
    ``unbind_backward`` -> ``at::stack``): every local expert weight's gradient read and written once,
    ``local_params`` values. A grouped GEMM (Megatron-Core, ``moe_cost.grouped_expert_time``) writes the
    weight gradients in place and concatenates nothing."""
    return 2.0 * rows * hidden * dtype_bytes, 2.0 * local_params * dtype_bytes


def expert_grad_stack_bytes(local_expert_bytes: float, weights: int = 3) -> float:
    """Transient bytes of the torch programs' weight-gradient stack (``expert_loop_bytes``) beyond the
    gradients themselves: every local expert's per-expert gradient piece is live when the stacks run
    (together one copy of the ``local_expert_bytes``: the gradient, counted as such), and each of the
    ``weights`` stacked weights (w1, w3, w2) is written while its own pieces are still live, one at a
    time. Measured on one process (``LiveTensorBytes``, 8 experts h256 f512, 512 tokens): the backward's
    peak over its start fell by 1.0x the expert weights from the per-expert ``w1[e]`` indexing, which
    held about one more full copy."""
    return local_expert_bytes / weights
