"""FSDP under torch.distributed.pipelining as torchtitan runs it (``cost_models.fsdp.syncs_once_per_step``):
a pipelined stage gathers its parameters once per step and reduce-scatters its gradients once per step,
after its last micro-batch (torch ``pipelining/stage.py`` ``backward_maybe_with_nosync`` /
``perform_reduce_grad``); autopar's own program (``--runtime torch``) reduce-scatters every micro-batch."""

from __future__ import annotations

import pytest

from autopar.core.strategy import Strategy
from autopar.cost_models import fsdp, overlap
from autopar.cost_models.memory import bytes_per_param
from autopar.cost_models.session import Inputs, build_cost_model

PIPELINED = "pp=2,dp=4,mbs=1,gbs=16,zero=3"   # 4 micro-batches per step


def _cm(runtime: str):
    cm, _spec, _cluster, _ = build_cost_model(Inputs(model="llama-tiny", gpu="h100-96g", nodes=1, gpus_per_node=8,
                                                     seq_len=256, dtype="bf16", runtime=runtime))
    return cm


def _cm_hiding_nothing(runtime: str):
    """``_cm`` with the stack's fitted ``zero3_overlap`` at 0 (no gather or reduce-scatter hides behind
    compute), so the price counts the collectives whatever a refit sets: fitted near 1, per-micro-batch
    collectives hide almost fully and the count no longer shows in the step."""
    cm = _cm(runtime)
    cm.stack = cm.timer.stack = cm.stack.model_copy(update={"zero3_overlap": 0.0})
    return cm


def _dp(cm, text: str) -> tuple[list[float], object]:
    """Each rank's exposed data-parallel seconds as ``CostModel.estimate`` adds them, and the strategy."""
    s = Strategy.parse(text).resolve(8)
    est = cm.estimate(s)
    costs = cm.layer_costs(s)
    return [cm.dp_time(s, r, costs, s.num_micro_batches) for r in est.ranks], s


@pytest.fixture
def no_deferral(monkeypatch):
    """The rule undone: every runtime prices FSDP per micro-batch."""
    monkeypatch.setattr(fsdp, "DEFERRED_RUNTIMES", ())


def test_the_rule_per_runtime_and_pipeline_depth():
    assert fsdp.syncs_once_per_step("torchtitan", 2) and fsdp.syncs_once_per_step("torchtitan", 16)
    assert not fsdp.syncs_once_per_step("torchtitan", 1)      # no pipeline: FSDP's own per-micro-batch hooks
    for runtime in ("torch", "megatron", "deepspeed"):
        assert not fsdp.syncs_once_per_step(runtime, 8)
    cm_titan, cm_torch = _cm("torchtitan"), _cm("torch")
    piped, flat = Strategy.parse(PIPELINED).resolve(8), Strategy.parse("dp=8,mbs=1,gbs=16,zero=3").resolve(8)
    assert piped.num_micro_batches == 4
    assert fsdp.unit_syncs_per_step(cm_titan, piped) == 1 and fsdp.unit_syncs_per_step(cm_torch, piped) == 4
    assert fsdp.unit_syncs_per_step(cm_titan, flat) == flat.num_micro_batches
    # ZeRO-3 re-gathers in the backward, but not in a stage that keeps its parameters to its last backward
    assert fsdp.regathers(cm_torch, piped) and fsdp.regathers(cm_titan, flat) and not fsdp.regathers(cm_titan, piped)


def test_once_per_step_exposure_formula():
    """The gather hides behind the first forward as a prefetch does; the reduce-scatter is all exposed."""
    assert overlap.once_per_step_exposed(1.0, 0.5, 10.0, 0.8) == pytest.approx(0.2 + 0.5)
    assert overlap.once_per_step_exposed(1.0, 0.5, 0.1, 0.8) == pytest.approx(0.2 + 0.7 + 0.5)
    assert overlap.once_per_step_exposed(0.0, 0.0, 1.0, 0.8) == 0.0


def test_torchtitan_pipeline_prices_one_gather_and_one_reduce_scatter_per_step():
    cm = _cm("torchtitan")
    dp, s = _dp(cm, PIPELINED)
    costs, gb, ov = cm.layer_costs(s), bytes_per_param(cm.dtype)[1], cm.stack.zero3_overlap
    for r, got in zip(cm.estimate(s).ranks, dp):
        per_step = 0.0
        for i in r.layers:
            ag, ag_b, rs = cm._zero3_layer(s, costs[i], gb)
            assert ag > 0 and rs > 0 and ag_b == 0.0    # the parameters stay gathered to the last backward
            per_step += overlap.exposed_behind(ag, costs[i].fwd_s, ov) + rs
        first_gather = cm._zero3_layer(s, costs[r.layers[0]], gb)[0]
        assert got == pytest.approx(per_step + first_gather)   # once per step, whatever the micro-batch count


def test_undoing_the_rule_changes_the_torchtitan_price(no_deferral):
    """Per micro-batch (the rule undone) the same plan pays every gather, re-gather and reduce-scatter 4 times."""
    dp_undone, s = _dp(_cm_hiding_nothing("torchtitan"), PIPELINED)
    step_undone = _cm_hiding_nothing("torchtitan").estimate(s).step_time_s
    fsdp.DEFERRED_RUNTIMES = ("torchtitan",)   # the rule back (monkeypatch restores the attribute afterwards)
    dp_rule, _ = _dp(_cm_hiding_nothing("torchtitan"), PIPELINED)
    assert all(a > 1.5 * b > 0 for a, b in zip(dp_undone, dp_rule))
    assert _cm_hiding_nothing("torchtitan").estimate(s).step_time_s < step_undone


def test_torch_runtime_prices_unchanged(monkeypatch):
    """autopar's own program reduce-scatters every micro-batch (codegen.runtime_parallel
    ._keep_per_microbatch_sharding): its prices do not depend on the rule, and the price is the
    per-micro-batch sum with the backward re-gather."""
    texts = (PIPELINED, "pp=2,dp=4,mbs=1,gbs=16,zero=2", "pp=2,dp=2,tp=2,mbs=2,gbs=16,zero=3,sp=1")
    with_rule = [(_cm("torch").estimate(Strategy.parse(t).resolve(8)).step_time_s, _dp(_cm("torch"), t)[0])
                 for t in texts]
    monkeypatch.setattr(fsdp, "DEFERRED_RUNTIMES", ("torchtitan", "torch"))   # the rule wrongly on torch
    moved = [_cm("torch").estimate(Strategy.parse(t).resolve(8)).step_time_s for t in texts]
    monkeypatch.setattr(fsdp, "DEFERRED_RUNTIMES", ())
    without = [(_cm("torch").estimate(Strategy.parse(t).resolve(8)).step_time_s, _dp(_cm("torch"), t)[0])
               for t in texts]
    assert with_rule == without
    assert any(m != w[0] for m, w in zip(moved, with_rule))   # the check above can fail
    cm = _cm("torch")
    dp, s = _dp(cm, PIPELINED)
    costs, gb = cm.layer_costs(s), bytes_per_param(cm.dtype)[1]
    r0 = cm.estimate(s).ranks[0]
    assert all(cm._zero3_layer(s, costs[i], gb)[1] > 0 for i in r0.layers)   # ZeRO-3 re-gathers
    per_mb = sum(cm.zero3_layer_exposed(s, costs[i]) for i in r0.layers)
    assert dp[0] == pytest.approx(per_mb * 4 + cm.zero3_edge_time(s, costs[r0.layers[0]], costs[r0.layers[-1]]))


def test_llama3_rows_map_meta_fsdp_to_one_sync_per_step():
    """Llama 3 405B (Sec. 3.3.2: gradients accumulated in fp32 over the micro-batches, then reduce-scattered):
    autopar's ZeRO-1 program, one gradient reduce-scatter and one parameter gather per step
    (``published_dense_rows.llama3_zero``); other rows keep their own zero stage."""
    import sys
    from pathlib import Path

    bench = Path(__file__).resolve().parents[1] / "benchmarks"
    if not (Path(__file__).resolve().parents[2] / "shared" / "validation" / "published_modern.yaml").is_file():
        pytest.skip("shared/validation is absent")
    sys.path.insert(0, str(bench))
    import published_rows as pr
    from published_dense_rows import llama3_zero

    assert llama3_zero("llama3", 16) == 1 and llama3_zero("llama3", 1) is None and llama3_zero("torchtitan", 8) is None
    runs = {r["id"]: r for r in pr.load_runs(pr.MODERN_YAML)}
    assert "zero=1" in pr.case_for(runs["llama3_405b_16384gpu_seq131072"]).strategy
    assert "zero=3" in pr.case_for(runs["torchtitan_h100_t5_Llama-3.1-405B_512gpu_13"]).strategy


def test_torchtitan_pipeline_runs_zero2_as_zero3():
    """Under a pipeline torchtitan shards with ``reshard_after_forward=False`` whatever the stage: ZeRO-2 and
    ZeRO-3 are one program, priced the same in time and memory (``runtime_memory.torchtitan_memory``)."""
    cm = _cm("torchtitan")
    two, three = (cm.estimate(Strategy.parse(f"pp=2,dp=4,mbs=1,gbs=16,zero={z}").resolve(8)) for z in (2, 3))
    assert two.step_time_s == pytest.approx(three.step_time_s)
    assert [r.memory for r in two.ranks] == [pytest.approx(r.memory) for r in three.ranks]
    assert two.peak_bytes == pytest.approx(three.peak_bytes)
    flat = [cm.estimate(Strategy.parse(f"dp=8,mbs=1,gbs=16,zero={z}").resolve(8)).peak_bytes for z in (2, 3)]
    assert flat[0] > flat[1]   # without a pipeline ZeRO-2 keeps whole parameters, ZeRO-3 shards them


def test_torchtitan_reduce_scatters_in_fp32():
    """torchtitan's FSDP2 reduces in fp32 (``mixed_precision_reduce``), autopar's programs in bf16 (``mp_policy``)."""
    assert fsdp.reduce_bytes("torchtitan", 2) == 4 and fsdp.reduce_bytes("torch", 2) == 2
    assert fsdp.reduce_bytes("megatron", 2) == 2 and fsdp.reduce_bytes("torchtitan", 4) == 4
    s = Strategy.parse("dp=8,mbs=1,gbs=16,zero=3").resolve(8)
    layer = {rt: _cm(rt)._zero3_layer(s, _cm(rt).layer_costs(s)[0], 2) for rt in ("torch", "torchtitan")}
    assert layer["torchtitan"][0] == pytest.approx(layer["torch"][0])   # the bf16 all-gather is the same
    assert layer["torchtitan"][2] > layer["torch"][2]                    # twice the reduce-scatter bytes


def test_planner_prices_the_same_count():
    """The search's rank pricer (``planner.partition.RankPricer``) and ``CostModel`` agree on a pipelined
    torchtitan stage's FSDP seconds, and differ from the per-micro-batch price."""
    from types import SimpleNamespace

    from autopar.planner.partition import RankPricer

    cm = _cm("torchtitan")
    s = Strategy.parse(PIPELINED).resolve(8)
    pricer = RankPricer(cm, s)
    half = cm.num_layers // 2
    for r, (o, c) in enumerate(((0, half), (half, cm.num_layers - half))):
        layers = pricer.layers(o, c)
        expected = cm.dp_time(s, SimpleNamespace(layers=layers), cm.layer_costs(s), s.num_micro_batches)
        assert pricer.evaluate(r, o, c).D == pytest.approx(expected)
        assert expected < cm.zero3_edge_time(s, cm.layer_costs(s)[layers[0]], cm.layer_costs(s)[layers[-1]]) + \
            sum(cm.zero3_layer_exposed(s, cm.layer_costs(s)[i]) for i in layers) * s.num_micro_batches
