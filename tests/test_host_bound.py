"""The host-bound step floor (cost_models/host_bound.py): an eager step takes at least its kernel launches x the
host's seconds per launch; it binds only where that exceeds the GPU's time."""

from __future__ import annotations

from pathlib import Path

import pytest

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
    """The same cost model with no host floor (its per-layer prices forgotten)."""
    monkeypatch.setattr(host_bound, "host_launch_s", lambda gpu, runtime="torch": 0.0)
    cm._cache.clear()
    return cm


def test_the_floor_binds_only_where_launches_exceed_the_gpu_time(moe):
    s, ops = _strategy(moe, micro_batch=1), moe.blocks[0].ops
    f, b, reruns = host_bound.layer_floor(ops, s, moe.ctx, 1.0, 2.0)   # slow kernels: the GPU's time stands
    assert (f, b) == (1.0, 2.0)
    f, b, reruns = host_bound.layer_floor(ops, s, moe.ctx, 0.0, 0.0)
    launches = host_bound.layer_launches(moe.blocks[0], s) / 3   # forward kernels of one micro-batch
    assert f == pytest.approx(launches * host_bound.host_launch_s(moe.gpu)) and b == pytest.approx(2 * f)
    assert reruns["full"] == pytest.approx(f) and 0 <= reruns["selective"] < f
    assert host_bound.rerun_floor({"none": 0.0, "full": 2 * f}, reruns) == {"none": 0.0, "full": 2 * f}


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
    floor = host_bound.layer_floor(moe.blocks[0].ops, s, moe.ctx, 0.0, 0.0)
    assert (c.fwd_s, c.bwd_s) == pytest.approx(floor[:2])   # every block waits for its host
    assert _unbound(monkeypatch, moe).estimate(s).step_time_s < 0.7 * e.step_time_s
    moe._cache.clear()


def test_dense_big_layers_stay_gpu_bound(llama, monkeypatch):
    kws = ({"micro_batch": 1}, {"micro_batch": 2}, {"micro_batch": 1, "recompute": "selective"})
    priced = [llama.estimate(_strategy(llama, **kw)).step_time_s for kw in kws]
    free = [_unbound(monkeypatch, llama).estimate(_strategy(llama, **kw)).step_time_s for kw in kws]
    assert priced == pytest.approx(free, rel=0.01)   # measured 297 / 282 ms on the H100: GPU-bound
    llama._cache.clear()


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
    f, b, reruns = host_bound.layer_floor(mcore.blocks[0].ops, s, mcore.ctx, 0.0, 0.0)
    assert (f, b, reruns) == (0.0, 0.0, {})


def test_grouped_experts_launch_once_and_ep_divides_the_loop(moe):
    block = moe.blocks[0]
    s1, s2 = _strategy(moe, micro_batch=1), _strategy(moe, micro_batch=1).model_copy(update={"ep": 2})
    loop, split = host_bound.layer_launches(block, s1), host_bound.layer_launches(block, s2)
    grouped = host_bound.layer_launches(block, s1, grouped=True)
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
