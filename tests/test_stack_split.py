"""``plan --runtime S`` prices only the pipeline stage splits S's configuration expresses (``techniques.pipeline``
``SPLITS``; ``planner.stack_split``) and prints the setting that makes S run the priced one. Before, the search
partitioned layers freely under every stack: ``plan llama3-8b --runtime torchtitan --strategy pp=4`` priced
stages [8, 9, 9, 6] (19.84 s) and printed no split, and torchtitan's own split prices 22.65 s."""

from __future__ import annotations

import re

import pytest

from autopar.cost_models.session import Inputs, build_cost_model
from autopar.planner import search as S
from autopar.planner.stack_split import DEEPSPEED_TYPE, split_counts, split_setting


def runs(stack: str, setting: str, layers: int, pp: int, plan_stages):
    """The stages the stack runs under the printed ``setting``, read from its text (None: its default split,
    ``CostModel.estimate``'s)."""
    if stack == "torch":   # autopar's program runs the plan's stages
        return plan_stages
    if setting == "":
        return None
    if stack == "deepspeed":
        assert setting == DEEPSPEED_TYPE and layers % pp == 0
        return [(j * layers // pp, (j + 1) * layers // pp) for j in range(pp)]
    if stack == "torchtitan":
        sizes = [part.count('"layers.') for part in setting.split("], [")]
    else:   # Megatron: the named end stages, the other layers evenly over the other stages
        first = re.search(r"--decoder-first-pipeline-num-layers (\d+)", setting)
        last = re.search(r"--decoder-last-pipeline-num-layers (\d+)", setting)
        ends = [int(x.group(1)) for x in (first, last) if x]
        middle, rest = divmod(layers - sum(ends), pp - len(ends))
        assert rest == 0
        sizes = [int(first.group(1))] * bool(first) + [middle] * (pp - len(ends)) + [int(last.group(1))] * bool(last)
    bounds = [sum(sizes[:j]) for j in range(len(sizes) + 1)]
    return list(zip(bounds, bounds[1:]))


@pytest.mark.parametrize("stack", ["torch", "megatron", "deepspeed", pytest.param("torchtitan",
                                                                                    marks=pytest.mark.slow)])
def test_the_printed_strategy_and_split_estimate_the_plans_price(stack):
    """Plan at pp=4 under each stack, then estimate each listed plan's strategy, recompute and the stages the
    printed setting runs under the same runtime: the same step time."""
    cm = build_cost_model(Inputs(model="llama3-8b", gpu="h100-sxm", nodes=1, runtime=stack))[0]
    res = S.search(cm, 128, S.Constraints(fixed={"pp": 4}), top_k=3)
    assert res.candidates
    for c in res.candidates:
        setting = split_setting(stack, c.stages, c.strategy.pp)
        assert setting is not None, (c.strategy.compact(), c.stages)
        stages = runs(stack, setting, cm.num_layers, c.strategy.pp * c.strategy.vpp, c.stages)
        e = cm.estimate(c.strategy, stages, c.layer_recompute)
        assert e.step_time_s == pytest.approx(c.estimate.step_time_s, rel=1e-9), (c.strategy.compact(), setting)


def test_megatron_splits_keep_the_middle_stages_even():
    assert split_counts("ends", 8, 4, 1) == [[1, 1, 1, 5], [2, 1, 1, 4], [3, 1, 1, 3], [4, 1, 1, 2], [5, 1, 1, 1],
                                              [1, 2, 2, 3], [2, 2, 2, 2], [3, 2, 2, 1], [1, 3, 3, 1]]
    assert split_counts("ends", 5, 2, 1) == [[1, 4], [2, 3], [3, 2], [4, 1]]
    assert split_counts("ends", 8, 4, 2) == [[2, 2, 2, 2]] and split_counts("ends", 10, 4, 2) == []
    assert split_counts("even", 32, 4, 1) == [[8] * 4] and split_counts("even", 30, 4, 1) == []


def test_split_settings():
    assert split_setting("megatron", [(0, 8), (8, 16), (16, 24), (24, 32)], 4) == ""
    assert split_setting("megatron", [(0, 7), (7, 16), (16, 25), (25, 32)], 4) == \
        "--decoder-first-pipeline-num-layers 7 --decoder-last-pipeline-num-layers 7"
    assert split_setting("megatron", [(0, 9), (9, 18), (18, 27), (27, 32)], 4) == \
        "--decoder-last-pipeline-num-layers 5"
    assert split_setting("megatron", [(0, 7), (7, 15), (15, 24), (24, 32)], 4) is None   # middle stages differ
    assert split_setting("megatron", [(0, 3), (3, 8), (8, 12), (12, 16)], 2) is None     # interleaved, uneven
    assert split_setting("torchtitan", [(0, 7), (7, 15), (15, 23), (23, 30)], 4) == ""   # torchtitan's own
    assert split_setting("torchtitan", [(0, 8), (8, 15), (15, 23), (23, 30)], 4).count("layers.") == 30
    assert split_setting("torchtitan", [(0, 2), (2, 3)], 2) == \
        'parallelism.module_fqns_per_model_part = [["tok_embeddings", "layers.0", "layers.1"], ' \
        '["layers.2", "norm", "output"]]'
    assert split_setting("deepspeed", [(0, 4), (4, 8)], 2) == DEEPSPEED_TYPE
    assert split_setting("deepspeed", [(0, 5), (5, 8)], 2) is None
    assert split_setting("torch", [(0, 5), (5, 8)], 2) == ""


def test_plan_prints_megatrons_split(run_cli):
    """The winner's uneven split is said as Megatron's flags (the search lists no split they cannot say)."""
    import json

    code, out, _ = run_cli("plan", "llama3-8b", "--runtime", "megatron", "--strategy", "pp=4", "--json")
    plan = json.loads(out)
    sizes = [b - a for a, b in plan["best"]["stages"]]
    said = " ".join(plan["why"])
    assert code == 0 and (len(set(sizes)) == 1) == ("--decoder-" not in said), (sizes, said)


@pytest.mark.parametrize("stack,strategy,says", [
    ("megatron", "pp=3,vpp=2,schedule=interleaved", "pp*vpp = 6: --runtime megatron runs interleaved chunks of equal"),
    ("deepspeed", "pp=3", "pp=3: --runtime deepspeed is priced with equal stages")])
def test_a_split_the_stack_does_not_run_is_named_not_called_memory(run_cli, stack, strategy, says):
    """32 layers over 3 ranks: no Megatron interleaved chunks, no equal DeepSpeed stages. Before, plan listed
    uneven stages; with the stacks' splits alone it said "nothing fits" of a configuration that fits."""
    code, _, err = run_cli("plan", "llama3-8b", "--gpus-per-node", "6", "--runtime", stack, "--strategy", strategy)
    assert code == 2 and says in " ".join(err.split()), err
