"""Memory as real GPU runs measure it: the loss phase, the compiled / loss-parallel variants, the
allocator reserve and the mapping of published torchtitan rows (``benchmarks/validate_memory.py``;
the figures against every published row are that script's output, see docs/validation.md)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from autopar.core.strategy import Strategy
from autopar.cost_models.layer_cost import shards_for
from autopar.cost_models.session import Inputs, build_cost_model
from autopar.profiles.hw import load_gpu_profile

SHARED = Path(__file__).resolve().parents[2] / "shared" / "validation" / "published_modern.yaml"
BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def _cm(model: str = "llama-tiny", gpu: str = "h100-96g", seq: int = 64, **ctx):
    cm, _spec, cluster, _ = build_cost_model(Inputs(model=model, gpu=gpu, nodes=1, gpus_per_node=8, seq_len=seq,
                                                    dtype="bf16"))
    for k, v in ctx.items():
        setattr(cm.ctx, k, v)
    return cm, cluster


def _output_cost(cm, text: str):
    s = Strategy.parse(text).resolve(cm.cluster.world)
    return s, cm.layer_costs(s)["output"]


def test_loss_phase_is_three_fp32_logits():
    """Eager cross-entropy on fp32 logits: the saved log-probabilities plus two fp32 gradients
    (nll, log-softmax) in backward; DTensor loss_parallel adds exp(x): three, on 1/tp of the vocab;
    a compiled loss keeps the 16-bit logits and writes a 16-bit gradient."""
    cm, _ = _cm()
    s, out = _output_cost(cm, "dp=8,mbs=2")
    lsm = sum(t.bytes for t in cm.output.saved if t.shard in ("tp", "vocab") and not t.const) * 2
    assert lsm == 2 * 64 * cm.spec.vocab * 4
    assert out.temp_bytes == pytest.approx(2 * lsm)
    cm_tp, _ = _cm(loss_parallel=True)
    _, out_tp = _output_cost(cm_tp, "dp=2,tp=4,sp=1,mbs=2")
    assert out_tp.temp_bytes == pytest.approx(3 * lsm / 4)
    cm_c, _ = _cm(compile="model+loss")
    _, out_c = _output_cost(cm_c, "dp=8,mbs=2")
    assert out_c.temp_bytes == pytest.approx(lsm / 2)
    assert out.act_bytes["none"] - out_c.act_bytes["none"] == pytest.approx(lsm / 2)


def test_compiled_blocks_drop_what_only_residual_adds_read():
    cm, _ = _cm()
    s = Strategy.parse("dp=8,mbs=1,recompute=op").resolve(8)
    eager = cm.layer_costs(s)[0].act_bytes["op"]
    cm_c, _ = _cm(compile="model")
    compiled = cm_c.layer_costs(s)[0].act_bytes["op"]
    w2_out = 64 * cm.spec.hidden * 2  # the w2 output feeds only the residual add
    assert eager - compiled == pytest.approx(w2_out)


def test_workspace_and_loss_phase_are_not_summed():
    cm, _ = _cm()
    s = Strategy.parse("dp=8,mbs=1,recompute=full").resolve(8)
    assert cm.workspace_excess(s, [], work=5.0, temps=8.0) == 0.0
    assert cm.workspace_excess(s, [], work=5.0, temps=3.0) == 2.0


def test_reserved_peak_adds_the_fitted_allocator_reserve():
    cm, _ = _cm()
    e = cm.estimate(Strategy.parse("dp=8,mbs=1,recompute=op").resolve(8))
    r = load_gpu_profile("h100-96g").allocator_reserve_fraction
    assert r > 0
    assert e.reserved_peak_bytes == pytest.approx((e.peak_bytes - e.memory_overhead) * (1 + r))
    assert shards_for(e.strategy).tp == 1


def test_h100_96g_profile_carries_its_sources():
    g = load_gpu_profile("h100-96g")
    assert g.mem_capacity_bytes == 96 * 2**30 and g.mem_bw_gbps == 2400 and g.power_limit_w == 500
    for key in ("mem_capacity_bytes", "mem_bw_gbps", "power_limit_w", "allocator_reserve_fraction"):
        assert "hardware_facts.yaml" in g.sources[key] or "validate_memory.py" in g.sources[key]


@pytest.mark.skipif(not SHARED.exists(), reason="shared/validation is not present")
def test_torchtitan_rows_map_to_what_torchtitan_runs():
    sys.path.insert(0, str(BENCH))
    try:
        import published_rows as pr
        import validate_memory as vm
    finally:
        sys.path.remove(str(BENCH))
    runs = {r["id"]: r for r in vm.rows(SHARED)}
    assert len(runs) >= 9
    row = runs["torchtitan_h100_t1_Llama-3.1-8B_8gpu_0"]
    case = pr.case_for(row)
    assert case.gpu == "h100-96g" and "recompute=op" in case.strategy and "zero=3" in case.strategy
    assert vm.compile_mode(row) == "none"
    assert vm.compile_mode(runs["torchtitan_h100_t1_Llama-3.1-8B_8gpu_2"]) == "model"
    assert vm.compile_mode(runs["torchtitan_h200_llama3_8b_64gpu"]) == "model+loss"
    tp = pr.case_for(runs["torchtitan_h100_t4_Llama-3.1-70B_256gpu_11"])
    assert "sp=1" in tp.strategy and tp.runtime == "torchtitan"
    pp = pr.case_for(runs["torchtitan_h100_t5_Llama-3.1-405B_512gpu_12"])
    # torchtitan (Dec 2024) splits the local batch of 32 into as many micro-batches as pipeline
    # stages (published_rows._torchtitan_pp_microbatch): 8 under 1F1B, 16 interleaved (2 stages per
    # rank); time (validate_published) and memory (validate_memory) price the same case
    assert "mbs=4" in pp.strategy and pp.runtime == "torchtitan"
    assert "mbs=2" in pr.case_for(runs["torchtitan_h100_t5_Llama-3.1-405B_512gpu_13"]).strategy
    full = pr.case_for(runs["torchtitan_h100_t2_Llama-3.1-8B_8gpu_3"])  # no global batch published
    assert "recompute=full" in full.strategy
