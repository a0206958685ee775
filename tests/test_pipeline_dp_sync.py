"""Data-parallel sync under torch.distributed.pipelining as the emitted program runs it.

ZeRO-0 under a pipeline is FSDP2's ``replicate`` (``dp_mode``); torch's schedules defer its all-reduces to
the stage's REDUCE_GRAD after its last backward, so the whole sync is priced exposed
(``cost_models.fsdp.syncs_after_backward``), by the estimate, the partition's rank prices and the search's
floors alike; so is ZeRO-1 as ``ShardedAdamW`` under zero-bubble schedules only (elsewhere it overlaps the sync
with the last backward and the next forward, with or without a pipeline: tests/test_zero1_sync.py).
Interleaved schedules with vpp >= 4 re-gather FSDP units beyond what ZeRO-2 prices (torch's
lowering keeps 3 stages of a rank gathered): ``techniques.pipeline.torch_rule`` refuses them. Counted on 4
gloo ranks (``pp_dp_sync_count.py``)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from autopar.core.strategy import Strategy
from autopar.cost_models import fsdp, overlap
from autopar.cost_models.estimate import DDP_BUCKET_BYTES
from autopar.cost_models.memory import bytes_per_param
from autopar.cost_models.session import Inputs, build_cost_model
from autopar.techniques import pipeline

HERE = Path(__file__).resolve().parent


def _cm(model: str = "llama-tiny", gpus: int = 8, seq_len: int = 256, runtime: str = "torch"):
    return build_cost_model(Inputs(model=model, gpu="h100-96g", nodes=1, gpus_per_node=gpus, seq_len=seq_len,
                                   dtype="bf16", runtime=runtime))[0]


def _rule(text: str, runtime: str = "torch", dtype: str = "bf16", impl: str = "fsdp2") -> bool:
    return fsdp.syncs_after_backward(runtime, Strategy.parse(text).resolve(8), dtype, impl)


def test_the_rule_is_replicate_under_a_pipeline_and_sharded_adamw_under_zero_bubble():
    assert _rule("pp=2,dp=4,zero=0")
    assert not _rule("dp=8,zero=0")                                     # no pipeline: DDP / replicate hooks
    assert not any(_rule(f"pp=4,dp=2,zero={z}") for z in (2, 3))
    assert not _rule("pp=4,dp=2,zero=0,offload=1")                      # offload: FSDP2 CPUOffloadPolicy
    assert not any(_rule(t, rt) for t in ("pp=4,dp=2,zero=0", "dp=8,zero=1")
                   for rt in ("megatron", "deepspeed", "torchtitan"))
    # ZeRO-1 as ShardedAdamW (dp_mode "zero1": bf16, or fp32 beside tp / ep / pp) overlaps its sync
    # (tests/test_zero1_sync.py), except under zero-bubble schedules, whose weight gradients no hook sees
    assert not any(_rule(t) for t in ("dp=8,zero=1", "dp=4,cp=2,zero=1", "pp=4,dp=2,zero=1"))
    assert not any(_rule(t, dtype="fp32") for t in ("dp=4,tp=2,zero=1", "pp=2,dp=4,zero=1", "dp=4,tp=2,etp=2,zero=1"))
    assert all(_rule(f"pp=2,dp=4,vpp=2,schedule={z},zero=1") for z in ("zbv", "zb_interleaved"))
    assert not _rule("dp=8,zero=1", dtype="fp32")
    assert not _rule("pp=2,dp=4,zero=1", impl="meta")   # Meta's Llama 3 stack overlaps its own (published row)


@pytest.mark.parametrize("text", ["pp=2,dp=4,mbs=1,gbs=32,zero=0",
                                  "pp=2,dp=4,vpp=2,schedule=interleaved,mbs=1,gbs=32,zero=0"])
def test_zero0_pipeline_prices_the_whole_all_reduce_exposed(text):
    """Each rank's data-parallel time is its whole gradient all-reduce, not what outlasts one backward."""
    cm = _cm("llama3-8b", seq_len=2048)
    s = Strategy.parse(text).resolve(8)
    costs, gb = cm.layer_costs(s), bytes_per_param(cm.dtype)[1]
    for r in cm.estimate(s).ranks:
        dense = sum(costs[i].params_dense for i in r.layers) * gb
        t = cm.grad_sync_time(dense, s.dp * s.cp, s.tp, s)
        overlapped = overlap.grad_sync_exposed(t, r.bwd_s, r.fwd_s, False) + cm.grad_sync_time(
            min(DDP_BUCKET_BYTES, dense), s.dp * s.cp, s.tp, s)
        got = cm.dp_time(s, r, costs, s.num_micro_batches)
        assert t > 0 and got == pytest.approx(t) and got != pytest.approx(overlapped)
    one = Strategy.parse(text.replace("zero=0", "zero=1")).resolve(8)   # ZeRO-1 (ShardedAdamW): overlapped
    r, costs = cm.estimate(one).ranks[0], cm.layer_costs(one)
    dense = sum(costs[i].params_dense for i in r.layers) * gb
    t = cm.grad_sync_time(dense, 4, 1, one)
    edge = costs["embedding"].params_dense * gb   # rank 0's last span: the input embedding
    ahead = overlap.grad_sync_exposed(t, r.bwd_s, r.fwd_s, True) + cm.grad_sync_time(
        max(min(DDP_BUCKET_BYTES, dense), edge), 4, 1, one)
    assert cm.dp_time(one, r, costs, 8) == pytest.approx(ahead) and ahead < t


@pytest.mark.parametrize("zero", [0, 1])
def test_search_prices_exposed_syncs_as_the_estimate_and_its_floors_hold(zero):
    """The partition's rank prices (``RankPricer.dp_time``) are the estimate's; the search's floors
    (``bounds.grad_sync_floor``) stay under them: the bounded search keeps the exhaustive plans (ZeRO-0:
    pipelined plans; ZeRO-1 in bf16: every plan runs ShardedAdamW, overlapped outside zero-bubble schedules)."""
    from autopar.planner import search as S

    cm = build_cost_model(Inputs(model="llama3-8b", nodes=1, seq_len=2048))[0]
    cons = S.Constraints(fixed={"zero_stage": zero, "micro_batch": 1}, schedules=("1f1b", "interleaved"), max_cp=1)
    bounded, every = S.search(cm, 64, cons), S.search(cm, 64, cons, exhaustive=True)
    plans = [[(c.strategy.short(), c.stages, c.estimate.step_time_s) for c in r.candidates] for r in (bounded, every)]
    assert plans[0] and plans[0] == plans[1]
    synced = [c for c in bounded.candidates if c.strategy.dp > 1 and (c.strategy.pp > 1 or zero == 1)]
    assert synced and all(fsdp.exposed_sync(cm, c.strategy) == (zero == 0) for c in synced)
    for c in synced:   # the partition's own price (Candidate.step_time_s) against the estimate's, which adds the
        s, m = c.strategy, c.strategy.num_micro_batches   # contention of what ZeRO-1 hides (left out by the partition)
        costs = cm.layer_costs(s)
        slowed = max(cm.overlap_contention(s, r, costs, m, cm.dp_time(s, r, costs, m)) for r in c.estimate.ranks)
        assert (slowed > 0) == (zero == 1) and c.step_time_s + slowed == pytest.approx(c.estimate.step_time_s)


def test_deep_interleaved_fsdp_is_refused():
    rule = pipeline.torch_rule
    base = "pp=2,dp=4,mbs=1,gbs=64,schedule=interleaved"
    assert rule(Strategy.parse(base + ",vpp=4,zero=2").resolve(8), None, 8, None)
    assert rule(Strategy.parse(base + ",vpp=4,zero=1,offload=1").resolve(8), None, 8, None)
    assert not rule(Strategy.parse(base + ",vpp=3,zero=2").resolve(8), None, 8, None)
    assert not rule(Strategy.parse(base + ",vpp=4,zero=1").resolve(8), None, 8, None)
    assert not rule(Strategy.parse(base + ",vpp=4,zero=3").resolve(8), None, 8, None)   # counted as priced


PLANS = {   # name: (strategy, layers); 4 micro-batches per step on every program
    "z0_1f1b": ("pp=2,dp=2,schedule=1f1b,mbs=1,zero=0", 4),
    "z0_il": ("pp=2,dp=2,vpp=2,schedule=interleaved,mbs=1,zero=0", 4),
    "z2_il2": ("pp=2,dp=2,vpp=2,schedule=interleaved,mbs=1,zero=2", 8),
    "z3_il2": ("pp=2,dp=2,vpp=2,schedule=interleaved,mbs=1,zero=3", 8),
    "z2_il4": ("pp=2,dp=2,vpp=4,schedule=interleaved,mbs=1,zero=2", 8),
    "z3_il4": ("pp=2,dp=2,vpp=4,schedule=interleaved,mbs=1,zero=3", 8),
}


@pytest.mark.slow
def test_emitted_programs_sync_as_counted(tmp_path, monkeypatch):
    """One launch on 4 gloo ranks (pp=2 x dp=2): replicate's all-reduces run once per unit and step, every
    one inside REDUCE_GRAD (after the stage's last backward); ZeRO-2 under 1F1B gathers each unit once per
    micro-batch as priced under interleaved vpp=2 (ZeRO-3: twice; FSDP2's default backward prefetch, which
    crosses micro-batches, re-gathered a stage's last block: 6 of 4), under interleaved vpp=4 (emitted past
    the refusal) more often; ZeRO-3 under interleaved vpp=4 twice per micro-batch, as priced (not refused)."""
    sys.path.insert(0, str(HERE))
    from count_programs import launch
    from helpers_plans import make_plan

    from autopar import techniques
    from autopar.codegen.emit import emit

    for name, (text, layers) in PLANS.items():
        plan = make_plan("llama-tiny", 4, text, spec_update={"layers": layers})
        assert plan.strategy.num_micro_batches == 4
        with monkeypatch.context() as m:
            if name == "z2_il4":   # the configuration torch_rule refuses: emitted only to count it
                m.setattr(techniques, "violations", lambda *a, **k: [])
            emit(plan, tmp_path / name, "cpu")
    step2 = {n: [steps[1] for steps in runs] for n, runs in launch(HERE / "pp_dp_sync_count.py", tmp_path,
                                                                     list(PLANS)).items()}
    for name in ("z0_1f1b", "z0_il"):
        for c in step2[name]:
            assert not c["all_gather"] and len(c["reduce"]) >= 2 and set(c["reduce"].values()) == {1}
            assert c["reduce_in_backward"] == 0      # none beside a backward: the whole sync exposed
            if name == "z0_1f1b":   # and after the rank's last backward (interleaved: a chunk's REDUCE_GRAD runs
                assert c["backwards_after_reduce"] == 0   # before the other chunk's last backwards)
    for name, gathers in (("z2_il2", 4), ("z3_il2", 8)):   # runtime_parallel._prefetch_within_the_microbatch
        for c in step2[name]:
            assert set(c["all_gather"].values()) == {gathers} and set(c["reduce"].values()) == {4}
    gathers = [v for c in step2["z2_il4"] for v in c["all_gather"].values()]
    assert min(gathers) >= 4 and max(gathers) > 4   # re-gathered beyond once per micro-batch
    for c in step2["z3_il4"]:
        assert set(c["all_gather"].values()) == {8} and set(c["reduce"].values()) == {4}
