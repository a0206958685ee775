"""ZeRO-1 as autopar's programs run it, counted on 4 gloo ranks and priced so.

``dp_mode`` "zero1" (``runtime_zero1.ShardedAdamW``): gradients accumulate whole over the step's micro-batches; during
the last backward each bucket reduce-scatters as soon as its gradients are complete, and after the step each
bucket's all-gather runs beside the next forward, waited by the first module that reads it (Megatron-Core's
``--overlap-grad-reduce`` / ``--overlap-param-gather``): ``cost_models.fsdp.gathers_next_forward``, exposed what
outlasts the last backward and the first forward plus the last bucket's reduce-scatter and the first one's gather
(under zero-bubble schedules the whole sync after the backward: ``fsdp.syncs_after_backward``, counted here under
ZBV and in tests/test_pipeline_dp_sync.py; interleaved 1F1B overlaps each stage in its own last backward pass).
fp32 on plain parameters (``dp_mode`` "ddp"): DDP's all-reduce in the last backward, then
``ZeroRedundancyOptimizer``'s per-parameter broadcasts after the step: ``fsdp.broadcasts_after_step``, an
all-gather's bytes exposed beside the hidden all-reduce."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

from autopar.core.strategy import Strategy
from autopar.cost_models import fsdp, overlap
from autopar.cost_models.comm import collective_time
from autopar.cost_models.memory import bytes_per_param
from autopar.cost_models.session import Inputs, build_cost_model
from autopar.techniques.dp_program import ZERO1_BUCKET_BYTES

HERE = Path(__file__).resolve().parent

PLANS = {   # name: (strategy, dtype, program); 4 micro-batches per step, on each pipeline stage
    "z1_dp": ("dp=4,mbs=1,gbs=16,zero=1", "bf16", "overlap"),
    "z1_pp": ("pp=2,dp=2,schedule=1f1b,mbs=1,gbs=8,zero=1", "bf16", "overlap"),
    "z1_int": ("pp=2,dp=2,vpp=2,schedule=interleaved,mbs=1,gbs=8,zero=1", "bf16", "overlap"),
    "z1_zbv": ("pp=2,dp=2,vpp=2,schedule=zbv,mbs=1,gbs=8,zero=1", "bf16", "after"),
    "z1_ddp": ("dp=4,mbs=1,gbs=16,zero=1", "fp32", "ddp"),
}
# (syncs_after_backward, gathers_next_forward, broadcasts_after_step) of each program
RULES = {"overlap": (False, True, False), "after": (True, False, False), "ddp": (False, False, True)}
PASS = re.compile(r"([bw])(\d+)(\.?)$")   # a pipeline stage's backward / weight pass began (ended: ".")


def _rules(text: str | Strategy, dtype: str, impl: str = "fsdp2") -> tuple[bool, bool, bool]:
    s = Strategy.parse(text).resolve(8) if isinstance(text, str) else text
    return tuple(rule("torch", s, dtype, impl) for rule in (fsdp.syncs_after_backward, fsdp.gathers_next_forward,
                                                            fsdp.broadcasts_after_step))


def test_which_zero1_program_runs_and_what_is_exposed():
    assert _rules("dp=8,zero=1", "bf16") == (False, True, False)             # ShardedAdamW, overlapped
    assert _rules("dp=8,zero=1", "fp32") == (False, False, True)             # DDP + ZeroRedundancyOptimizer
    assert _rules("dp=4,tp=2,zero=1", "fp32") == (False, True, False)        # DTensor weights: ShardedAdamW
    assert _rules("pp=2,dp=4,zero=1", "fp32") == (False, True, False)
    assert _rules("pp=2,dp=4,vpp=2,schedule=zbv,zero=1", "bf16") == (True, False, False)   # no hook sees the grads
    assert _rules("dp=8,zero=0", "fp32") == (False, False, False)            # plain DDP
    assert _rules("dp=8,zero=2", "fp32") == (False, False, False)            # FSDP2
    assert _rules("dp=8,zero=1", "fp32", "meta") == (False, False, False)
    s = Strategy.parse("dp=8,zero=1").resolve(8)
    assert not any(fsdp.broadcasts_after_step(rt, s, "fp32", "fsdp2") for rt in ("megatron", "deepspeed", "torchtitan"))
    assert fsdp.last_bucket_bytes(s, "bf16") == ZERO1_BUCKET_BYTES and fsdp.last_bucket_bytes(s, "fp32") == (
        fsdp.DDP_BUCKET_BYTES)   # the price's (and the search floor's) last bucket: the program's


@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
def test_zero1_prices_its_program(dtype):
    """bf16 (ShardedAdamW): the reduce-scatter half beyond the last backward, the gather half beyond the first
    forward, and the last bucket's sync; fp32 (DDP + ZeroRedundancyOptimizer): what outlasts the last backward
    and the last bucket, plus the broadcast as one all-gather of the rank's weights."""
    cm = build_cost_model(Inputs(model="llama3-8b", nodes=1, seq_len=2048, dtype=dtype))[0]
    s = Strategy.parse("dp=8,mbs=1,gbs=64,zero=1").resolve(8)
    r, costs = cm.estimate(s).ranks[0], cm.layer_costs(s)
    size = sum(costs[i].params_dense for i in r.layers) * bytes_per_param(cm.dtype)[1]
    t = cm.grad_sync_time(size, 8, 1, s)
    got = cm.dp_time(s, r, costs, s.num_micro_batches)
    cap = ZERO1_BUCKET_BYTES if dtype == "bf16" else fsdp.DDP_BUCKET_BYTES   # ShardedAdamW's span / DDP's bucket
    last_bucket = cm.grad_sync_time(min(cap, size), 8, 1, s)
    if dtype == "bf16":   # rank 0's last span is the input embedding's (1 GB), not one bucket
        edge = costs["embedding"].params_dense * bytes_per_param(cm.dtype)[1]
        assert edge > cap
        last_bucket = cm.grad_sync_time(edge, 8, 1, s)
        assert got == pytest.approx(overlap.grad_sync_exposed(t, r.bwd_s, r.fwd_s, True) + last_bucket)
        assert last_bucket <= got < t
        return
    ag = collective_time("all_gather", size, 8, 1, cm.cluster, fits=cm.ctx.fits).time_s
    hidden = overlap.grad_sync_exposed(t, r.bwd_s, r.fwd_s, False) + last_bucket
    assert ag > 0 and got == pytest.approx(hidden + ag)
    assert cm.dp_comm_total(s, r, costs, s.num_micro_batches) == pytest.approx(t + ag)


def test_zero1_tail_is_the_embedding_on_the_first_pipeline_rank():
    """The first stage's input embedding completes its gradient last and is gathered first: its sync is rank 0's
    exposed tail; the other rank's is one bucket."""
    cm = build_cost_model(Inputs(model="llama3-8b", nodes=1, seq_len=2048, dtype="bf16"))[0]
    s = Strategy.parse("pp=2,dp=4,mbs=1,gbs=64,zero=1").resolve(8)
    est, costs, gb = cm.estimate(s), cm.layer_costs(s), bytes_per_param(cm.dtype)[1]
    edge = costs["embedding"].params_dense * gb
    for r in est.ranks:
        size = sum(costs[i].params_dense for i in r.layers) * gb
        tail = cm.grad_sync_time(edge if r.rank == 0 else min(ZERO1_BUCKET_BYTES, size), 4, 1, s)
        hidden = overlap.grad_sync_exposed(cm.grad_sync_time(size, 4, 1, s), r.bwd_s, r.fwd_s, True)
        assert cm.dp_time(s, r, costs, s.num_micro_batches) == pytest.approx(hidden + tail)


@pytest.mark.slow
def test_sharded_adamw_syncs_as_priced(tmp_path):
    """Each program's step counted on 4 gloo ranks against the rules its price reads (``RULES``): ZeRO-1 overlapped
    without a pipeline, under 1F1B and interleaved 1F1B (two stages per rank), after the backward under ZBV (split
    backward: no hook sees the weight gradients), and fp32 DDP + ZeroRedundancyOptimizer."""
    sys.path.insert(0, str(HERE))
    from count_programs import launch
    from helpers_plans import make_plan

    from autopar.codegen.emit import emit

    for name, (text, dtype, program) in PLANS.items():
        plan = make_plan("gpt-tiny", 4, text, global_batch=16 if "pp" not in text else 8, dtype=dtype)
        assert plan.strategy.num_micro_batches == 4
        assert _rules(plan.strategy, dtype) == RULES[program], name
        emit(plan, tmp_path / name, "cpu")
    runs = launch(HERE / "zero1_sync_count.py", tmp_path, list(PLANS))
    for name, (text, _, program) in PLANS.items():
        chunks = 2 if "vpp=2" in text else 1
        for r, steps in enumerate(runs[name]):
            assert len(steps) == 2
            for i, step in enumerate(steps):
                ev, where = step["events"], (name, r, i)
                if program == "overlap":
                    assert ev.count("bwd") == 4 * chunks, (where, ev)
                    _overlapped(ev, landed=i > 0, where=where)
                elif program == "after":
                    _after_backward(ev, chunks, landed=i > 0, where=where)
                else:   # ZeroRedundancyOptimizer: one broadcast per parameter, after every backward
                    assert ev.count("bwd") == 4, (where, ev)
                    last = max(j for j, e in enumerate(ev) if e == "bwd")
                    assert set(ev[last + 1:]) == {"bc"} and set(ev[:last]) <= {"bwd", "blk"}, (where, ev)


def _overlapped(ev: list[str], landed: bool, where) -> None:
    """ShardedAdamW's step as Megatron-Core's overlapped distributed optimizer runs it: reduce-scatters issued
    inside the last backward of the stage whose spans they are (without a pipeline: after the one before it
    returned; under a pipeline: inside each stage's last backward pass, ``_issued_in_last_passes``), the rest right
    after the rank's last backward; one all-gather per span after those; the previous step's gathers landed
    during the first forward (blocks begin between landings), all before the first backward."""
    piped = any(PASS.match(e) for e in ev)
    if piped:
        _issued_in_last_passes(ev, where)
        ev = [e for e in ev if not PASS.match(e)]
    bwd = [j for j, e in enumerate(ev) if e == "bwd"]
    inside = [j for j, e in enumerate(ev) if e == "rs_in_bwd"]
    spans = ev.count("ag")
    assert spans > 2 and inside, (where, ev)
    assert piped or all(bwd[-2] < j < bwd[-1] for j in inside), (where, ev)
    assert ev[bwd[-1] + 1:] == ["rs"] * (spans - len(inside)) + ["ag"] * spans, (where, ev)
    assert len(inside) >= spans - 1, (where, ev)   # at most the late span (a pipeline's tied embedding) waits
    _landed(ev, bwd[0], spans, landed, where)


def _issued_in_last_passes(ev: list[str], where) -> None:
    """Each stage's bucket counts that stage's micro-batches, so its spans are reduce-scattered inside the stage's
    last backward pass, whichever of the rank's stages runs last (interleaved: the second stage's before the
    first's), and every stage issues there."""
    last, began = {}, {}
    for j, e in enumerate(ev):
        m = PASS.match(e)
        if m and m[1] == "b":
            if m[3]:
                last[m[2]] = (began[m[2]], j)
            else:
                began[m[2]] = j
    owners = [next((c for c, (a, b) in last.items() if a < j < b), None) for j, e in enumerate(ev) if e == "rs_in_bwd"]
    assert None not in owners and set(owners) == set(last), (where, last, ev)


def _after_backward(ev: list[str], chunks: int, landed: bool, where) -> None:
    """Under a split-backward schedule every reduce-scatter is issued after the rank's last pass (``sync_grads``),
    then one all-gather per span; the split ran (weight passes on every stage of the rank); the previous step's
    gathers land in the first forward, before the first backward pass."""
    passes = [j for j, e in enumerate(ev) if PASS.match(e)]
    stages = {PASS.match(ev[j])[2] for j in passes}
    assert len(stages) == chunks and all(f"w{c}" in ev for c in stages), (where, ev)
    spans = ev.count("ag")
    assert spans > 2 and ev[passes[-1] + 1:] == ["rs"] * spans + ["ag"] * spans, (where, ev)
    _landed(ev, passes[0], spans, landed, where)


def _landed(ev: list[str], first_bwd: int, spans: int, landed: bool, where) -> None:
    lands = [j for j, e in enumerate(ev) if e == "land"]
    if not landed:
        assert not lands, (where, ev)
        return
    blocks = [j for j, e in enumerate(ev) if e == "blk"]
    assert len(lands) == spans and lands[-1] < first_bwd, (where, ev)
    assert any(lands[0] < j < lands[-1] for j in blocks), (where, ev)   # landed as the forward reaches them


def _sync(cm, s, size: float) -> float:
    return cm.grad_sync_time(size, s.dp * s.cp, s.tp, s)


def test_zero1_syncs_the_output_layer_with_the_blocks():
    """The program's bucket holds every parameter of the part: the output layer (final norm, untied head) reduces
    first and gathers last, beside the blocks' spans; rank 0's embedding is the edge. With nothing to hide behind
    (no micro-batch counted) the whole sync shows: the blocks' and the output's, then the edge's; the total the
    contention reads counts the edge once."""
    cm = build_cost_model(Inputs(model="llama3-8b", nodes=1, seq_len=2048, dtype="bf16"))[0]
    s = Strategy.parse("dp=8,mbs=1,gbs=64,zero=1").resolve(8)
    r, costs, gb = cm.estimate(s).ranks[0], cm.layer_costs(s), bytes_per_param(cm.dtype)[1]
    blocks = sum(costs[i].params_dense for i in r.layers) * gb
    head, edge = costs["output"].params_dense * gb, costs["embedding"].params_dense * gb
    assert head > 1e9 and edge > 1e9   # the untied 128256 x 4096 bf16 tables
    assert cm.dp_time(s, r, costs, 0) == pytest.approx(_sync(cm, s, blocks + head) + _sync(cm, s, edge))
    assert cm.dp_comm_total(s, r, costs, 0) == pytest.approx(_sync(cm, s, blocks + head + edge))


def test_zero1_tied_copy_is_the_last_stage_edge():
    """GPT-2's tied table under a pipeline: rank 0's embedding and the last stage's copy (a late span, reduced after
    the stage pair's sum, gathered first) are each rank's edge; the last stage's final norm syncs with its blocks."""
    cm = build_cost_model(Inputs(model="gpt2-124m", nodes=1, seq_len=1024, dtype="bf16"))[0]
    s = Strategy.parse("pp=2,dp=4,mbs=1,gbs=64,zero=1").resolve(8)
    est, costs, gb = cm.estimate(s), cm.layer_costs(s), bytes_per_param(cm.dtype)[1]
    tied = cm.output.params_tied * gb
    assert tied > ZERO1_BUCKET_BYTES and costs["output"].params_dense * gb < ZERO1_BUCKET_BYTES   # norm only
    ends = [(0.0, costs["embedding"].params_dense * gb), (costs["output"].params_dense * gb, tied)]
    for r, (with_blocks, edge) in zip(est.ranks, ends):
        blocks = sum(costs[i].params_dense for i in r.layers) * gb
        assert cm.dp_time(s, r, costs, 0) == pytest.approx(_sync(cm, s, blocks + with_blocks) + _sync(cm, s, edge))


def test_zero1_after_the_backward_syncs_the_ends_whole():
    """Under a zero-bubble schedule every span reduces after the backward: rank 0 (both ends of the V) syncs its
    blocks, embedding and head at once, exposed."""
    cm = build_cost_model(Inputs(model="llama3-8b", nodes=1, seq_len=2048, dtype="bf16"))[0]
    s = Strategy.parse("pp=2,dp=4,vpp=2,mbs=1,gbs=64,schedule=zbv,zero=1").resolve(8)
    est, costs, gb = cm.estimate(s), cm.layer_costs(s), bytes_per_param(cm.dtype)[1]
    ends = (costs["embedding"].params_dense + costs["output"].params_dense) * gb
    for r in est.ranks:
        blocks = sum(costs[i].params_dense for i in r.layers) * gb
        want = _sync(cm, s, blocks + (ends if r.rank == 0 else 0.0))
        assert cm.dp_time(s, r, costs, s.num_micro_batches) == pytest.approx(want)
