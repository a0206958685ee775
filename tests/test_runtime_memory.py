"""``--runtime torchtitan`` memory (``cost_models/runtime_memory.py``): torchtitan's pipeline keeps
every stage parameter gathered and fp32 unsharded gradients across micro-batches, its stage-to-stage
tensors are sequence-split under SP, its last stage retains every micro-batch's logits; without a
pipeline it runs what autopar prices for its own programs."""

from __future__ import annotations

import json

import pytest

from autopar.core.plan import Plan
from autopar.core.strategy import Strategy
from autopar.cost_models import runtime_memory as rm
from autopar.cost_models.session import Inputs, build_cost_model

SEQ = 64


def _cm(runtime: str, loss_parallel: bool = False):
    cm, _spec, _cluster, _ = build_cost_model(Inputs(model="llama-tiny", gpu="h100-96g", nodes=1, gpus_per_node=8,
                                                     seq_len=SEQ, dtype="bf16", runtime=runtime))
    cm.ctx.loss_parallel = loss_parallel
    return cm


def _ranks(cm, text: str):
    return cm.estimate(Strategy.parse(text).resolve(8)).ranks


def test_pure_formulas():
    s = Strategy.parse("tp=2,pp=2,dp=2,mbs=2,gbs=16,zero=3,sp=1").resolve(8)
    assert rm.gathered_param_bytes(1e6, 2) == 2e6
    assert rm.nosync_grad_bytes(1e6, 1e5, 2) == 4e6 + 2e5
    assert rm.boundary_bytes(s, 64, 32, 2) == 2 * 64 / 2 * 32 * 2
    assert rm.recv_buffer_bytes(4, 3, 10.0) == 120.0
    assert rm.retained_logits_bytes(s, 64, 100, 2, 2) == (s.num_micro_batches - 1) * 2 * 64 * 50 * 2
    # a rank that warms up every micro-batch: the larger of (all, no grads) and (one fewer, with grads)
    assert rm.activations_beside_grads(10.0, 4, 4, grads=100.0) == 30.0
    assert rm.activations_beside_grads(10.0, 4, 4, grads=5.0) == 35.0
    assert rm.activations_beside_grads(10.0, 4, 8, grads=100.0) == 40.0


def test_torchtitan_stage_split_shortens_first_and_last():
    """generate_split_points (torchtitan 9dec370): base per stage, the remainder to the middle stages."""
    lengths = [[b - a for a, b in rm.torchtitan_stages(*args)] for args in ((126, 8), (126, 16), (11, 4), (8, 1))]
    assert lengths == [[15] + [16] * 6 + [15], [7] + [8] * 14 + [7], [2, 3, 3, 3], [8]]
    # CostModel.estimate without a split runs torchtitan's under --runtime torchtitan: 4 layers on 3 stages
    ranks = {}
    for runtime in ("torch", "torchtitan"):
        cm, _spec, _cluster, _ = build_cost_model(Inputs(model="llama-tiny", gpu="h100-96g", nodes=1, gpus_per_node=3,
                                                         seq_len=SEQ, dtype="bf16", runtime=runtime))
        ranks[runtime] = [r.layers for r in cm.estimate(Strategy.parse("pp=3,mbs=1,gbs=6").resolve(3)).ranks]
    assert ranks == {"torch": [[0, 1], [2], [3]], "torchtitan": [[0], [1, 2], [3]]}


def test_schedule_replay_matches_the_closed_forms():
    """torch's Schedule1F1B: the replay gives activations_beside_grads; Interleaved1F1B (p=8, m=16,
    v=2): rank 0 warms up with 8 + 2*7 = 22 forwards and peaks, every stage's gradients present,
    with 15 micro-batches of its first local stage and 8 of its second in flight (rank 1: 21)."""
    for warm, m, grads in ((4, 4, 100.0), (4, 4, 5.0), (4, 8, 100.0)):
        order = rm.schedule_order(warm, 8, m, 1, "1f1b")
        assert rm.peak_beside_grads(order, [10.0], grads) == rm.activations_beside_grads(10.0, warm, m, grads)
    order = rm.schedule_order(22, 8, 16, 2, "interleaved")
    assert len(order) == 64 and order.count(("F", 0)) == order.count(("B", 1)) == 16
    assert rm.peak_beside_grads(order, [1.0, 0.0], 1e3) == 15 and rm.peak_beside_grads(order, [0.0, 1.0], 1e3) == 8
    assert rm.peak_beside_grads(rm.schedule_order(20, 8, 16, 2, "interleaved"), [1.0, 1.0], 1e3) == 21
    assert rm.schedule_order(4, 4, 8, 2, "zbv") is None


def test_full_recompute_stage_input_is_the_receive_buffer():
    """Under full recompute a non-first stage's first block input is its receive buffer (counted in
    the pipeline buffers), so each in-flight micro-batch saves one stage boundary less there."""
    cm = _cm("torchtitan")
    ranks = _ranks(cm, "pp=2,dp=4,mbs=1,gbs=32,zero=3,recompute=full")
    costs = cm.layer_costs(Strategy.parse("pp=2,dp=4,mbs=1,gbs=32,zero=3,recompute=full").resolve(8))
    per_mb = sum(costs[i].act_bytes["full"] for i in ranks[1].layers)
    boundary = SEQ * cm.spec.hidden * 2
    loss = costs["output"].act_bytes["none"]
    assert ranks[1].memory["activations"] == pytest.approx((per_mb - boundary) * ranks[1].in_flight + loss)


def test_no_pipeline_prices_as_autopars_own_program():
    text = "tp=2,dp=4,mbs=2,gbs=16,zero=3,sp=1,recompute=op"
    assert _ranks(_cm("torchtitan"), text)[0].memory == _ranks(_cm("torch"), text)[0].memory


def test_pipeline_keeps_stage_gathered_with_fp32_unsharded_grads():
    text = "pp=2,dp=4,mbs=1,gbs=32,zero=3,recompute=full"
    torch_r = _ranks(_cm("torch"), text)
    titan_r = _ranks(_cm("torchtitan"), text)
    cm = _cm("torchtitan")
    s = Strategy.parse(text).resolve(8)
    costs = cm.layer_costs(s)
    stage0 = sum(costs[i].params_dense for i in titan_r[0].layers) + costs["embedding"].params_dense
    block = max(costs[i].params_dense for i in titan_r[0].layers)
    t, o = titan_r[0].memory, torch_r[0].memory
    assert t["parameters"] - o["parameters"] == pytest.approx(stage0 * 2)
    assert t["gradients"] - (o["gradients"] - stage0 * 2 / 4) == pytest.approx(stage0 * 4 + block * 2)
    assert t["comm_buffers"] == 0.0
    boundary = SEQ * cm.spec.hidden * 2
    m = s.num_micro_batches
    assert t["pipeline_buffers"] == pytest.approx(m * 1 * boundary + titan_r[0].in_flight * boundary)


def test_sequence_parallel_splits_the_stage_boundary_and_last_stage_retains_logits():
    text = "tp=2,pp=2,dp=2,mbs=1,gbs=32,zero=3,sp=1,recompute=full"
    cm = _cm("torchtitan", loss_parallel=True)
    s = Strategy.parse(text).resolve(8)
    last = _ranks(cm, text)[1]
    boundary = SEQ / 2 * cm.spec.hidden * 2
    logits = (s.num_micro_batches - 1) * SEQ * cm.spec.vocab / 2 * 2
    assert last.memory["pipeline_buffers"] == pytest.approx(s.num_micro_batches * boundary + last.in_flight * boundary
                                                            + logits)


TINY = ("llama-tiny", "--seq-len", "64", "--gpu", "h100-96g")


def test_compile_and_loss_parallel_are_refused_where_the_program_does_not_run_them(run_cli):
    for argv in (("estimate", *TINY, "--strategy", "dp=8", "--compile", "model"),
                 ("memory", *TINY, "--strategy", "dp=8", "--loss-parallel", "--runtime", "megatron"),
                 ("plan", *TINY, "--compile", "model+loss"),
                 ("estimate", *TINY, "--strategy", "dp=8", "--runtime", "torchtitan", "--compile", "blocks")):
        code, _out, err = run_cli(*argv)
        assert code == 2 and len(err.strip().splitlines()) == 1
        assert "--compile" in err or "--loss-parallel" in err


def test_compile_and_loss_parallel_are_priced_and_recorded_in_the_plan(run_cli, tmp_path):
    strategy = ("--strategy", "dp=4,tp=2,sp=1,mbs=2,zero=3", "--runtime", "torchtitan", "--json")  # FSDP: DDP 1-D
    peaks = []
    for extra in ((), ("--compile", "model+loss", "--loss-parallel")):
        code, out, _ = run_cli("memory", *TINY, *strategy, *extra)
        assert code == 0
        peaks.append(json.loads(out)["memory"]["peak_bytes"])
    assert peaks[1] < peaks[0]  # a compiled, vocab-parallel loss keeps 16-bit logits split over tp
    path = tmp_path / "plan.json"
    code, _out, _ = run_cli("plan", *TINY, "--runtime", "torchtitan", "--compile", "model", "--loss-parallel",
                         "--top", "1", "--out", str(path))
    assert code == 0
    plan = Plan.load(path)
    assert (plan.runtime, plan.compile, plan.loss_parallel) == ("torchtitan", "model", True)
