"""Each software stack's search space, declared once per technique (``Technique.stacks``): ``plan --runtime S``
searches only what S runs, ``estimate --runtime S`` refuses what S does not run in one line, the torch stack
keeps autopar's emit rules exactly, and every technique declares every stack in ``core.gpu.Runtime``."""

from __future__ import annotations

from pathlib import Path
from typing import get_args

import pytest

from autopar import techniques
from autopar.core.gpu import Runtime
from autopar.core.strategy import FIELDS, Strategy
from autopar.cost_models.layer_cost import RECOMPUTE_MODES
from autopar.cost_models.session import Inputs, build_cost_model
from autopar.errors import InputError
from autopar.planner import search as S
from autopar.planner.space import for_stack, knob_options, shardings
from autopar.techniques import data_parallel, pipeline, recompute, stack_table
from autopar.techniques.precision import FP8

STACKS = get_args(Runtime)
DOCS = Path(__file__).resolve().parents[1] / "docs" / "planner.md"
GB = 64


def test_every_technique_declares_every_stack():
    """A new stack in ``Runtime`` or a new technique fails here until it says what the stack runs."""
    for t in techniques.ALL:
        assert set(t.stacks) == set(STACKS), f"{t.name} declares {sorted(t.stacks)}, Runtime has {STACKS}"
        for stack, runs in t.stacks.items():
            assert runs.source, f"{t.name} / {stack}: no source"
            assert set(runs.values) <= set(t.fields), f"{t.name} / {stack} narrows a field it does not own"
    assert set(FP8) == set(STACKS)


def test_declared_values_are_values_of_their_field():
    domain = {"schedule": pipeline.SCHEDULES, "recompute": recompute.MODES, "zero_stage": data_parallel.ZERO_STAGES,
              "sequence_parallel": (False, True), "offload_optimizer": (False, True)}
    for t in techniques.ALL:
        for stack, runs in t.stacks.items():
            for name, vals in runs.values.items():
                assert vals and name in FIELDS
                assert all(v in domain[name] if name in domain else (isinstance(v, int) and v >= 1) for v in vals), \
                    (t.name, stack, name, vals)


def test_torch_declares_nothing_beyond_the_emit_rules():
    """torch plans stay autopar's program's space (the rules and emit rules), so they do not move."""
    for t in techniques.ALL:
        assert not t.stacks["torch"].values and not t.stacks["torch"].rules, t.name


@pytest.fixture(scope="module")
def cms():
    return {rt: build_cost_model(Inputs(model="llama3-8b", gpu="h100-sxm", nodes=1, seq_len=2048, runtime=rt))[0]
            for rt in STACKS}


def space(cm):
    """(strategy, per-layer recompute modes) of every configuration the search enumerates for ``cm``."""
    cons = for_stack(cm, S.Constraints())
    out = [Strategy(**S.probe(sh, GB, k).model_dump()).resolve(cm.cluster.world)
           for row in shardings(cm, cons, GB) for sh in row for k in knob_options(cm, cons, sh, GB)]
    return out, cons.modes


@pytest.mark.parametrize("stack", STACKS)
def test_the_search_enumerates_only_what_the_stack_runs(cms, stack):
    cm = cms[stack]
    found, modes = space(cm)
    assert found
    for s in found:
        assert not techniques.violations(s, cm.spec, s.world, cm.seq_len, stack=stack), s.compact()
    assert set(modes) == set(techniques.stack_values(stack, "recompute", RECOMPUTE_MODES))


def test_llm_foundry_and_megatron_spaces(cms):
    foundry, modes = space(cms["llm-foundry"])
    assert {(s.tp, s.pp, s.cp, s.sequence_parallel, s.offload_optimizer) for s in foundry} == {(1, 1, 1, False, False)}
    assert {s.zero_stage for s in foundry} == {0, 2, 3} and set(modes) == {"none", "full"}   # no ZeRO-1 ShardedAdamW
    megatron, modes = space(cms["megatron"])
    assert {s.schedule for s in megatron if s.pp > 1} == {"1f1b", "interleaved"}              # no zbv / zb / gpipe
    assert {s.zero_stage for s in megatron} == {0, 1, 3} and not any(s.offload_optimizer for s in megatron)
    assert all(s.pp == 1 for s in megatron if s.zero_stage == 3) and "op" not in modes
    torch, _ = space(cms["torch"])
    assert {s.schedule for s in torch} >= {"zbv", "zb_interleaved"} and {s.zero_stage for s in torch} == {0, 1, 2, 3}


def test_deepspeed_pipelines_run_zero_below_2(cms):
    ds, _ = space(cms["deepspeed"])
    assert any(s.pp > 1 for s in ds) and all(s.zero_stage <= 1 and s.schedule == "1f1b" for s in ds if s.pp > 1)


def test_search_results_keep_to_the_stack(cms):
    res = S.search(cms["llm-foundry"], GB, top_k=3)
    assert res.candidates and all(c.strategy.pp == c.strategy.cp == c.strategy.tp == 1 and c.strategy.zero_stage != 1
                                  and set(c.layer_recompute) <= {"none", "full"} for c in res.candidates)


def test_a_fixed_value_the_stack_does_not_run_is_one_line(cms):
    with pytest.raises(InputError, match=r"schedule=zbv: --runtime megatron does not run it; it runs schedule "
                                         r"1f1b \| interleaved"):
        for_stack(cms["megatron"], S.Constraints(fixed={"schedule": "zbv", "vpp": 2}))
    assert for_stack(cms["torch"], S.Constraints(fixed={"schedule": "zbv", "vpp": 2})).modes == RECOMPUTE_MODES


@pytest.mark.parametrize("args, words", [
    (("estimate", "--runtime", "llm-foundry", "--strategy", "pp=2,dp=-1,mbs=1"), ("pp=2", "llm-foundry", "pp 1")),
    (("estimate", "--runtime", "llm-foundry", "--strategy", "zero=1"), ("zero=1", "llm-foundry", "0 | 2 | 3")),
    (("memory", "--runtime", "megatron", "--strategy", "pp=2,vpp=2,schedule=zbv"), ("schedule=zbv", "megatron")),
    (("estimate", "--runtime", "deepspeed", "--strategy", "pp=2,zero=3"), ("zero=3 with pp=2", "deepspeed")),
    (("estimate", "--runtime", "torchtitan", "--strategy", "tp=2,zero=3"), ("tp=2 with sp=0", "torchtitan")),
    (("estimate", "--runtime", "torchtitan", "--strategy", "tp=2,sp=1"), ("zero=0 with tp=2", "torchtitan", "DDP")),
    (("plan", "--runtime", "llm-foundry", "--zero", "1"), ("zero=1", "llm-foundry", "0 | 2 | 3")),
    (("plan", "--runtime", "deepspeed", "--dtype", "fp8"), ("--dtype fp8", "deepspeed", "--runtime megatron")),
])
def test_cli_refusals_are_one_line(run_cli, args, words):
    code, _, err = run_cli(args[0], "llama3-8b", "--seq-len", "2048", *args[1:])
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert all(w in err for w in words), err


def test_plan_says_whose_space_it_searched(run_cli):
    code, out, _ = run_cli("plan", "llama3-8b", "--seq-len", "2048", "--runtime", "llm-foundry", "--top", "1")
    assert code == 0 and "space searched: what llm-foundry runs" in out
    code, out, _ = run_cli("estimate", "llama3-8b", "--seq-len", "2048", "--runtime", "megatron",
                           "--strategy", "tp=2,sp=1,pp=2,vpp=2,schedule=interleaved,mbs=1")
    assert code == 0, out


def test_docs_table_is_the_generated_one():
    """docs/planner.md holds ``python -m autopar.techniques.stack_table``'s output verbatim."""
    assert stack_table.markdown() in DOCS.read_text(), "regenerate: python -m autopar.techniques.stack_table"


def test_refusal_names_cli_spelling():
    runs = data_parallel.STACKS["llm-foundry"]
    (msg,) = runs.refusals("llm-foundry", {"zero_stage": 1})
    assert msg.startswith("zero=1: --runtime llm-foundry does not run it") and "0 | 2 | 3" in msg
    assert Strategy.parse("zero=1").zero_stage == 1   # the field as --strategy spells it


def test_torchtitan_offloads_at_zero_2_or_3(cms):
    cm = cms["torchtitan"]
    for z in (0, 1, 2, 3):
        s = Strategy.parse(f"dp=8,zero={z},offload=1,mbs=1,gbs={GB}").resolve(8)
        if z < 2:
            with pytest.raises(InputError, match=f"zero={z}.*: --runtime torchtitan"):
                cm.check(s)
        else:
            cm.check(s)
