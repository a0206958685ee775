"""What each recompute mode re-runs in backward, as the program of each runtime runs it (per layer,
per micro-batch). ``layer_cost.price_layer`` reads these; the modes are ``codegen.runtime_ac``'s.

Under ``--runtime torch`` the emitted programs checkpoint with torch's non-reentrant checkpoint and its
selective-checkpoint policies; what they re-run was counted in backward with a dispatch-mode counter
(tests/test_cp_recompute.py: GEMM FLOPs, SDPA calls and collectives of llama-tiny on a fake group).
Other runtimes keep the textbook terms (Korthikanti et al. 2022): selective re-runs the attention
core, full the whole forward with its forward collectives.
"""

from __future__ import annotations

from autopar.cost_models.layer_model import LayerTemplate, OpTerm
from autopar.cost_models.tp_collectives import block_tp_collectives
from autopar.memo import MISS, IdentityMemo

# rerun_ops / rerun_tail by (mode, runtime) and the layer and its ops (kept beside the result): each pricing of a
# layer asks them for every mode (recompute_times, host_bound.layer_floor), and the search prices ~150 shardings
_RERUN = IdentityMemo(4096)


def rerun_ops(layer: LayerTemplate, ops: list[OpTerm], mode: str, runtime: str) -> list[int]:
    """Indices of the ops recompute ``mode`` re-runs in backward, as ``runtime``'s program runs them: the one
    rule both its seconds (``recompute_times``) and its kernel launches (``host_bound.layer_floor``) read.

    - ``selective``: the attention core (Korthikanti et al. 2022, Sec. 5). Under ``--runtime torch`` the
      emitted policy saves the attention module's projections and collectives and re-runs every other op
      of it, RoPE, the GQA repeat and SDPA included, up to ``wo`` (``attention_region``).
    - ``op``: the ops whose outputs the per-op policy does not keep.
    - ``full``: the forward but the ops of the early-stop tail (``rerun_tail``).

    Memoized (read-only lists: callers index with them)."""
    key, out = _RERUN.lookup((mode, runtime), (layer, ops))
    return _RERUN.put(key, (layer, ops), _rerun_ops(layer, ops, mode, runtime)) if out is MISS else out


def _rerun_ops(layer: LayerTemplate, ops: list[OpTerm], mode: str, runtime: str) -> list[int]:
    if mode == "selective":
        region = attention_region(ops) if runtime == "torch" else None
        return region if region is not None else [i for i, o in enumerate(ops) if o.attn_core]
    if mode == "op":
        return [i for i, o in enumerate(ops) if not o.op_kept]
    if mode == "full":
        tail = set(rerun_tail(layer, ops, runtime))
        return [i for i in range(len(ops)) if i not in tail]
    return []


def rerun_tail(layer: LayerTemplate, ops: list[OpTerm], runtime: str) -> list[int]:
    """Indices of the forward ops full recompute does not re-run: the early-stop tail of torch's checkpoint in
    the emitted programs (``early_stop_tail``); none for the other runtimes (the textbook full re-run).
    Memoized as ``rerun_ops`` (read-only)."""
    key, out = _RERUN.lookup(("tail", runtime), (layer, ops))
    if out is MISS:
        out = _RERUN.put(key, (layer, ops), early_stop_tail(layer, ops) if runtime == "torch" else [])
    return out


def recompute_times(layer: LayerTemplate, ops: list[OpTerm], fwds: list[float], runtime: str, fwd: float,
                    host: float) -> dict[str, float]:
    """Extra backward seconds of one layer per recompute mode (``fwds``: each op's forward, ``fwd``: the
    layer's, ``host``: its dispatch, a third of it the forward's, shared by its ops): the forward of the ops
    ``rerun_ops`` names, each with its share of the dispatch; ``full`` is the forward less its tail's ops (the
    layer's terms outside its ops, the expert passes, re-run with it)."""
    per_op = host / 3 / max(len(ops), 1)
    again = {m: rerun_ops(layer, ops, m, runtime) for m in ("selective", "op")}
    times = {m: sum(fwds[i] + per_op for i in idx) for m, idx in again.items()}
    full = fwd - sum(fwds[i] + per_op for i in rerun_tail(layer, ops, runtime))
    return {"none": 0.0, **times, "full": full}


def attention_region(ops: list[OpTerm]) -> list[int] | None:
    """Indices of the ops selective recompute re-runs in the emitted programs: those of the attention
    module (after ``attention_norm``, before ``attention_wo``: the catalog's names) but its projections,
    whose outputs the policy saves (``runtime_ac._selective_context``); ``wo``'s input is the last tensor
    it rebuilds. None for a graph without those names."""
    bounds = _attention_bounds(ops)
    return None if bounds is None else [i for i in range(*bounds) if ops[i].kind != "gemm" or ops[i].batched]


def _attention_bounds(ops: list[OpTerm]) -> tuple[int, int] | None:
    """(first op, ``wo``) indices of the attention module: after ``attention_norm``, up to ``attention_wo``."""
    start = next((i for i, o in enumerate(ops) if o.name.endswith("attention_norm")), None)
    end = next((i for i, o in enumerate(ops) if o.name.endswith("attention_wo")), None)
    return None if start is None or end is None or end < start else (start + 1, end)


def early_stop_tail(layer: LayerTemplate, ops: list[OpTerm]) -> list[int]:
    """Indices of a block's ops full recompute does not re-run in the emitted programs: torch's
    non-reentrant checkpoint stops recomputing once every tensor the backward keeps is rebuilt
    (``torch.utils.checkpoint``, ``early_stop``, on by default), so the ops after the last one whose
    output is saved never run again: for a dense block the last linear, its tp collective and the
    residual add."""
    if layer.kind != "block":
        return []
    saved = {t.name.split(":")[0] for t in layer.saved}
    kept = [i for i, o in enumerate(ops) if o.name in saved or o.name.split(".")[0] in saved]
    return list(range(kept[-1] + 1, len(ops))) if kept else []


def tp_rerun(layer: LayerTemplate, s, runtime: str, tp_s: float, modules: tuple[int, int, int],
             tail: list[OpTerm], topk: int = 0) -> tuple[float, float]:
    """(full, op) seconds of the tensor-parallel collectives recompute re-runs, of the layer's exposed
    ``tp_s`` (``modules``: ``layer_cost._tp_modules``, row- and column-parallel linears). Megatron-LM and
    the runtimes not counted: the forward's, half; op keeps sequence parallel's reduce-scatters (a
    quarter re-run). The emitted programs (``--runtime torch``): without sp ``rows`` of the
    ``2 rows`` all-reduces are the forward's (row-parallel outputs; the backward all-reduces each
    sub-layer's input gradient once), with sp an all-gather before and a reduce-scatter after each
    sub-layer of the ``4 rows`` collectives (MLA, MoE: ``tp_collectives``, shares by bytes); op re-runs
    the all-reduces and all-gathers; neither re-runs the collective of a row-parallel linear in the
    early-stop ``tail``."""
    rows = modules[0]
    # rows == 0: a layer whose split linears are not counted by name (a Hugging Face model priced from its
    # own tp plan): the runtimes' halves
    if runtime != "torch" or layer.kind != "block" or s.tp == 1 or rows == 0:
        return tp_s / 2, tp_s / (4 if s.sequence_parallel else 2)
    skip = any(o.kind == "gemm" and o.shard == "tp" and o.tp_dim == "k" for o in tail)
    full, op = block_tp_collectives(layer, s.sequence_parallel, s.ep, topk, s.etp).rerun_shares(skip)
    return tp_s * full, tp_s * op


def selective_bytes(layer: LayerTemplate, ops: list[OpTerm], sh, dtype_bytes: int) -> tuple[float, float]:
    """(kept, rebuilt) change of one block's saved bytes under the emitted programs' selective recompute
    against the ``none`` set (``--runtime torch``; ``sh``: ``layer_model.Shards``): the tensors the attention
    module's re-run ops saved are dropped (``attention_region``: the RoPE'd q, the repeated K/V, SDPA's
    output and log-sum-exp) and rebuilt in backward, and the policy keeps the projections' outputs
    (q, k, v, ``wo``'s). Measured without tp (tests/test_cp_recompute.py: the policy's cache, saved-tensor
    hooks); under tp, where the policy also caches the collectives' outputs, none's set is kept (unmeasured)."""
    region = attention_region(ops) if layer.kind == "block" and sh.tp == 1 else None
    if region is None:  # under tp the policy also caches collectives' outputs (unmeasured): none's set
        return 0.0, 0.0
    names = {ops[i].name for i in region}
    dropped = sum(t.bytes if t.const else t.bytes * sh.tokens / sh.of(t.shard)
                  for t in layer.saved if t.name.split(":")[0] in names and not t.attn_core)
    start, end = _attention_bounds(ops)
    kept, already = 0.0, {t.name.split(":")[0] for t in layer.saved}
    for o in ops[start:end + 1]:
        if o.kind != "gemm" or o.batched or o.gemm is None or o.name in already:  # already saved (SDPA's q, k, v)
            continue
        rows, cols = o.gemm[0] * sh.tokens, o.gemm[1]
        split = sh.tp if o.shard == "tp" and o.tp_dim == "n" else 1
        kept += rows * cols / split * dtype_bytes
    return kept - dropped, dropped
