"""The host-bound step floor (cost_models/host_bound.py): an eager step takes at least its kernel launches x the
host's seconds per launch; it binds only where that exceeds the GPU's time."""

from __future__ import annotations

from pathlib import Path

import pytest

from autopar.core.gpu import GpuProfile
from autopar.core.strategy import Strategy
from autopar.cost_models import host_bound
from autopar.cost_models.session import Inputs, build_cost_model
from autopar.planner import search as S
from autopar.profiles.hw import load_gpu_profile

MODELS = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check_models"


def _cm(name: str, runtime: str = "torch", gpu: str = "h100-sxm"):
    return build_cost_model(Inputs(model=str(MODELS / f"{name}.json"), gpu=gpu, gpus_per_node=1, seq_len=4096,
                                   dtype="bf16", runtime=runtime))[0]


def _strategy(cm, **kw) -> Strategy:
    return Strategy(dp=1, global_batch=4, **kw).resolve(cm.cluster.world)


@pytest.fixture(scope="module")
def moe():
    return _cm("moe-gpu")


@pytest.fixture(scope="module")
def llama():
    return _cm("llama-gpu")


def _unbound(monkeypatch, cm):
    """The same cost model with no host floor, on a fresh price cache for this test (the module's floored prices
    come back at teardown, whether or not the test passed)."""
    monkeypatch.setattr(host_bound, "host_launch_s", lambda gpu, runtime="torch": 0.0)
    monkeypatch.setattr(cm, "_cache", {})
    return cm


def _host(cm, s, mode="none"):
    """Host seconds of one block per micro-batch: forward, backward, ``mode``'s re-run."""
    k, ratio = host_bound.launch_rates(cm.gpu)
    fwd = host_bound.layer_launches(cm.blocks[0], s, cm.gpu) / (1 + ratio) * host_bound.host_launch_s(cm.gpu)
    again = host_bound.layer_launches(cm.blocks[0], s, cm.gpu, mode) * host_bound.host_launch_s(cm.gpu)
    return fwd, ratio * fwd, again - (1 + ratio) * fwd


def _floor(cm, s, f, b, rerun):
    block = cm.blocks[0]
    return host_bound.layer_floor(block, block.ops, s, cm.ctx, f, b, rerun)


def test_the_floor_binds_only_where_launches_exceed_the_gpu_time(moe):
    s = _strategy(moe, micro_batch=1)
    modes = {"none": 0.0, "full": 0.5}
    assert _floor(moe, s, 1.0, 2.0, modes) == (1.0, 2.0, modes)   # slow kernels: the GPU's times stand
    hf, hb, hr = _host(moe, s, "full")
    f, b, rerun = _floor(moe, s, 0.0, 0.0, {"none": 0.0, "full": 0.0})
    assert (f, b) == pytest.approx((hf, hb)) and b == pytest.approx(2 * f)   # all host: the host's split
    assert rerun == pytest.approx({"none": 0.0, "full": hr}) and 0 < hr <= f


def test_a_heavy_backward_hides_a_light_forwards_host_time(moe):
    s = _strategy(moe, micro_batch=1)
    hf, hb, _ = _host(moe, s)
    f, b, _ = _floor(moe, s, 0.2 * hf, 3 * hb, {"none": 0.0})   # host-bound forward, GPU-bound backward
    assert f + b == pytest.approx(0.2 * hf + 3 * hb)   # the layer's total is the GPU's: nothing added
    assert f > 0.2 * hf   # split as each piece's bound: the forward waits for its host, the backward's queue
    f, b, _ = _floor(moe, s, 0.2 * hf, 1.1 * hb, {"none": 0.0})   # the backward hides only part of it
    assert f + b == pytest.approx(hf + hb)


def test_the_floor_is_on_the_layers_total_with_its_rerun(moe):
    s = _strategy(moe, micro_batch=1)
    hf, hb, hr = _host(moe, s, "full")
    dev = (1.5 * hf, 1.5 * hb)   # GPU-bound forward and backward
    f, b, rerun = _floor(moe, s, *dev, {"none": 0.0, "full": 0.1 * hr})   # a launch-heavy re-run of small kernels
    assert (f, b) == dev and rerun["full"] == pytest.approx(0.1 * hr)   # hidden behind the GPU-bound pieces
    slow = (1.01 * hf, 1.01 * hb)
    f, b, rerun = _floor(moe, s, *slow, {"none": 0.0, "full": 0.1 * hr})
    assert f + b + rerun["full"] == pytest.approx(hf + hb + hr)   # the total at the host's


def test_one_rerun_rule_for_seconds_and_launches(moe, llama):
    """recompute_cost.rerun_ops names the re-run ops; the re-run's seconds and launches count the same ops."""
    from autopar.cost_models.recompute_cost import recompute_times, rerun_ops
    for cm, runtime in ((llama, "torch"), (moe, "torch"), (llama, "torchtitan")):
        block, s = cm.blocks[0], _strategy(cm, micro_batch=1)
        weights = [2.0 ** i for i in range(len(block.ops))]   # each op's forward a distinct bit
        secs = recompute_times(block, block.ops, weights, runtime, sum(weights), 0.0)
        k, ratio = host_bound.launch_rates(cm.gpu)
        base = host_bound.layer_launches(block, s, cm.gpu, runtime=runtime)
        for mode in ("selective", "op", "full"):
            idx = rerun_ops(block, block.ops, mode, runtime)
            assert secs[mode] == sum(weights[i] for i in idx)
            launches = host_bound.layer_launches(block, s, cm.gpu, mode, runtime=runtime) - base
            assert launches == pytest.approx(k * sum(host_bound.op_calls(block.ops[i], s) for i in idx))
    sel = [rerun_ops(llama.blocks[0], llama.blocks[0].ops, "selective", rt) for rt in ("torch", "torchtitan")]
    assert len(sel[0]) > len(sel[1])   # the emitted policy re-runs RoPE and the GQA repeat beside SDPA


def test_launch_counts_match_the_h100_traces(moe, llama):
    # docs/validation.md "On a GPU": 5,497 kernel launches a step (moe-gpu), 3,286 (llama-gpu); mbs 1, 4 micro-batches
    for cm, traced in ((moe, 5497), (llama, 3286)):
        s = _strategy(cm, micro_batch=1)
        launches = host_bound.rank_launches(cm, s, list(range(cm.num_layers)), ["none"] * cm.num_layers, True, True)
        assert launches == pytest.approx(traced, rel=0.03)


def test_the_launch_heavy_moe_step_is_host_bound(moe, monkeypatch):
    s = _strategy(moe, micro_batch=1)
    e = moe.estimate(s)
    assert 0.32 < e.step_time_s < 0.40   # measured on an H100: 325-360 ms (GPU busy 201 ms)
    c = moe.layer_costs(s)[0]
    assert (c.fwd_s, c.bwd_s) == pytest.approx(_host(moe, s)[:2])   # every block waits for its host
    assert _unbound(monkeypatch, moe).estimate(s).step_time_s < 0.7 * e.step_time_s


def test_dense_big_layers_stay_gpu_bound(llama, monkeypatch):
    kws = ({"micro_batch": 1}, {"micro_batch": 2}, {"micro_batch": 1, "recompute": "selective"})
    priced = [llama.estimate(_strategy(llama, **kw)).step_time_s for kw in kws]
    free = [_unbound(monkeypatch, llama).estimate(_strategy(llama, **kw)).step_time_s for kw in kws]
    assert priced == pytest.approx(free, rel=0.01)   # measured 297 / 282 ms on the H100: GPU-bound


def test_more_tokens_per_launch_leave_the_host_bound(moe):
    one, two = (moe.layer_costs(_strategy(moe, micro_batch=m))[0] for m in (1, 2))
    assert two.fwd_s < 2 * one.fwd_s   # the same launches carry twice the tokens


def test_no_floor_on_a_cpu_device_or_under_megatron():
    cpu = load_gpu_profile("h100-sxm").model_copy(update={"cores": 8})
    assert host_bound.host_launch_s(cpu) == 0.0
    assert host_bound.host_launch_s(load_gpu_profile("h100-sxm"), "megatron") == 0.0
    assert host_bound.host_launch_s(load_gpu_profile("h100-sxm"), "torch") == pytest.approx(5.61e-5)
    mcore = _cm("moe-gpu", runtime="megatron")
    s = _strategy(mcore, micro_batch=1)
    assert _floor(mcore, s, 0.0, 0.0, {"none": 0.0}) == (0.0, 0.0, {"none": 0.0})


def test_a_profile_without_its_own_launch_cost_reads_the_schema_default():
    """host_launch_s defaults in GpuProfile's schema, as its sibling launch-count fields do (one place): a GPU
    profile that never measured it (the H200's) carries the default, which is the H100 trace's fitted value."""
    h200 = load_gpu_profile("h200")
    assert "host_launch_s" not in h200.model_fields_set
    assert h200.host_launch_s == GpuProfile.model_fields["host_launch_s"].default
    assert h200.host_launch_s == load_gpu_profile("h100-sxm").host_launch_s
    assert host_bound.host_launch_s(h200) == h200.host_launch_s


def test_grouped_experts_launch_once_and_ep_divides_the_loop(moe):
    block = moe.blocks[0]
    s1, s2 = _strategy(moe, micro_batch=1), _strategy(moe, micro_batch=1).model_copy(update={"ep": 2})
    loop, split = host_bound.layer_launches(block, s1, moe.gpu), host_bound.layer_launches(block, s2, moe.gpu)
    grouped = host_bound.layer_launches(block, s1, moe.gpu, grouped=True)
    assert grouped < split < loop


def test_the_search_prices_what_estimate_prices(moe):
    # the floor lives in the layer prices, which the partition, its bounds and estimate all read
    res = S.search(moe, 4, S.Constraints(fixed={"offload_optimizer": False}), top_k=3)
    assert res.candidates
    for c in res.candidates:
        e = moe.estimate(c.strategy, c.stages, c.layer_recompute)
        assert c.estimate.step_time_s == pytest.approx(e.step_time_s)
        assert c.step_time_s * (1 - 1e-9) <= e.step_time_s <= c.step_time_s + e.time["comm_contention"] + 1e-12
    best = res.candidates[0]   # the host-bound micro-batch of one is not the plan picked
    assert best.strategy.micro_batch > 1
    assert moe.estimate(_strategy(moe, micro_batch=1)).step_time_s > best.estimate.step_time_s


def test_default_host_launch_is_the_h100_traces():
    """``GpuProfile.host_launch_s``'s default restates the H100 trace's fit in h100-sxm.yaml (its description says
    so): a refit (``fit_kernel_rates.py --trace --write``) that moves the file must move the default too."""
    import yaml

    path = Path(__file__).resolve().parents[1] / "profiles" / "hardware" / "h100-sxm.yaml"
    assert GpuProfile.model_fields["host_launch_s"].default == yaml.safe_load(path.read_text())["host_launch_s"]
