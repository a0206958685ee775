"""One usable-memory rule: the planner's live-tensor limit (``usable_mem_fraction`` of capacity less framework
overhead, what ``Estimate.feasible`` and the search check) leaves room for the caching allocator's reserve that
the reserved peak counts (``Estimate.reserved_peak_bytes`` = live x (1 + ``allocator_reserve_fraction``)):
``usable_mem_fraction = floor(1 / (1 + reserve), 2)`` on every profile that sets a reserve. Until 2026-11-27
h100-sxm and h200 checked plans at 0.95 while their reserve was 0.172, so a plan that fit by the planner's check
printed a reserved peak 11% above the capacity. The reserve's value: ``benchmarks/validate_memory.py --fit`` where
torchtitan rows publish memory, under the bound ``benchmarks/published_fit.py --bound`` prints for the runs of that
GPU (profiles/hardware/*.yaml sources)."""

from __future__ import annotations

import math

import pytest

from autopar.profiles.hw import list_gpu_profiles, load_gpu_profile

RESERVED = [n for n in list_gpu_profiles() if load_gpu_profile(n).allocator_reserve_fraction > 0]


def test_gh100_profiles_set_a_reserve():
    assert {"h100-sxm", "h100-96g", "h200"} <= set(RESERVED)


@pytest.mark.parametrize("name", RESERVED)
def test_usable_fraction_leaves_room_for_the_reserve(name):
    gpu = load_gpu_profile(name)
    r = gpu.allocator_reserve_fraction
    assert gpu.usable_mem_fraction == math.floor(100 / (1 + r)) / 100
    # a live peak at the planner's limit reserves no more than the allocator can hold
    assert gpu.usable_mem_bytes * (1 + r) <= gpu.mem_capacity_bytes - gpu.framework_overhead_bytes
