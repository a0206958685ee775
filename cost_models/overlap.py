"""What hides behind compute, and what it costs when it does: pure formulas whose constants are
fitted per GPU type and software stack (``core.gpu.StackConstants``, ``profiles/hardware/*.yaml``,
fitted by ``benchmarks/calibrate_modern.py`` over the published runs; never per run).

- ``exposed_behind``: a prefetched collective overlaps compute only partly. A share
  ``overlap`` of it can run beside the compute window; the rest (issue order, waits on the
  previous bucket, the allocator's rate limiter in FSDP, DeepSpeed's bucketed prefetch that
  trails the layer it serves) is serialised. Zhao et al. 2023 (PyTorch FSDP, VLDB) Sec. 4-5
  and Rajbhandari et al. 2020 (ZeRO) Sec. 7 describe the prefetch; how much of it hides is
  what the fitted ``overlap`` measures.
- ``zero3_edges``: what no prefetch hides: the first all-gather of a step (nothing runs before
  it) and the last reduce-scatter (nothing runs after it) (Zhao et al. 2023, Fig. 6).
- ``contention_time``: communication kernels running beside compute take SMs and HBM
  bandwidth from it (NCCL uses 16-32 CTAs per collective; Jangda et al. 2022, "Breaking the
  computation and communication abstraction barrier", Sec. 2): compute slows by ``slowdown``
  seconds per second of communication it hides.
- ``rate_capped``: a stack whose ZeRO-3 collectives move bytes below the ring model's rate.
- ``inter_node_factor``: across nodes, data-parallel rings and trees lose bus bandwidth as the
  node count grows (more switch hops, congestion, stragglers: NCCL tests on large clusters,
  MegaScale, Jiang et al. 2024, Sec. 3.3): time x (1 + decay * log2(nodes)).
"""

from __future__ import annotations

import math


def exposed_behind(comm_s: float, compute_s: float, overlap: float) -> float:
    """Exposed seconds of ``comm_s`` issued beside ``compute_s``: the share ``1 - overlap`` runs
    alone, the overlappable share shows only where it outlasts the compute window."""
    if comm_s <= 0:
        return 0.0
    return (1.0 - overlap) * comm_s + max(0.0, overlap * comm_s - compute_s)


def zero3_edges(first_gather_s: float, last_reduce_scatter_s: float) -> float:
    """ZeRO-3 / FSDP seconds no prefetch hides, once per step: the first layer's all-gather and
    the last layer's reduce-scatter."""
    return first_gather_s + last_reduce_scatter_s


def contention_time(hidden_comm_s: float, slowdown: float) -> float:
    """Compute seconds lost to communication kernels that ran beside it (SM / HBM contention)."""
    return max(0.0, hidden_comm_s) * slowdown


def inter_node_factor(nodes: int, decay: float) -> float:
    """Multiplier on a data-parallel collective's time when its group spans ``nodes`` nodes."""
    if nodes <= 1 or decay <= 0:
        return 1.0
    return 1.0 + decay * math.log2(nodes)


def rate_capped(ring_s: float, moved_bytes: float, gbps: float) -> float:
    """Seconds of a collective whose bytes the stack moves no faster than ``gbps`` per GPU:
    max(ring model, bytes each GPU receives / rate); ``gbps`` 0 keeps the ring model.

    DeepSpeed ZeRO-3 as Narayanan et al. 2021 (SC21, Sec. 5.2, Table 2) ran it gathers parameter
    by parameter on the full data-parallel group (``partition_parameters._allgather_params``: a
    list ``all_gather`` per fetch, then per-rank copies into the full tensor) and re-partitions
    after use; each call moves ~1 MB per rank around a 640-1,120-rank ring, so the NCCL ring's
    8-NIC bus bandwidth (what the ring model assumes) is not reached. The effective rate is a
    fitted constant; it does not shrink with the batch, so as each GPU's batch share falls the
    step is more and more this traffic (Table 2: 138 TFLOP/s on 640 GPUs, 98 on 1,120)."""
    if gbps <= 0 or moved_bytes <= 0:
        return ring_s
    return max(ring_s, moved_bytes / (gbps * 1e9))


def grad_sync_exposed(sync_s: float, last_bwd_s: float, first_fwd_s: float, gather_ahead: bool) -> float:
    """Data-parallel gradient sync (DDP's all-reduce, or ZeRO-1/2's reduce-scatter + all-gather)
    left beyond the compute it runs beside. The buckets reduce during the step's last micro-batch
    backward (the others run under ``no_sync``: Li et al. 2020, PyTorch DDP, Sec. 3.2.3; Megatron
    ``--overlap-grad-reduce``), so that one backward hides it. ``gather_ahead``: Megatron-Core's
    distributed optimizer with ``--overlap-param-gather`` (the Megatron-Core README's H100 runs;
    NeMo 2 / Megatron-Bridge's default DDP config) all-gathers the updated parameters bucket by
    bucket beside the next step's first forward, so the reduce-scatter half hides behind the last
    backward and the all-gather half behind that forward. autopar's ZeRO-1 program runs the same
    (``codegen.runtime_zero1``: reduce-scatters from post-accumulate-grad hooks in the last
    backward, all-gathers waited in forward pre-hooks; ``fsdp.gathers_next_forward``). The last
    bucket's reduce-scatter and the first one's gather hide behind nothing: the caller adds them
    (``fsdp.step_sync_exposed``)."""
    if not gather_ahead:
        return max(0.0, sync_s - last_bwd_s)
    return max(0.0, sync_s / 2 - last_bwd_s) + max(0.0, sync_s / 2 - first_fwd_s)


# Transformer Engine's userbuffers default for the row-parallel forward GEMMs (proj_fprop, fc2_fprop: the
# "pipeline" method): the GEMM and its output's reduce-scatter in 4 pieces (TE 2.x
# ``transformer_engine/pytorch/module/base.py`` ``initialize_ub.get_default_config``: ``num_splits`` 4, tp
# for "ring_exchange").
UB_PIPELINE_SPLITS = 4


def userbuffers_tp_exposed(ag_s: float, rs_s: float, reductions: int, window_s: float,
                           splits: int = UB_PIPELINE_SPLITS) -> float:
    """Exposed seconds of one block's sequence-parallel tensor-parallel collectives per micro-batch under
    Megatron-Core's ``--tp-comm-overlap`` (Transformer Engine userbuffers; Megatron-Core requires sequence
    parallelism for it). The block runs ``reductions`` all-gathers (``ag_s`` each) and reduce-scatters
    (``rs_s`` each) per pass, forward and backward. TE's defaults (``initialize_ub``): the column-parallel
    forward GEMMs (qkv, fc1) and the row-parallel dgrads (proj, fc2) receive their gathered input chunk by
    chunk around the tp ring ("ring_exchange": each chunk's transfer beside the previous chunk's GEMM);
    the row-parallel forward GEMMs (proj, fc2) reduce-scatter their output in ``splits`` pieces
    ("pipeline": each piece beside the next piece's GEMM, the last after the GEMM has finished); the
    column-parallel backward runs "bulk": the input all-gather for wgrad beside the dgrad GEMM, the dgrad's
    reduce-scatter beside the wgrad GEMM. What shows: the last piece of each forward reduce-scatter, plus
    whatever of the rest outlasts the block's compute ``window_s`` (forward + backward) it runs beside."""
    if reductions <= 0:
        return 0.0
    tail = reductions * rs_s / splits
    rest = 2 * reductions * (ag_s + rs_s) - tail
    return tail + max(0.0, rest - window_s)


def gathers_ahead(runtime: str, zero_stage: int) -> bool:
    """Whether the step's parameter all-gather runs beside the next step's first forward
    (``grad_sync_exposed``): Megatron-Core's distributed optimizer (ZeRO-1/2) with
    ``--overlap-param-gather``. DDP gathers nothing; autopar's ZeRO-1 program does, by its own
    rule (``fsdp.gathers_next_forward``: it depends on the dtype and parallelism, not the stage)."""
    return runtime == "megatron" and zero_stage in (1, 2)


def once_per_step_exposed(gather_s: float, reduce_scatter_s: float, first_fwd_s: float, overlap: float) -> float:
    """One FSDP unit's exposed seconds per step when a pipeline stage syncs once per step
    (``fsdp.syncs_once_per_step``): its all-gather is prefetched beside the stage's first forward
    (``exposed_behind``), its reduce-scatter runs after the stage's last backward with nothing to
    hide behind: ``perform_reduce_grad`` issues every unit's ``post_backward`` back to back, each
    waiting on the previous unit's reduce-scatter (torch 2.13 ``fsdp/_fully_shard/_fsdp_param_group.py``
    ``post_backward``, "post_backward_rs_wait") and the stage's ``_root_post_backward_final_callback``
    makes the compute stream wait on the last one, so the stage's whole reduce-scatter is exposed."""
    return exposed_behind(gather_s, first_fwd_s, overlap) + max(0.0, reduce_scatter_s)
