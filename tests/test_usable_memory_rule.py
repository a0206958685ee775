"""One usable-memory rule, per software stack: the planner's live-tensor limit (``CostModel.usable_mem_bytes``, what
``Estimate.feasible``, the partition's budgets and the search's memory floor check) leaves room for the caching
allocator's reserve that the reserved peak counts (``Estimate.reserved_peak_bytes`` = live x (1 + reserve)):
``core.gpu.usable_fraction(reserve) = floor(1 / (1 + reserve), 2)`` of capacity less framework overhead. The reserve
is the stack's (``StackConstants.allocator_reserve_fraction``, from ``GpuProfile.allocator_reserve_by_stack``, else
the GPU profile's ``allocator_reserve_fraction``). Until 2026-11-27 every stack on h100-sxm was checked with one
GPU-wide 5% reserve while torchtitan's FSDP2 rows measured 17.2% on the same chip: autopar's own FSDP2 program
(``--runtime torch``) could be priced as fitting and run out of memory. The values: ``benchmarks/validate_memory.py
--fit`` where rows publish memory, under the bound ``benchmarks/published_fit.py --bound`` prints per stack
(profiles/hardware/*.yaml sources)."""

from __future__ import annotations

import math

import pytest

from autopar.core.gpu import usable_fraction
from autopar.core.strategy import Strategy
from autopar.profiles.hw import list_gpu_profiles, load_gpu_profile

RESERVED = [n for n in list_gpu_profiles() if load_gpu_profile(n).allocator_reserve_fraction > 0]
STACKS = ("torch", "torchtitan", "megatron", "deepspeed", "llm-foundry")


def test_gpu_profiles_set_a_reserve():
    assert {"h100-sxm", "h100-96g", "h200", "h800", "a100-80g", "a100-40g"} <= set(RESERVED)


@pytest.mark.parametrize("name", RESERVED)
def test_usable_fraction_leaves_room_for_the_reserve(name):
    gpu = load_gpu_profile(name)
    assert gpu.usable_mem_fraction == usable_fraction(gpu.allocator_reserve_fraction)
    for rt in STACKS:
        r = gpu.reserve_fraction(gpu.stack(rt))
        # a live peak at the planner's limit reserves no more than the allocator can hold
        assert gpu.usable_bytes(gpu.stack(rt)) * (1 + r) <= gpu.mem_capacity_bytes - gpu.framework_overhead_bytes
        assert gpu.usable_bytes(gpu.stack(rt)) == int(
            (gpu.mem_capacity_bytes - gpu.framework_overhead_bytes) * math.floor(100 / (1 + r)) / 100)


def test_the_cost_model_checks_its_stacks_reserve():
    """torch on h100-sxm is checked at torchtitan's FSDP2 reserve (the same allocator), Megatron at its own bound;
    the estimate's usable bytes and reserved peak read the same reserve."""
    from autopar.cost_models.session import Inputs, build_cost_model

    gpu = load_gpu_profile("h100-sxm")
    assert gpu.reserve_fraction(gpu.stack("torch")) == gpu.reserve_fraction(gpu.stack("torchtitan")) == 0.172
    assert gpu.reserve_fraction(gpu.stack("megatron")) < 0.172
    for rt in ("torch", "megatron"):
        cm = build_cost_model(Inputs(model="gpt2-124m", gpu="h100-sxm", nodes=1, seq_len=1024, runtime=rt))[0]
        e = cm.estimate(Strategy(dp=cm.cluster.world, global_batch=8, micro_batch=1))
        assert e.usable_bytes == cm.usable_mem_bytes == gpu.usable_bytes(gpu.stack(rt))
        assert e.allocator_reserve_fraction == gpu.reserve_fraction(gpu.stack(rt))
        assert e.usable_bytes * (1 + e.allocator_reserve_fraction) <= e.capacity_bytes - gpu.framework_overhead_bytes


def test_a_stack_reserve_needs_a_source():
    gpu = load_gpu_profile("h100-sxm")
    data = gpu.model_dump()
    data["sources"] = {k: v for k, v in data["sources"].items() if k != "allocator_reserve_fraction.megatron"}
    with pytest.raises(ValueError, match="megatron"):
        type(gpu)(**data)
