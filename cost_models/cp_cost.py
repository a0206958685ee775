"""Context-parallel communication of one block per micro-batch, as each runtime runs it.

- autopar's programs (``--runtime torch``, ``codegen/runtime_cp.py``): K and V all-gathered over the
  cp group before attention (one copy per K/V head) and their gradients reduce-scattered after its
  backward, each blocking: the attention waits for the gather, so nothing hides it. This is the
  all-gather variant of Llama 3 (Dubey et al. 2024, Sec. 3.3.2: "the all-gather communication
  latency is exposed in the critical path").
- Megatron-Core, torchtitan and the others: the ring (Liu et al. 2023, ring attention; Megatron-Core
  ``--context-parallel-size`` with p2p) whose steps hide behind attention (``moe_cost.ring_exposed``).
"""

from __future__ import annotations

from autopar.cost_models.comm import collective_time
from autopar.cost_models.memory import cp_kept_kv_bytes
from autopar.cost_models.moe_cost import ring_exposed


def cp_exposed(s, ctx, attn_fwd_s: float, sync_s: float) -> float:
    """Exposed cp seconds of one block per micro-batch, forward + backward (``ctx``: the layer's
    ``PricingContext``; ``attn_fwd_s``: its attention kernels' forward, the ring's window;
    ``sync_s``: the per-collective cost of ranks sharing cores)."""
    if ctx.runtime == "torch":
        return gathered_exposed(s.micro_batch, s.cp, s.tp, ctx, sync_s)
    kv = s.micro_batch * ctx.seq_len / s.cp * ctx.kv_bytes_per_token / s.tp
    step = collective_time("p2p", kv, s.cp, s.tp, ctx.cluster, fits=ctx.fits).time_s
    return ring_exposed(s.cp, step, attn_fwd_s)


def gathered_exposed(mbs: int, cp: int, tp: int, ctx, sync_s: float) -> float:
    """autopar's gathered cp of one block per micro-batch: both collectives, nothing hidden."""
    return sum(cp_gather(mbs, cp, tp, ctx)) + 2 * sync_s


def cp_gather(mbs: int, cp: int, tp: int, ctx) -> tuple[float, float]:
    """(forward all-gather, backward reduce-scatter) seconds of the gathered K/V of one block:
    ``mbs * seq`` tokens of ``kv_bytes_per_token / tp`` bytes each once gathered."""
    full = mbs * ctx.seq_len * ctx.kv_bytes_per_token / tp
    ag = collective_time("all_gather", full, cp, tp, ctx.cluster, fits=ctx.fits).time_s
    rs = collective_time("reduce_scatter", full, cp, tp, ctx.cluster, fits=ctx.fits).time_s
    return ag, rs


def cp_rerun_s(layer, s, ctx, sync_s: float) -> float:
    """The forward K/V gather full and per-op recompute repeat in backward (autopar's gathered cp only;
    selective's policy saves the all-gather's output: tests/test_cp_recompute.py counts them)."""
    if layer.kind != "block" or s.cp <= 1 or ctx.runtime != "torch":
        return 0.0
    return cp_gather(s.micro_batch, s.cp, s.tp, ctx)[0] + sync_s


def cp_kept_bytes(layer, s, ctx, recompute: str = "none") -> float:
    """The gathered K/V a block keeps under autopar's context parallelism with ``recompute``
    (``memory.cp_kept_kv_bytes``: SDPA's repeated K/V without recompute, the all-gather's output under
    selective, none under op and full, which re-gather them into their backward workspace). Other
    runtimes' ring attention exchanges K/V chunks without keeping the whole sequence (not priced here)."""
    if layer.kind != "block" or ctx.runtime != "torch":
        return 0.0
    return cp_kept_kv_bytes(recompute, s.micro_batch, ctx.seq_len, s.cp, s.tp, ctx.kv_bytes_per_token,
                            ctx.sdpa_kv_bytes_per_token)
