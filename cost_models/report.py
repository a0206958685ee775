"""Turn an ``Estimate`` into the JSON that ``estimate --json`` and ``plan --json`` print,
and find priced fixes for a strategy that does not fit."""

from __future__ import annotations

from autopar.core.strategy import COMPACT_KEYS, Strategy
from autopar.core.units import seconds
from autopar.cost_models.comm import collective_time
from autopar.cost_models.estimate import CostModel, Estimate
from autopar.errors import InputError
from autopar.techniques import offload

GiB = 1024**3

FLOPS_BASIS = {
    "tflops_per_gpu": "Megatron-LM eq. 3 (Narayanan et al. SC21): forward + backward FLOPs of every op in the "
                      "captured graph, plus the recomputed forward when recompute=full; divided by step time "
                      "and GPU count",
    "mfu": "model FLOPs (forward + backward, no recompute) / (step time x GPUs x dense peak of the dtype)",
}


def estimate_dict(e: Estimate, cm: CostModel | None = None) -> dict:
    """The keys shared by ``estimate --json`` and the plans of ``plan --json``; with the
    ``CostModel`` that priced it, ``sources.terms`` says where every cost term came from."""
    worst = e.worst_rank
    return {
        "strategy": e.strategy.model_dump(),
        "strategy_string": e.strategy.compact(),
        "step_time_s": e.step_time_s,
        "tokens_per_s": e.tokens_per_s,
        "samples_per_s": e.strategy.global_batch / e.step_time_s,
        "tflops_per_gpu": e.tflops_per_gpu,
        "mfu": e.mfu,
        "feasible": e.feasible,
        "memory": {
            "peak_bytes": e.peak_bytes,
            "reserved_peak_bytes": e.reserved_peak_bytes,
            "capacity_bytes": e.capacity_bytes,
            "usable_bytes": e.usable_bytes + e.memory_overhead,
            "breakdown": worst.memory,
            "worst_stage": worst.rank,
            "host_bytes_per_gpu": max(r.host_bytes for r in e.ranks),
            "host_usable_bytes_per_gpu": e.host_usable_bytes,
            "pooled_peak_bytes": e.pooled_peak_bytes,  # device + host in one memory (CPU ranks)
            "stages": [{"stage": r.rank, "peak_bytes": r.mem_bytes, "in_flight_microbatches": r.in_flight,
                        "layers": [r.layers[0], r.layers[-1] + 1] if r.layers else [], "breakdown": r.memory}
                       for r in e.ranks],
        },
        "time": {
            "breakdown": e.time,
            "host_floor_s": e.host_floor_s,   # of step_time_s: what the eager host's launches add (host_bound)
            "stages": [{"stage": r.rank, "fwd_s": r.fwd_s, "bwd_s": r.bwd_s, "recompute_s": r.recompute_s,
                        "comm_s": r.comm_s} for r in e.ranks],
        },
        "flops_basis": FLOPS_BASIS,
        "model_flops_per_step": e.model_flops,
        "peak_flops_per_gpu": e.peak_flops,  # dense peak of the dtype: the MFU denominator train.py logs with
        "hardware_flops_per_step": e.hardware_flops,
        "sources": {**e.sources, "terms": term_sources(cm, e)} if cm is not None else e.sources,
        "host_bound": host_bound_note(e, cm),   # the one line, or None below MATERIAL_HOST of the step
    }


# The host floor is named when it adds at least this share of the step. The H100 runs it was fitted on priced the
# host-bound steps 3-20% off the measured ones (docs/validation.md "The host-bound step, priced": moe-gpu mbs 1
# +13.8% / +2.7%, mbs 2 full recompute -19.6%): a smaller addition is inside that error, and naming it would send a
# user to change the micro-batch or the expert layout for a gain the model cannot tell from its own error.
MATERIAL_HOST = 0.10


def host_bound_note(e: Estimate, cm: CostModel | None = None) -> str | None:
    """One line when the eager host's kernel launches hold the GPU back by at least ``MATERIAL_HOST`` of the step
    (``Estimate.host_floor_s``): how much, and what lowers it. A micro-batch's launches do not grow with its size,
    and a rank launches each expert op once per local expert, so twice the micro-batch (fewer micro-batches) and
    twice the ep are priced with ``cm`` and named where valid, fitting and faster; a captured program (CUDA
    graphs, torch.compile) is named as the model does not price it."""
    added, s = e.host_floor_s, e.strategy
    if added < MATERIAL_HOST * e.step_time_s:
        return None
    tries = [{"micro_batch": 2 * s.micro_batch}, {"ep": 2 * s.ep}] if cm is not None else []
    found = [_priced_change(cm, s, t) for t in tries if "ep" not in t or cm.spec.num_experts]
    fixes = [f"{label} ({seconds(x.step_time_s)} a step)" for label, _, x in filter(None, found)
             if x.feasible and x.step_time_s < e.step_time_s]
    return (f"host-bound: kernel launches add {seconds(added)} ({100 * added / e.step_time_s:.0f}% of the step) to "
            "the GPU's own time; fix: " + ", ".join(fixes + ["CUDA graphs or torch.compile (not priced)"]))


def term_sources(cm: CostModel, e: Estimate) -> dict:
    """Per cost term: compute as counts of op terms over all layers priced from a measured op
    ("measurement"), fitted curves ("fit") or datasheet curves ("datasheet"); each collective
    term "measurement" (a CommFit from profile-comm) or "datasheet" (link bandwidths)."""
    s = e.strategy
    counts = {"measurement": 0, "fit": 0, "datasheet": 0}
    for c in cm.layer_costs(s).values():
        for k, v in (c.source_counts if c is not None else {}).items():
            counts[k] = counts.get(k, 0) + v
    out: dict = {"compute": counts, "optimizer": cm.timer.source}
    groups = {"tp_comm": ("all_gather" if s.sequence_parallel else "all_reduce", s.tp, 1),
              "etp_comm": ("all_gather", s.etp, 1), "cp_comm": ("p2p", s.cp, s.tp),
              "ep_comm": ("all_to_all", s.ep, s.etp), "pp_comm": ("p2p", s.pp, s.world // s.pp),
              "dp_comm": ("reduce_scatter" if s.zero_stage else "all_reduce", s.dp * s.cp, s.tp)}
    for term, (kind, size, stride) in groups.items():
        if e.time.get(term, 0.0) > 0 and size > 1:
            out[term] = collective_time(kind, 1e6, size, stride, cm.cluster, fits=cm.ctx.fits).source
    return out


def overflow_bytes(e: Estimate) -> float:
    return e.peak_bytes - e.memory_overhead - e.usable_bytes


def host_overflow_message(e: Estimate) -> str:
    """Why an estimate whose device memory fits still does not: offloaded states over host memory."""
    return (f"offloaded states need {e.host_peak_bytes / 2**30:.1f} GiB of host memory per GPU, over the "
            f"{(e.host_usable_bytes or 0) / 2**30:.1f} GiB usable (host_mem_bytes x host_usable_fraction of the "
            f"GPU profile); shard them over more GPUs or turn offload off")


def candidate_fixes(cm: CostModel, s: Strategy, base: Estimate | None = None) -> list[tuple[str, Estimate]]:
    """Knob changes of a strategy that does not fit, each priced by the model: every single
    change that lowers the peak, then (when none fits alone) the greedy combination that
    applies the most helpful change until the strategy fits or nothing helps."""
    base = base or cm.estimate(s)
    singles = [(label, e) for label, _, e in _single_changes(cm, s) if e.peak_bytes < base.peak_bytes]
    if any(e.feasible for _, e in singles):
        return singles
    labels, cur, cur_e = [], s, base
    for _ in range(4):
        options = [(label, cand, e) for label, cand, e in _single_changes(cm, cur) if e.peak_bytes < cur_e.peak_bytes]
        if not options:
            break
        label, cur, cur_e = min(options, key=lambda o: (not o[2].feasible, o[2].peak_bytes))
        labels.append(label)
        if cur_e.feasible:
            break
    if len(labels) > 1:
        singles.append((" + ".join(labels), cur_e))
    return singles


def _single_changes(cm: CostModel, s: Strategy) -> list[tuple[str, Strategy, Estimate]]:
    tries: list[dict] = []
    if s.zero_stage < 3 and s.dp * s.cp > 1:
        tries += [{"zero_stage": z} for z in range(s.zero_stage + 1, 4)]
    if not s.offload_optimizer and cm.gpu.host_link_gbps:  # below ZeRO-3 offload runs (and is emitted) as zero=2
        on = s.model_copy(update={"offload_optimizer": True})
        tries.append({"zero_stage": 2, "offload_optimizer": True} if offload.stage_rule(on, None, s.world, None)
                     else {"offload_optimizer": True})
    if s.recompute == "none":
        tries += [{"recompute": "selective"}, {"recompute": "full"}]
    elif s.recompute == "selective":
        tries.append({"recompute": "full"})
    if s.tp > 1 and not s.sequence_parallel:
        tries.append({"sequence_parallel": True})
    if s.micro_batch > 1:
        tries.append({"micro_batch": 1})
    for key in ("tp", "pp"):
        if s.dp % 2 == 0:
            tries.append({key: getattr(s, key) * 2, "dp": s.dp // 2})
    return [x for x in (_priced_change(cm, s, change) for change in tries) if x is not None]


def _priced_change(cm: CostModel, s: Strategy, change: dict) -> tuple[str, Strategy, Estimate] | None:
    """(label such as ``zero=3,mbs=2``, the changed strategy, its estimate), or None where it breaks a rule."""
    try:
        cand = Strategy(**{**s.model_dump(), **change}).resolve(s.world)
        cm.check(cand)
    except (InputError, ValueError):
        return None
    return ",".join(f"{_key(k)}={_val(v)}" for k, v in change.items()), cand, cm.estimate(cand)


def _key(k: str) -> str:
    return COMPACT_KEYS.get(k, k)   # the compact names Strategy owns


def _val(v) -> str:
    return str(int(v)) if isinstance(v, bool) else str(v)
