"""One place per technique (autopar.techniques): every strategy field is owned once, every declared
apply_* and cost term resolves, and the search space is exactly what emit accepts."""

from __future__ import annotations

import functools
import importlib
import inspect
import itertools

import pytest

from autopar import techniques
from autopar.codegen.emit_checks import check_plan
from autopar.core.plan import Plan
from autopar.core.strategy import FIELDS, Strategy
from autopar.cost_models.layer_cost import RECOMPUTE_MODES
from autopar.cost_models.session import Inputs, build_cost_model
from autopar.errors import InputError
from autopar.planner import search as S
from autopar.planner.build import plan_from_candidate
from autopar.techniques import pipeline, recompute


def test_every_field_owned_once():
    owned = [f for t in techniques.ALL for f in t.fields]
    assert sorted(owned) == sorted(FIELDS), "each Strategy field belongs to exactly one technique"
    for t in techniques.ALL:
        assert set(t.search) - {"ep*etp"} <= set(t.fields), f"{t.name} searches a field it does not own"


@pytest.mark.parametrize("tech", techniques.ALL, ids=lambda t: t.name)
def test_apply_resolves_to_a_codegen_function(tech):
    module, name = tech.apply.rsplit(".", 1)
    assert module.startswith("autopar.codegen.") and name.startswith("apply_")
    fn = getattr(importlib.import_module(module), name)
    assert inspect.isfunction(fn)


@pytest.mark.parametrize("tech", techniques.ALL, ids=lambda t: t.name)
def test_cost_terms_are_public_cost_model_api(tech):
    assert tech.cost_terms, f"{tech.name} declares no cost term"
    for term in tech.cost_terms:
        module, qual = term.split(":")
        obj = importlib.import_module(f"autopar.cost_models.{module}")
        for part in qual.split("."):
            assert not part.startswith("_"), f"{term} is private"
            obj = getattr(obj, part)
        assert callable(obj), term


def test_recompute_modes_are_the_priced_ones():
    assert set(recompute.MODES) == set(RECOMPUTE_MODES)


def test_schedules_declared_once():
    assert set(pipeline.SEARCHED + pipeline.NAMED_ONLY) == set(pipeline.SCHEDULES)
    # V placement: rank r holds stages r and 2p-1-r
    assert [pipeline.stage_rank(i, 4, "zbv") for i in range(8)] == [0, 1, 2, 3, 3, 2, 1, 0]
    assert pipeline.rank_stages(1, 4, 2, "zbv") == [1, 6]
    assert pipeline.rank_stages(1, 4, 2, "interleaved") == [1, 5]


def test_rules_are_shared_by_estimate_and_emit():
    """The same rule text comes out of the cost model's check and emit's check."""
    cm = _cm("gpt-tiny", 8)
    s = Strategy.parse("tp=8,dp=1").resolve(8, 8)
    with pytest.raises(InputError) as est:
        cm.check(s)
    plan = Plan(model=cm.spec, cluster=cm.cluster, seq_len=64, strategy=s)
    with pytest.raises(InputError) as emit:
        check_plan(plan, "cpu")
    assert est.value.message == emit.value.message


# ----- the search space is what emit accepts --------------------------------------------------
SPACES = [("gpt-tiny", 4, 8), ("gpt-tiny", 8, 16), ("moe-tiny", 4, 8), ("moe-tiny", 8, 8), ("llama-tiny", 4, 16)]


@functools.cache
def _cm(model: str, world: int):
    return build_cost_model(Inputs(model=model, gpu="h100-sxm", nodes=1, gpus_per_node=world, seq_len=64))[0]


@functools.cache
def _space(model: str, world: int, gb: int):
    cm = _cm(model, world)
    out = []
    # a named schedule also opens the named-only ones (gpipe, dualpipev)
    for cons in (S.Constraints(), S.Constraints(fixed={"schedule": "gpipe"}),
                 S.Constraints(fixed={"schedule": "dualpipev"})):
        for row in S.shardings(cm, cons, gb):
            for sh in row:
                for k in S.knob_options(cm, cons, sh, gb):
                    out.append((cm, S.probe(sh, gb, k)))
    return out


@pytest.mark.parametrize("model,world,gb", SPACES)
def test_every_searched_configuration_is_emitted(model, world, gb):
    space = _space(model, world, gb)
    assert space
    for cm, probe in space:
        s = Strategy(**probe.model_dump()).resolve(world)
        cm.check(s)
        plan = Plan(model=cm.spec, cluster=cm.cluster, seq_len=cm.seq_len, strategy=s)
        check_plan(plan, "cpu")   # raises InputError on anything emit would refuse


def test_every_searched_value_of_every_knob_occurs():
    """Union over the small spaces: each categorical value a technique declares is searched somewhere."""
    seen: dict[str, set] = {}
    for model, world, gb in SPACES:
        for _, s in _space(model, world, gb):
            for f in ("zero_stage", "sequence_parallel", "schedule"):
                seen.setdefault(f, set()).add(getattr(s, f))
    for t in techniques.ALL:
        for f, values in itertools.chain(t.search.items(), t.named_only.items()):
            if isinstance(values, tuple) and f in seen:
                assert set(values) <= seen[f], f"{t.name}: {f} values {set(values) - seen[f]} never searched"


def test_emit_rules_enforced_during_search():
    """moe-tiny with pp=2 and one micro-batch per rank: 1F1B would be refused by emit, so it is not
    searched (GPipe stands in); ZBV on tied embeddings is not emitted, so not searched either."""
    space = [s for _, s in _space("moe-tiny", 4, 8)]
    assert any(s.pp == 2 and s.num_micro_batches < 2 and s.schedule == "gpipe" for s in space)
    for s in space:
        if s.pp > 1 and s.schedule == "1f1b":
            assert s.num_micro_batches >= s.pp
    tied = _cm("gpt-tiny", 4).spec.model_copy(update={"tie_embeddings": True})
    zbv = Strategy.parse("pp=2,vpp=2,schedule=zbv,mbs=1").resolve(2, 8)
    assert not pipeline.TECHNIQUE.violations(zbv, tied, 2, 64)
    assert any("tied" in m for m in pipeline.TECHNIQUE.violations(zbv, tied, 2, 64, emitted=True))


def test_planned_candidates_build_plans_emit_accepts():
    cm = _cm("moe-tiny", 4)
    res = S.search(cm, 8, S.Constraints(fixed={"pp": 2}), top_k=5)
    assert res.candidates
    for c in res.candidates:
        plan = plan_from_candidate(cm, c)
        assert [st.rank for st in plan.stages] == [pipeline.stage_rank(i, 2, c.strategy.schedule)
                                                   for i in range(len(plan.stages))]
        check_plan(plan, "cpu")


def test_context_parallel_is_not_emitted_for_sliding_window_models():
    """The emitted cp attention intercepts causal SDPA only; a sliding-window layer would attend
    within its rank's chunk: priced (rules) but refused by emit and never searched (emit rules)."""
    from autopar.techniques import context_parallel

    spec = _cm("llama-tiny", 2).spec
    kinds = ["sliding", "full"] * (spec.layers // 2)
    windowed = spec.model_copy(update={"sliding_window": 16, "layer_attention": kinds})
    cp2 = Strategy.parse("cp=2").resolve(2, 2)
    assert not context_parallel.TECHNIQUE.violations(cp2, spec, 2, 64, emitted=True)
    assert not context_parallel.TECHNIQUE.violations(cp2, windowed, 2, 64)
    msgs = context_parallel.TECHNIQUE.violations(cp2, windowed, 2, 64, emitted=True)
    assert msgs and "sliding-window" in msgs[0] and "use cp=1" in msgs[0]
    full_only = windowed.model_copy(update={"layer_attention": ["full"] * spec.layers})
    assert not context_parallel.TECHNIQUE.violations(cp2, full_only, 2, 64, emitted=True)
