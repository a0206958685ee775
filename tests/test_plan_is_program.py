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


def test_fsdp_impl_is_a_typed_field_of_the_pricing_context_given_at_construction():
    """Which FSDP runs (FSDP1 for llm-foundry's rows) is passed in through ``Inputs`` and carried by every cost
    model of the job; it was an attribute a benchmark set on the CostModel afterwards."""
    import dataclasses
    import typing

    import pytest

    from autopar.cost_models.fsdp import FSDP_IMPLS
    from autopar.cost_models.layer_cost import PricingContext
    from autopar.cost_models.session import Inputs, build_cost_model, same_job
    from autopar.errors import InputError

    field = {f.name: f for f in dataclasses.fields(PricingContext)}["fsdp_impl"]
    hints = typing.get_type_hints(PricingContext)
    assert field.default == "fsdp2" and typing.get_args(hints["fsdp_impl"]) == FSDP_IMPLS
    cm = build_cost_model(Inputs(model="gpt-tiny", gpu="a100-80g", seq_len=64, fsdp_impl="fsdp1_pure",
                                 runtime="llm-foundry"))[0]
    assert cm.ctx.fsdp_impl == "fsdp1_pure" and not hasattr(cm, "fsdp_impl")
    assert same_job(cm, seq_len=32).ctx.fsdp_impl == "fsdp1_pure"
    assert build_cost_model(Inputs(model="gpt-tiny", gpu="a100-80g", seq_len=64))[0].ctx.fsdp_impl == "fsdp2"
    with pytest.raises(InputError, match="fsdp_impl=fsdp3"):
        build_cost_model(Inputs(model="gpt-tiny", gpu="a100-80g", seq_len=64, fsdp_impl="fsdp3"))
    with pytest.raises(InputError, match="--runtime llm-foundry only"):
        build_cost_model(Inputs(model="gpt-tiny", gpu="a100-80g", seq_len=64, fsdp_impl="fsdp1_pure",
                                runtime="megatron"))
