"""Pricing under a routing trace leaves the shared pricing context as built (``CostModel.routed``): the busiest
expert rank's load and the share of tokens leaving the rank reach the prices of each strategy's expert parallel
degree through a copy of the context, never through ``cm.ctx`` (where the last strategy's load stayed before)."""

import pytest

from autopar.core.strategy import Strategy
from autopar.cost_models.session import Inputs, build_cost_model
from autopar.profiles.routing import synthetic_trace

SHAPES = ("dp=8,ep=8,mbs=1,gbs=16", "dp=8,ep=2,mbs=1,gbs=16", "dp=8,ep=4,mbs=2,gbs=16,zero=1")


def _cm(runtime: str, trace=None):
    inp = Inputs(model="moe-tiny", gpu="h100-sxm", nodes=1, gpus_per_node=8, seq_len=256, runtime=runtime,
                 trace=str(trace) if trace else None)
    return build_cost_model(inp)[0]


@pytest.mark.parametrize("runtime", ["torch", "megatron"])
def test_trace_prices_without_touching_the_shared_context(tmp_path, runtime):
    synthetic_trace(experts=8, layers=3, topk=2, tokens=4096, skew=0.8, affinity=0.9, seed=0).save(tmp_path / "t.json")
    cm = _cm(runtime, tmp_path / "t.json")
    before = dict(vars(cm.ctx))
    got = {text: cm.estimate(Strategy.parse(text).resolve(8)) for text in SHAPES}
    assert vars(cm.ctx) == before   # 476fc2a: expert_load_ratio / ep_cross_fraction of the last ep priced
    plain = _cm(runtime)
    for text, est in got.items():
        s = Strategy.parse(text).resolve(8)
        ratio, cross = cm.moe_load(s.ep)
        assert ratio > 1.0
        ref = _cm(runtime)   # the load set on a context by hand: the prices pricing gave when it set them
        ref.ctx.expert_load_ratio, ref.ctx.ep_cross_fraction = ratio, (cross if s.ep > 1 else None)
        want = ref.estimate(s)
        assert (est.step_time_s, est.peak_bytes) == (want.step_time_s, want.peak_bytes), text
        assert est.step_time_s > plain.estimate(s).step_time_s, text   # the trace's load is priced
    view = cm.routed(Strategy.parse(SHAPES[0]).resolve(8))
    assert view.ctx is not cm.ctx and view.templates is cm.templates and view.ctx.fits is cm.ctx.fits
