"""The price and the program agree on which MoE layers dispatch each tp rank's own sequence shard.

``techniques.moe_program.moe_tokens_local`` decides it from whether the layer has shared experts: the emitted
program (``codegen.runtime_parallel``) reads the module (``feed_forward.shared_experts is not None``), the pricing
(``cost_models.tp_collectives.routes_local_tokens``) infers it from the captured ops (a row-parallel linear after
the router). For every built-in MoE preset, every block of its cost model answers as its module does; the presets
hold both answers (shared experts: DeepSeek, Qwen2-MoE, Llama 4, moe-tiny; none: Mixtral, Qwen3-MoE, OLMoE).
"""

from __future__ import annotations

import itertools

import pytest

from autopar.cost_models.session import Inputs, build_cost_model
from autopar.cost_models.tp_collectives import routes_local_tokens
from autopar.profiles.intake import PRESETS, hf_presets, preset
from autopar.profiles.models import build_model
from autopar.techniques.moe_program import moe_tokens_local

SMALL = ("moe-tiny", "deepseek-tiny")   # the rest capture in a second or two each: slow


def _moe_presets() -> list:
    names = [n for n in [*PRESETS, *hf_presets()] if preset(n).num_experts]
    return [pytest.param(n, marks=() if n in SMALL else pytest.mark.slow) for n in names]


@pytest.mark.parametrize("name", _moe_presets())
def test_pricing_reads_the_modules_shared_experts(name):
    cm = build_cost_model(Inputs(model=name, seq_len=128, gpus_per_node=8))[0]
    model = build_model(cm.spec, "meta")
    routed = 0
    for i, template in cm.blocks.items():
        ff = model.layers[str(i)].feed_forward
        is_moe = hasattr(ff, "router")
        assert template.is_moe == is_moe, (name, i)
        routed += is_moe
        for sp, ep, etp in itertools.product((False, True), (1, 2), (1, 2)):
            program = is_moe and moe_tokens_local(sp, ep, etp, shared_experts=ff.shared_experts is not None)
            assert routes_local_tokens(template, sp, ep, etp) == program, (name, i, sp, ep, etp)
    assert routed, name

