"""Pricing terms that read the emitted program's own rules instead of restating them (plan is program)."""

from __future__ import annotations

import itertools

from autopar.cost_models import fsdp
from autopar.techniques.dp_program import dp_mode
from autopar.techniques.pipeline import SCHEDULES


def _restated(runtime, pp, schedule, zero, offload, dp_cp, dtype) -> bool:
    """``fsdp.holds_stage_grads`` as it restated dp_mode's "FSDP2 below ZeRO-3" before reading it."""
    fsdp2 = zero < 3 and (offload or (zero == 2 and (dp_cp > 1 or dtype != "fp32")))
    return runtime == "torch" and fsdp2 and fsdp.syncs_once_per_step(runtime, pp, schedule)


def test_holds_stage_grads_reads_dp_mode_with_the_same_answers():
    grid = itertools.product(("torch", "torchtitan", "megatron", "deepspeed"), (1, 2, 4), SCHEDULES, range(4),
                             (False, True), (1, 2, 8), ("fp32", "bf16", "fp16", "fp8"))
    held = 0
    for runtime, pp, sched, zero, off, n, dtype in grid:
        got = fsdp.holds_stage_grads(runtime, pp, sched, zero, off, n, dtype)
        assert got == _restated(runtime, pp, sched, zero, off, n, dtype), (runtime, pp, sched, zero, off, n, dtype)
        if got:  # exactly FSDP2 below ZeRO-3, whatever tensor / expert parallel the plan adds
            held += 1
            assert zero < 3 and all(dp_mode(zero, n, dt, ep, pp > 1, off, dtype) == "fsdp2"
                                    for dt, ep in itertools.product((False, True), repeat=2))
    assert held > 0
