"""``plan --runtime S`` lists only the per-layer recompute S's configuration expresses (``techniques.recompute``
``LAYOUTS``; ``planner.recompute.stack_layouts``): Megatron-LM selective on every layer or full on the first N
layers of every stage, torchtitan ``op`` on every layer or every N-th block of a rank, llm-foundry the first N
blocks, DeepSpeed one mode on every layer. Also the stack rules that replaced autopar's emit rules off torch
(torchtitan's DDP alone, Megatron's 1F1B with fewer micro-batches than pp) and the published torchtitan
"selective layer" rows priced as they ran."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import get_args

import pytest

from autopar import techniques
from autopar.core.gpu import Runtime
from autopar.cost_models.session import Inputs, build_cost_model
from autopar.planner import recompute as rc
from autopar.planner import search as S
from autopar.planner.space import for_stack, knob_options, shardings
from autopar.techniques.recompute import LAYOUTS, is_mpt, layouts

STACKS = get_args(Runtime)
BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
MODERN = Path(__file__).resolve().parents[2] / "shared" / "validation" / "published_modern.yaml"


def expressed(stack: str, lr: list[str], stages: list[tuple[int, int]], pp: int, schedule: str,
              spec=None) -> bool:
    """``lr`` is one of the per-layer lists ``stack``'s configuration writes on these stages for model ``spec``."""
    chunks = rc.rank_chunks(stages, pp, schedule)
    for lay in layouts(stack, spec):
        if not set(lr) <= set(lay.modes):
            continue
        if lay.mix == "per_layer" or (lay.mix == "uniform" and len(set(lr)) == 1):
            return True
        longest = max(b - a for a, b in stages)
        if lay.mix == "first_n" and any(lr == rc.first_n(stages, n) for n in range(longest + 1)):
            return True
        if lay.mix == "every_nth" and (set(lr) == {"none"} or any(
                lr == rc.every_nth(chunks, n, len(lr)) for n in range(1, len(lr) + 1))):
            return True
    return False


def test_first_n_is_per_stage_and_every_nth_counts_over_a_rank():
    stages = [(0, 3), (3, 6), (6, 9), (9, 12)]   # pp 2, two chunks per rank (looped: stages 0, 2 on rank 0)
    assert rc.first_n(stages, 2) == ["full", "full", "none"] * 4
    chunks = rc.rank_chunks(stages, 2, "interleaved")
    assert [list(map(list, c)) for c in chunks] == [[[0, 1, 2], [6, 7, 8]], [[3, 4, 5], [9, 10, 11]]]
    # one counter over rank 0's blocks 0 1 2 6 7 8: the 2nd, 4th and 6th (1, 6, 8) checkpointed
    lr = rc.every_nth(chunks, 2, 12)
    assert [i for i in (0, 1, 2, 6, 7, 8) if lr[i] == "full"] == [1, 6, 8]


@pytest.mark.parametrize("mix", ["first_n", "every_nth"])
def test_stack_layouts_recompute_at_least_the_partitions_layers_per_rank(mix):
    stages = [(0, 5), (5, 8), (8, 13), (13, 16)]
    chosen = ["full"] * 3 + ["none"] * 2 + ["full"] + ["none"] * 2 + ["full"] * 4 + ["none"] * 4
    out = rc.stack_layouts(mix, chosen, stages, 2, "interleaved")
    assert out
    for lr in out:
        assert expressed("megatron" if mix == "first_n" else "torchtitan", lr, stages, 2, "interleaved")
        for ranks in rc.rank_chunks(stages, 2, "interleaved"):
            layers = [i for ch in ranks for i in ch]
            assert sum(lr[i] == "full" for i in layers) >= sum(chosen[i] == "full" for i in layers)
    assert rc.stack_layouts("per_layer", chosen, stages, 2, "interleaved") == [chosen]


@pytest.fixture(scope="module")
def cms():
    """llama3-8b at 8k on 8 H100: memory-tight, the torch search mixes recompute modes across layers."""
    return {rt: build_cost_model(Inputs(model="llama3-8b", gpu="h100-sxm", nodes=1, runtime=rt))[0] for rt in STACKS}


@pytest.mark.parametrize("stack", STACKS)
def test_plans_list_only_the_recompute_the_stack_expresses(cms, stack):
    """Before LAYOUTS, --runtime deepspeed listed dp8 z3 with 6 of 32 layers full (DeepSpeed checkpoints every
    layer or none) and torchtitan mixed op and full across layers."""
    res = S.search(cms[stack], 128, top_k=5)
    assert res.candidates
    for c in res.candidates:
        s = c.strategy
        assert expressed(stack, c.layer_recompute, c.stages, s.pp, s.schedule, cms[stack].spec), \
            (s.compact(), c.layer_recompute)
        e = cms[stack].estimate(s, c.stages, c.layer_recompute)
        assert e.step_time_s == pytest.approx(c.estimate.step_time_s) and e.feasible


def test_torchtitan_runs_ddp_alone(cms):
    """torchtitan 0.2.2 raises "DDP has not supported > 1D parallelism": no ZeRO-0 beside tp, pp or cp (the
    plan of llama3-8b was dp2 tp2 pp2 z0 before)."""
    cm = cms["torchtitan"]
    cons = for_stack(cm, S.Constraints())
    found = [k.zero for row in shardings(cm, cons, 128) for sh in row for k in knob_options(cm, cons, sh, 128)
             if sh.dp * sh.cp > 1 and max(sh.tp, sh.pp, sh.cp) > 1]
    assert found and 0 not in found
    assert any(k.zero == 0 for row in shardings(cm, cons, 128) for sh in row if sh.dp == 8
               for k in knob_options(cm, cons, sh, 128))


def test_megatron_runs_1f1b_with_fewer_micro_batches_than_pp(cms):
    """torch's Schedule1F1B refuses m < pp (an emit rule, torchtitan's rule too); Megatron-Core runs it."""
    from autopar.planner.space import schedule_options

    assert ("1f1b", 1) in schedule_options(cms["megatron"], S.Constraints(), 8, 4)
    assert ("1f1b", 1) in schedule_options(cms["deepspeed"], S.Constraints(), 8, 4)
    for stack in ("torch", "torchtitan"):
        assert ("1f1b", 1) not in schedule_options(cms[stack], S.Constraints(), 8, 4)
    s = S.probe(S.Sharding(1, 1, 8, 1, 1, 1, False, 1), 4, S.Knobs(0, False, "1f1b", 1))
    assert not techniques.violations(s, cms["megatron"].spec, 8, 8192, stack="megatron")
    assert techniques.violations(s, cms["torchtitan"].spec, 8, 8192, stack="torchtitan")


@pytest.mark.skipif(not MODERN.is_file(), reason="needs shared/validation")
def test_torchtitan_selective_layer_rows_run_every_second_block(tmp_path):
    """torchtitan's "selective layer" rows (selective_ac_option 2) are priced as every second block fully
    recomputed, which torchtitan runs; as ``selective`` (core attention alone, no torchtitan setting) the
    13B row did not fit its 80 GB."""
    sys.path.insert(0, str(BENCH))
    import published_recompute
    import published_rows as pr

    rows = [r for r in pr.load_runs(MODERN) if r["id"].endswith("_selective_layer")]
    assert len(rows) == 2
    for run in rows:
        case = pr.case_for(run)
        cm, s = pr.build(case, tmp_path)
        lr = published_recompute.layer_recompute(case, cm, s)
        assert s.recompute == "full" and lr == ["none", "full"] * (cm.num_layers // 2)
        assert pr.estimate(case, cm, s).feasible



def test_stack_setting_names_the_config_that_runs_the_plan():
    stages = [(0, 4), (4, 8), (8, 12), (12, 16)]
    chunks = rc.rank_chunks(stages, 2, "interleaved")
    assert rc.stack_setting(LAYOUTS["megatron"], rc.first_n(stages, 3), stages, 2, "interleaved").endswith(
        "--recompute-method block --recompute-num-layers 3")
    assert rc.stack_setting(LAYOUTS["megatron"], ["selective"] * 16, stages, 2, "interleaved") == \
        "--recompute-granularity selective"
    assert rc.stack_setting(LAYOUTS["megatron"], ["selective"] * 8 + ["full"] * 8, stages, 2, "interleaved") is None
    assert rc.stack_setting(LAYOUTS["torchtitan"], rc.every_nth(chunks, 3, 16), stages, 2, "interleaved") == \
        'activation_checkpoint.mode = "selective", selective_ac_option = "3"'
    assert rc.stack_setting(LAYOUTS["torchtitan"], rc.first_n(stages, 1), stages, 2, "interleaved") is None
    assert rc.stack_setting(LAYOUTS["deepspeed"], ["full"] * 15 + ["none"], stages, 2, "interleaved") is None
    assert rc.stack_setting(LAYOUTS["llm-foundry"], ["none"] * 16, stages, 2, "interleaved") == ""


def test_plan_says_the_stacks_recompute_setting(run_cli):
    """gpt3-13b on 16 H100 recomputes 30 of its 40 blocks: llm-foundry's MPT runs that as its model config's
    target (``MPTForCausalLM.activation_checkpointing_fn``), not an fsdp_config key."""
    code, out, _ = run_cli("plan", "gpt3-13b", "--nodes", "2", "--runtime", "llm-foundry", "--top", "1")
    assert code == 0 and "model.activation_checkpointing_target: {mptblock: first-" in " ".join(out.split())


def test_llm_foundry_recomputes_every_block_or_none_off_mpt(cms, run_cli):
    """llm-foundry reads activation_checkpointing_target only in its MPT (mpt_causal_lm); a Llama runs as
    hf_causal_lm, which checkpoints every block under fsdp_config.activation_checkpointing. Before, plan
    llama3-8b --runtime llm-foundry priced 3 of 32 layers recomputed as "{mptblock: first-3}"."""
    from autopar.core.model_spec import ModelSpec

    cm = cms["llm-foundry"]
    assert not is_mpt(cm.spec) and {x.mix for x in layouts("llm-foundry", cm.spec)} == {"uniform"}
    assert is_mpt(ModelSpec(family="custom", hf_config={"model_type": "mpt"}))
    assert "first_n" in {x.mix for x in layouts("llm-foundry", ModelSpec(family="gpt", hidden=64, layers=2,
                                                                          heads=2, ffn_hidden=256, vocab=64))}
    for c in S.search(cm, 128, top_k=5).candidates:
        assert len(set(c.layer_recompute)) == 1, (c.strategy.compact(), c.layer_recompute)
    code, out, _ = run_cli("plan", "llama3-8b", "--runtime", "llm-foundry", "--top", "1")
    assert code == 0 and "mptblock" not in out and "fsdp_config.activation_checkpointing: true" in " ".join(out.split())


@pytest.mark.parametrize("stack", ["deepspeed", "megatron", pytest.param("torchtitan", marks=pytest.mark.slow)])
def test_bounded_search_returns_the_exhaustive_plans_of_a_stack(stack):
    """The bounds stay under each layout family's placed price (each family's modes are among the constraints'
    modes the floors read): the bounded search lists what partitioning every configuration lists."""
    cm = build_cost_model(Inputs(model="llama3-8b", gpu="h100-sxm", nodes=1, runtime=stack, seq_len=4096))[0]

    def plans(res):
        return [(c.strategy.compact(), round(c.estimate.step_time_s, 9), tuple(c.layer_recompute))
                for c in res.candidates]
    assert plans(S.search(cm, 64, top_k=3)) == plans(S.search(cm, 64, top_k=3, exhaustive=True))
