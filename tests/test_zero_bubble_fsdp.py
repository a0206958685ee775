"""FSDP2 (ZeRO-2, optimizer offload) under autopar's zero-bubble pipeline programs, priced as they run
(``cost_models.fsdp.syncs_once_per_step``): the emitted program keeps torch.distributed.pipelining's
deferral there (``techniques.dp_program.whole_backward`` names the schedules it overrides), so each
unit is all-gathered once per step and reduce-scattered once, after the stage's last backward, with
the whole stage's unsharded gradients held to then (``runtime_memory.deferred_fsdp_memory``)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from autopar.core.strategy import Strategy
from autopar.cost_models import fsdp, overlap
from autopar.cost_models.memory import bytes_per_param
from autopar.cost_models.session import Inputs, build_cost_model
from autopar.techniques import pipeline
from autopar.techniques.dp_program import whole_backward
from autopar.techniques.pipeline import SCHEDULES, ZERO_BUBBLE

ZBV = "pp=2,dp=4,vpp=2,schedule=zbv,mbs=1,gbs=32"          # 8 micro-batches per step
ONE_F_ONE_B = "pp=2,dp=4,mbs=1,gbs=32"


def _cm(gpu: str = "h100-96g", gpus: int = 8, seq_len: int = 256, dtype: str = "bf16"):
    return build_cost_model(Inputs(model="llama-tiny", gpu=gpu, nodes=1, gpus_per_node=gpus, seq_len=seq_len,
                                   dtype=dtype, runtime="torch"))[0]


def test_the_rule_is_the_programs_schedule_split():
    """Once per step exactly where the emitted program leaves torch's deferral on (not ``whole_backward``)."""
    assert [s for s in SCHEDULES if not whole_backward(s)] == list(ZERO_BUBBLE) and whole_backward(True)
    for sched in ZERO_BUBBLE:
        assert fsdp.syncs_once_per_step("torch", 2, sched)
        assert not fsdp.syncs_once_per_step("torch", 1, sched)
        assert not fsdp.syncs_once_per_step("megatron", 4, sched)
    for sched in filter(whole_backward, SCHEDULES):
        assert not fsdp.syncs_once_per_step("torch", 4, sched) and fsdp.syncs_once_per_step("torchtitan", 4, sched)
    cm = _cm()
    zb, one = Strategy.parse(ZBV + ",zero=2").resolve(8), Strategy.parse(ONE_F_ONE_B + ",zero=2").resolve(8)
    assert fsdp.unit_syncs_per_step(cm, zb) == 1 and fsdp.unit_syncs_per_step(cm, one) == one.num_micro_batches == 8
    assert not fsdp.regathers(cm, zb)


def test_zero_bubble_zero2_time_is_one_gather_and_one_exposed_reduce_scatter_per_step():
    cm = _cm()
    s = Strategy.parse(ZBV + ",zero=2").resolve(8)
    costs, gb, ov = cm.layer_costs(s), bytes_per_param(cm.dtype)[1], cm.stack.zero3_overlap
    est = cm.estimate(s)
    for r in est.ranks:
        per_step = 0.0
        for i in r.layers:
            ag, ag_b, rs = cm._zero3_layer(s, costs[i], gb)
            assert ag > 0 and rs > 0 and ag_b == 0.0
            per_step += overlap.once_per_step_exposed(ag, rs, costs[i].fwd_s, ov)
        first_gather = cm._zero3_layer(s, costs[r.layers[0]], gb)[0]
        got = cm.dp_time(s, r, costs, s.num_micro_batches)
        assert got == pytest.approx(per_step + first_gather)   # not x 8 micro-batches


def test_zero_bubble_offload_copies_the_shard_once_per_step():
    """CPUOffloadPolicy copies the shard in at each all-gather and out at each reduce-scatter: once each."""
    from autopar.cost_models.estimate import offload_step_time

    cm = _cm()
    for text, copies in ((ZBV, 1), (ONE_F_ONE_B, 8)):
        s = Strategy.parse(text + ",zero=1,offload=1").resolve(8)
        costs = cm.layer_costs(s)
        r = cm.estimate(s).ranks[0]
        shard = sum(costs[i].params_dense + costs[i].params_expert for i in r.layers) / (s.dp * s.cp)
        want = offload_step_time(shard, cm.dtype, cm.gpu, copies, copies)
        assert cm.optimizer_step_time(s, r, costs) == pytest.approx(want)  # optimizer_time adds FSDP2's copies


def _stage_params(cm, s, r) -> float:
    """Every parameter a pipeline rank's stages hold (blocks, and embedding / output where it holds them)."""
    costs = cm.layer_costs(s)
    parts = [costs[i] for i in r.layers]
    if 0 in r.layers and costs["embedding"]:
        parts.append(costs["embedding"])
    if cm.num_layers - 1 in r.layers and costs["output"]:
        parts.append(costs["output"])
    return sum(c.params_dense + c.params_expert for c in parts)


@pytest.mark.parametrize("knobs", ["zero=2", "zero=1,offload=1"])
def test_zero_bubble_memory_holds_the_stage_gradients_unsharded(knobs):
    """FSDP2 under the deferral: every stage parameter's gradient, unsharded in the compute dtype, held to
    the stage's REDUCE_GRAD; no sharded gradients meanwhile; parameters gathered for the step as before."""
    cm = _cm()
    s = Strategy.parse(f"{ZBV},{knobs}").resolve(8)
    g = bytes_per_param(cm.dtype)[1]
    for r in cm.estimate(s).ranks:
        stage = _stage_params(cm, s, r)
        assert r.memory["gradients"] == pytest.approx(stage * g)
        pbytes, n = bytes_per_param(cm.dtype)[0], s.dp * s.cp
        shard_copy = 0.0 if s.offload_optimizer else stage * pbytes / n   # ZeRO-2 keeps its shard beside
        assert r.memory["comm_buffers"] == pytest.approx(shard_copy)
        assert r.memory["parameters"] == pytest.approx(stage * pbytes)      # gathered for the whole step


def test_deep_looped_zero_bubble_fsdp_is_refused():
    """torch's lowering keeps at most 3 stages of a rank gathered (``_add_unshard_reshard``): beyond, the
    program re-gathers mid-step, which is not the priced once per step; ZeRO-3 stays refused."""
    base = "pp=2,dp=4,mbs=1,gbs=64,schedule=zb_interleaved"
    rule = pipeline.torch_rule
    assert rule(Strategy.parse(base + ",vpp=4,zero=2").resolve(8), None, 8, None)
    assert rule(Strategy.parse(base + ",vpp=4,zero=1,offload=1").resolve(8), None, 8, None)
    assert not rule(Strategy.parse(base + ",vpp=3,zero=2").resolve(8), None, 8, None)
    assert not rule(Strategy.parse(base + ",vpp=4,zero=1").resolve(8), None, 8, None)
    assert rule(Strategy.parse(base + ",vpp=2,zero=3").resolve(8), None, 8, None)


def _unshards_per_stage(schedule_cls, pp: int, vpp: int, m: int) -> dict[int, int]:
    """UNSHARD actions (an FSDP all-gather of the stage) per local stage of rank 0 in torch's lowered schedule."""
    import torch
    import torch.distributed as dist
    from torch.distributed.pipelining import PipelineStage

    dist.init_process_group("fake", rank=0, world_size=pp, store=dist.HashStore())
    try:
        stages = [PipelineStage(torch.nn.Linear(4, 4), r * pp, pp * vpp, torch.device("cpu")) for r in range(vpp)]
        actions = schedule_cls(stages, m, loss_fn=lambda out, target: out.sum()).pipeline_order_with_comms[0]
    finally:
        dist.destroy_process_group()
    out: dict[int, int] = {}
    for a in actions:
        if a.computation_type.name == "UNSHARD":
            out[a.stage_index] = out.get(a.stage_index, 0) + 1
    return out


def test_torch_lowering_gathers_once_per_step_up_to_three_stages():
    """What the refusal and the once-per-step price rest on: ``_add_unshard_reshard`` (max_active_stages=3)."""
    from torch.distributed.pipelining.schedules import ScheduleInterleavedZeroBubble

    for vpp in (2, 3):
        assert set(_unshards_per_stage(ScheduleInterleavedZeroBubble, 2, vpp, 4).values()) == {1}
    assert max(_unshards_per_stage(ScheduleInterleavedZeroBubble, 2, 4, 8).values()) > 1


@pytest.mark.slow
def test_emitted_programs_sync_as_priced(tmp_path):
    """One launch on 4 gloo ranks (pp=2 x dp=2, 4 micro-batches): per FSDP unit and step, the zbv program
    all-gathers and reduce-scatters once, the 1F1B program once per micro-batch, as
    ``fsdp.unit_syncs_per_step`` prices them (step 2: the first step also runs the stages' shape
    inference); the zbv program's measured peak is the priced one within 5%."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from count_programs import launch
    from helpers_plans import make_plan

    from autopar.codegen.emit import emit

    plans = {"zbv": "pp=2,dp=2,vpp=2,schedule=zbv,mbs=1,zero=2", "f1b": "pp=2,dp=2,schedule=1f1b,mbs=1,zero=2"}
    for name, text in plans.items():
        emit(make_plan("llama-tiny", 4, text), tmp_path / name, "cpu")
    runs = launch(Path(__file__).resolve().parent / "zb_fsdp_count.py", tmp_path, list(plans), timeout_s=240)
    cm = _cm(gpu="cpu", gpus=4, seq_len=32, dtype="fp32")
    for name, text in plans.items():
        s = make_plan("llama-tiny", 4, text).strategy
        assert s.num_micro_batches == 4
        want = fsdp.unit_syncs_per_step(cm, s)
        assert want == (1 if name == "zbv" else 4)
        for steps in runs[name]:
            step2 = steps[1]
            assert len(step2["all_gather"]) >= 2   # a root and block units on every rank
            assert set(step2["all_gather"].values()) == {want} and set(step2["reduce_scatter"].values()) == {want}
    est = cm.estimate(make_plan("llama-tiny", 4, plans["zbv"]).strategy)
    pred = max(sum(r.memory.values()) - r.memory["framework_overhead"] for r in est.ranks)
    lines = (tmp_path / "zbv.metrics.jsonl").read_text().splitlines()
    measured = json.loads(lines[-1])["peak_mem_bytes"]
    assert pred == pytest.approx(measured, rel=0.05)


@pytest.mark.parametrize("fixed", [{"zero_stage": 2, "offload_optimizer": False}, {"offload_optimizer": True}])
def test_bounded_search_keeps_the_exhaustive_zero_bubble_fsdp_plans(fixed):
    """The search's floors read the same rule (ZeRO-3/FSDP time and offload copies once per step, the held
    gradients in the memory floor: ``groups.with_deferred_grads``): still under every price they bound."""
    from autopar.planner import search as S

    cm = build_cost_model(Inputs(model="llama3-8b", nodes=1, seq_len=2048))[0]
    cons = dict(fixed={**fixed, "micro_batch": 1}, schedules=("zbv", "zb_interleaved"), max_cp=2)
    bounded = S.search(cm, 64, S.Constraints(**cons))
    every = S.search(cm, 64, S.Constraints(**cons), exhaustive=True)
    plans = [[(c.strategy.short(), c.stages, c.estimate.step_time_s) for c in r.candidates] for r in (bounded, every)]
    assert plans[0] and plans[0] == plans[1]
    assert all(c.strategy.schedule in ZERO_BUBBLE for c in bounded.candidates)
