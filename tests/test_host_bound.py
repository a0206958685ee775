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


def test_wait_is_the_excess_of_the_launches_over_the_gpu_time(moe):
    s = _strategy(moe, micro_batch=1)
    stages, modes = [(0, moe.num_layers)], ["none"] * moe.num_layers
    floor = host_bound.step_floor(moe, s, stages, modes)
    assert floor > 0
    assert host_bound.host_wait(moe, s, stages, modes, floor * 2) == 0.0       # GPU-bound: no wait
    assert host_bound.host_wait(moe, s, stages, modes, floor / 4) == pytest.approx(floor * 3 / 4)


def test_launch_counts_match_the_h100_traces(moe, llama):
    # /work/briefs6/trace/summary.md: 5,497 kernel launches a step (moe-gpu), 3,286 (llama-gpu); mbs 1, 4 micro-batches
    for cm, traced in ((moe, 5497), (llama, 3286)):
        s = _strategy(cm, micro_batch=1)
        launches = host_bound.rank_launches(cm, s, list(range(cm.num_layers)), ["none"] * cm.num_layers, True, True)
        assert launches == pytest.approx(traced, rel=0.03)


def test_the_launch_heavy_moe_step_is_host_bound(moe):
    e = moe.estimate(_strategy(moe, micro_batch=1))
    wait = e.time["host_wait"]
    assert wait > 0.1 * e.step_time_s   # measured on an H100: 325-360 ms, GPU busy 201 ms
    assert 0.30 < e.step_time_s < 0.40
    floor = host_bound.step_floor(moe, e.strategy, [(0, moe.num_layers)], ["none"] * moe.num_layers)
    assert e.step_time_s == pytest.approx(floor)


def test_dense_big_layers_stay_gpu_bound(llama):
    for kw in ({"micro_batch": 1}, {"micro_batch": 2}, {"micro_batch": 1, "recompute": "selective"}):
        e = llama.estimate(_strategy(llama, **kw))
        assert e.time["host_wait"] == 0.0, kw


def test_more_tokens_per_launch_leave_the_host_bound(moe):
    one = moe.estimate(_strategy(moe, micro_batch=1)).time["host_wait"]
    two = moe.estimate(_strategy(moe, micro_batch=2)).time["host_wait"]
    assert two < one   # half the micro-batches: half the launches for the same GPU work


def test_no_floor_on_a_cpu_device_or_under_megatron():
    cpu = load_gpu_profile("h100-sxm").model_copy(update={"cores": 8})
    assert host_bound.host_launch_s(cpu) == 0.0
    assert host_bound.host_launch_s(load_gpu_profile("h100-sxm"), "megatron") == 0.0
    assert host_bound.host_launch_s(load_gpu_profile("h100-sxm"), "torch") == pytest.approx(6.55e-5)
    mcore = _cm("moe-gpu", runtime="megatron")
    assert mcore.estimate(_strategy(mcore, micro_batch=1)).time["host_wait"] == 0.0


def test_grouped_experts_launch_once_and_ep_divides_the_loop(moe):
    block = moe.blocks[0]
    s1, s2 = _strategy(moe, micro_batch=1), _strategy(moe, micro_batch=1).model_copy(update={"ep": 2})
    loop, split = host_bound.layer_launches(block, s1), host_bound.layer_launches(block, s2)
    grouped = host_bound.layer_launches(block, s1, grouped=True)
    assert grouped < split < loop


def test_the_search_prices_what_estimate_prices(moe):
    res = S.search(moe, 4, S.Constraints(fixed={"offload_optimizer": False}), top_k=3)
    assert res.candidates
    for c in res.candidates:
        e = moe.estimate(c.strategy, c.stages, c.layer_recompute)
        assert c.estimate.step_time_s == pytest.approx(e.step_time_s)
        assert c.step_time_s * (1 - 1e-9) <= e.step_time_s <= c.step_time_s + e.time["comm_contention"] + 1e-12
    assert any(c.estimate.time["host_wait"] > 0 for c in res.candidates)
