"""The short "why" of a plan: what limits the winner, what the runner-up loses on, and, when
nothing fits, how far the closest configuration overflows and what would make it fit."""

from __future__ import annotations

from collections import Counter

from autopar.core.strategy import FIELDS, Strategy
from autopar.cost_models.estimate import CostModel, Estimate
from autopar.cost_models.report import MATERIAL_HOST, host_bound_note, host_overflow_message, overflow_bytes, seconds
from autopar.cost_models.session import same_job
from autopar.errors import InputError
from autopar.planner.search import (
    Candidate,
    Constraints,
    floor_terms,
    knob_options,
    min_in_flight,
    probe,
    search,
    shardings,
)
from autopar.planner.stack_settings import split_phrase, stack_settings
from autopar.planner.stack_split import no_split
from autopar.techniques import offload
from autopar.techniques.base import cli_key, cli_value

GiB = 2**30
TIGHT_MEMORY = 0.05      # headroom below 5% of the usable memory: the winner is called memory-tight
MINOR = 0.02             # overheads below 2% of the step do not limit a plan
TERM_NAMES = {"bubble": "pipeline bubble", "tp_comm": "tensor-parallel communication",
              "cp_comm": "context-parallel communication", "ep_comm": "expert all-to-all",
              "etp_comm": "expert tensor-parallel communication", "pp_comm": "pipeline sends",
              "dp_comm": "exposed gradient / ZeRO communication", "recompute": "recomputation",
              "optimizer": "optimizer step", "compute": "compute"}


def why(cands: list[Candidate], cm: CostModel | None = None) -> list[str]:
    """Two to four sentences: the winner's limits, what its eager host's launches add when that is material
    (``report.host_bound_note``; ``cm`` prices its fix), then the runner-up's loss."""
    if not cands or cands[0].estimate is None:
        return []
    out = [_limits(cands[0], cm.stack_name if cm is not None else "torch", cm.spec if cm is not None else None)]
    host = host_bound_note(cands[0].estimate, cm)
    out += [host] if host else []
    if len(cands) > 1 and cands[1].estimate is not None:
        out.append(_runner_up(cands[0], cands[1]))
    return out


def _limits(c: Candidate, stack: str = "torch", spec=None) -> str:
    e = c.estimate
    over = {k: v for k, v in e.time.items() if k != "compute" and v > 0}
    parts = [_compute_share(e)]
    if over:
        top = sorted(over.items(), key=lambda kv: -kv[1])[:2]
        parts.append("then " + " and ".join(f"{TERM_NAMES.get(k, k)} {_share(v, e)}" for k, v in top))
    headroom = 1 - (e.peak_bytes - e.memory_overhead) / e.usable_bytes
    mem = f"peak memory {e.peak_bytes / GiB:.1f} GiB of {e.capacity_bytes / GiB:.0f} GiB"
    rc = Counter(c.layer_recompute)
    redo = {k: v for k, v in rc.items() if k != "none"}
    if redo:
        mem += f"; recomputes {sum(redo.values())} of {len(c.layer_recompute)} layers (" + \
               ", ".join(f"{v} {k}" for k, v in sorted(redo.items())) + ")" + _setting(c, stack, spec)
    mem += _split(c, stack)
    top_term = max(over, key=over.get) if over else None
    if e.host_floor_s >= max(MATERIAL_HOST * e.step_time_s, over.get(top_term, 0.0)):
        limit = "host-bound"   # its compute is the GPU waiting for kernel launches (the next sentence)
    elif top_term is None or over[top_term] < MINOR * e.step_time_s:
        limit = "compute-bound"
    else:
        limit = f"limited by {TERM_NAMES.get(top_term, top_term)}"
    if headroom < TIGHT_MEMORY:  # nearly full memory, which says nothing about where the time goes
        limit += f" and memory-tight ({100 * max(headroom, 0.0):.1f}% of usable memory left)"
    return f"Winner ({c.strategy.short()}) is {limit}: " + ", ".join(parts) + f"; {mem}."


def _setting(c: Candidate, stack: str, spec) -> str:
    """How the stack's configuration says the plan's per-layer recompute (``recompute.stack_setting``)."""
    how = stack_settings(stack, c.layer_recompute, c.stages, c.strategy, spec).recompute
    return f" as {stack} runs it: {how}" if how else ""


def _split(c: Candidate, stack: str) -> str:
    """How the stack's configuration says the plan's stage split (``stack_split.split_setting``), where it needs
    one; "" where the stack runs it by default."""
    said = split_phrase(stack, c.stages, c.strategy.pp)
    return f"; {said}" if said else ""


def _compute_share(e: Estimate) -> str:
    """The compute share of the step, naming what the eager host's launch floor adds inside it when the host-bound
    note does (``report.MATERIAL_HOST``): the floor lengthens the forward and backward (compute) and their re-runs
    (recomputation), so its share is said of the two together when the plan recomputes."""
    compute, redo = e.time.get("compute", 0.0), e.time.get("recompute", 0.0)
    if e.host_floor_s < MATERIAL_HOST * e.step_time_s:
        return f"compute is {_share(compute, e)} of the step"
    what = "compute and recomputation are" if redo > 0 else "compute is"
    return (f"{what} {_share(compute + redo, e)} of the step, of which the eager host's kernel launches add "
            f"{seconds(e.host_floor_s)} ({_share(e.host_floor_s, e)})")


def _runner_up(a: Candidate, b: Candidate) -> str:
    ea, eb = a.estimate, b.estimate
    slower = eb.step_time_s / ea.step_time_s - 1
    keys = set(ea.time) | set(eb.time)
    delta = {k: eb.time.get(k, 0.0) - ea.time.get(k, 0.0) for k in keys}
    worst = max(delta, key=delta.get)
    diff = _differences(a, b)
    loss = f"{TERM_NAMES.get(worst, worst)} +{seconds(delta[worst])}" if delta[worst] > 0 else "the total"
    if slower < 0:   # listed second by the tie rule (planner/rank.py)
        return (f"Runner-up ({b.strategy.short()}) is {100 * -slower:.1f}% faster" + (f" ({diff})" if diff else "")
                + ", within the 1% tie, so the simpler plan is listed first.")
    return (f"Runner-up ({b.strategy.short()}) is {100 * slower:.1f}% slower"
            + (f" ({diff})" if diff else "") + f": it loses on {loss}.")


def _differences(a: Candidate, b: Candidate) -> str:
    keys = [k for k in FIELDS if k not in ("global_batch", "recompute")]   # recompute: per layer, below
    sa, sb = a.strategy, b.strategy
    out = [f"{cli_key(k)} {cli_value(getattr(sa, k))}->{cli_value(getattr(sb, k))}" for k in keys
           if getattr(sa, k) != getattr(sb, k)]
    if a.layer_recompute != b.layer_recompute:
        out.append("recompute")
    return ", ".join(out)


def _share(x: float, e: Estimate) -> str:
    return f"{100 * x / e.step_time_s:.0f}%"


# ----- nothing fits -------------------------------------------------------------------------------
def closest(cm: CostModel, cons: Constraints, gb: int, tries: int = 4) -> Estimate | None:
    """The configuration that overflows least: the shardings with the lowest memory floor,
    each with the most memory-saving knobs the constraints allow, priced exactly."""
    ranked = []
    for row in shardings(cm, cons, gb):
        knobs = knob_options(cm, cons, row[0], gb) if row else []   # row[0]: the smallest mbs
        if not knobs:
            continue
        sh, m = row[0], gb // (row[0].dp * row[0].mbs)
        k = min(knobs, key=lambda x: (-x.zero, not x.offload, min_in_flight(sh.pp, m, x.schedule, x.vpp)))
        floor = floor_terms(cm, sh, cons.modes).bytes(cm, sh, k.zero, k.offload,
                                                      min_in_flight(sh.pp, m, k.schedule, k.vpp))
        ranked.append((floor, probe(sh, gb, k, recompute=cons.modes[-1])))
    best = None
    for _, s in sorted(ranked, key=lambda x: x[0])[:tries]:
        try:
            s = Strategy(**s.model_dump()).resolve(cm.cluster.world)
            cm.check(s)
        except InputError:
            continue
        if no_split(cm.stack_name, cm.num_layers, s):   # not memory: the search's rule_error says why
            continue
        e = cm.estimate(s)
        if best is None or e.peak_bytes < best.peak_bytes:
            best = e
    return best


def overflow_message(e: Estimate | None) -> str:
    """How far the closest configuration (``closest``) is from fitting (one sentence)."""
    if e is None:
        return "nothing fits and no configuration of the space could be priced"
    if overflow_bytes(e) <= 0 and not e.fits_host:
        return f"nothing fits: the closest configuration ({e.strategy.short()}): {host_overflow_message(e)}"
    worst = e.worst_rank
    comp = max(worst.memory, key=worst.memory.get)
    return (f"nothing fits: the closest configuration ({e.strategy.short()}) needs {e.peak_bytes / GiB:.1f} GiB "
            f"per GPU, {overflow_bytes(e) / GiB:.1f} GiB over the {e.usable_bytes / GiB:.1f} GiB usable "
            f"(largest part: {comp.replace('_', ' ')} {worst.memory[comp] / GiB:.1f} GiB)")


def fit_suggestions(cm: CostModel, cons: Constraints, gb: int, max_nodes_factor: int = 32) -> list[str]:
    """What would make a plan fit, each checked by a search under the same constraints: more
    GPUs (doubling the nodes), a shorter sequence, a smaller global batch. When the model
    states alone overflow, says so instead of trying the sequence and the batch."""
    out = []
    more = _more_gpus(cm, cons, gb, max_nodes_factor)
    out.append(f"would fit on {more}" if more else
               f"no cluster up to {cm.cluster.world * max_nodes_factor} GPUs fits under these constraints")
    floor = _states_floor(cm, cons)
    if floor > cm.usable_mem_bytes:
        out.append(f"a shorter sequence or a smaller batch cannot help: the model states alone need "
                   f"{floor / GiB:.1f} GiB per GPU even sharded over all {cm.cluster.world} GPUs")
        return out
    for label, cm2, gb2 in _smaller_work(cm, gb):
        res = search(cm2, gb2, cons, top_k=1)
        if res.candidates:
            e = res.candidates[0].estimate
            out.append(f"would fit with {label} ({res.candidates[0].strategy.short()}, "
                       f"{e.tokens_per_s:,.0f} tokens/s)")
            break
    return out


def _more_gpus(cm: CostModel, cons: Constraints, gb: int, max_factor: int) -> str | None:
    factor = 2
    while factor <= max_factor:
        cl = cm.cluster.model_copy(update={"nodes": cm.cluster.nodes * factor})
        cm2 = same_job(cm, cluster=cl)
        if _states_floor(cm2, cons) <= cm.usable_mem_bytes:
            res = search(cm2, gb, cons, top_k=1)
            if res.candidates:
                c = res.candidates[0]
                return (f"{cl.world} GPUs (--nodes {cl.nodes}): {c.strategy.short()} at "
                        f"{c.estimate.tokens_per_s:,.0f} tokens/s")
        factor *= 2
    return None


def _smaller_work(cm: CostModel, gb: int):
    """Shorter sequences (halving, at least 128 tokens), then smaller global batches."""
    seqs = [cm.seq_len // 2, cm.seq_len // 4] if cm.spec.family != "custom" else []
    for seq in (x for x in seqs if x >= 128):
        yield f"--seq-len {seq}", same_job(cm, seq_len=seq), gb
    for b in sorted({max(1, gb // 4), max(1, gb // 16)}, reverse=True):
        if b < gb:
            yield f"--global-batch {b}", cm, b


def _states_floor(cm: CostModel, cons: Constraints) -> float:
    """Model-state bytes per GPU with every state sharded over every GPU (tp x pp x ZeRO can at
    best split them evenly); 0 when offload is allowed (every state on the host): no plan holds less."""
    from autopar.cost_models.memory import model_state_bytes

    params = sum(t.params * (len(t.indices) if t.kind == "block" else 1) for t in cm.templates)
    st = model_state_bytes(params, cm.dtype, 3, cm.cluster.world)
    if offload.priced_on(cm.gpu) and cons.ok("offload_optimizer", True):
        return 0.0   # CPUOffloadPolicy keeps every state on the host (CostModel.rank_memory)
    return st.total
