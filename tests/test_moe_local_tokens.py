"""The price and the program agree on which MoE layers dispatch each tp rank's own sequence shard.

``techniques.moe_program.moe_tokens_local`` decides it (sp and ep * etp > 1; shared experts or not since
2026-11-27: they gather their own input): the emitted program (``codegen.runtime_parallel.apply_tp``) marks the
module ``tokens_local``, the pricing (``cost_models.tp_collectives.routes_local_tokens``) reads the captured ops
(the router, a row-parallel linear after it for shared experts). For every built-in MoE preset, every block of its
cost model answers as its module, parallelized by ``apply_tp`` on a fake tp 2 group, does; the presets hold both
kinds of layer (shared experts: DeepSeek, Qwen2-MoE, Llama 4, moe-tiny; none: Mixtral, Qwen3-MoE, OLMoE).
"""
from __future__ import annotations

import itertools

import helpers_collectives
import pytest

from autopar.codegen import runtime as rt
from autopar.cost_models.session import Inputs, build_cost_model
from autopar.cost_models.tp_collectives import routes_local_tokens
from autopar.profiles.intake import PRESETS, hf_presets, preset

SMALL = ("moe-tiny", "deepseek-tiny")   # the rest capture in a second or two each: slow
TP = 2


def _moe_presets() -> list:
    names = [n for n in [*PRESETS, *hf_presets()] if preset(n).num_experts]
    return [pytest.param(n, marks=() if n in SMALL else pytest.mark.slow) for n in names]


def _program_local(spec, sp: bool, ep: int, etp: int) -> dict[int, bool]:
    """Block index -> whether ``apply_tp`` (tp 2 on a fake group) made its MoE layer dispatch the rank's shard."""
    model = rt.build_meta_model(spec)
    rt.apply_tp(model, rt.build_mesh("cpu", tp=TP, ep=ep, etp=etp), sequence_parallel=sp)
    return {int(i): getattr(b.feed_forward, "tokens_local", False) for i, b in model.layers.items()}


@pytest.mark.parametrize("name", _moe_presets())
def test_pricing_reads_what_the_program_routes(name):
    cm = build_cost_model(Inputs(model=name, seq_len=128, gpus_per_node=8))[0]
    spec = cm.spec.model_copy(update={"layers": max(cm.blocks) + 1})   # the blocks the cost model prices
    model = rt.build_meta_model(spec)
    routed = 0
    for i, template in cm.blocks.items():
        ff = model.layers[str(i)].feed_forward
        assert template.is_moe == hasattr(ff, "router"), (name, i)
        routed += template.is_moe
    assert routed, name
    with helpers_collectives.fake_world(TP):
        for sp, (ep, etp) in itertools.product((False, True), ((1, 1), (2, 1), (1, 2))):
            program = _program_local(spec, sp, ep, etp)
            for i, template in cm.blocks.items():
                assert routes_local_tokens(template, sp, ep, etp) == program[i], (name, i, sp, ep, etp)
