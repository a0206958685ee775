"""The stack's settings are data, not only text: ``plan --json`` / ``Plan.stack_settings`` carry the recompute and
stage-split settings the winner's ``why`` prints, and ``estimate`` / ``memory`` price a stage split the stack runs
(``estimate.default_stages``), say its setting (text and ``--json``) and refuse, as ``plan`` does
(``stack_split.no_split``), a pipeline the stack splits no way autopar prices. Before, ``estimate --runtime
megatron`` of 32 layers at pp=5 priced stages [7, 7, 6, 6, 6], which no Megatron-Core flag runs, and said nothing;
it prices [6, 7, 7, 7, 5] (--decoder-first-pipeline-num-layers 6 --decoder-last-pipeline-num-layers 5)."""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from autopar.core.plan import Plan, StackSettings
from autopar.cost_models.estimate import default_stages, even_stages, megatron_stages
from autopar.planner.stack_split import MEGATRON_FIRST, MEGATRON_LAST, split_setting

PP3 = ("llama3-8b", "--seq-len", "2048", "--gpus-per-node", "3")


def test_megatron_default_split_is_one_its_flags_run():
    """Every layer count and pp: the split priced has a Megatron setting; even_stages kept where it has one."""
    for layers in range(2, 41):
        for pp in range(2, min(layers, 9) + 1):
            stages = megatron_stages(layers, pp)
            assert stages[0][0] == 0 and stages[-1][1] == layers and all(b > a for a, b in stages)
            assert split_setting("megatron", stages, pp) is not None, (layers, pp, stages)
    assert megatron_stages(32, 3) == even_stages(32, 3) == [(0, 11), (11, 22), (22, 32)]
    assert [b - a for a, b in megatron_stages(32, 5)] == [6, 7, 7, 7, 5]        # even_stages: 7, 7, 6, 6, 6
    assert [b - a for a, b in megatron_stages(7, 5)] == [2, 1, 1, 1, 2]
    assert [b - a for a, b in default_stages("megatron", 30, 2, 2)] == [7, 8, 8, 7]   # --account-for-* flags
    assert default_stages("torch", 32, 5, 1) == even_stages(32, 5)


def test_estimate_says_the_megatron_setting_of_the_split_it_priced(run_cli):
    code, out, _ = run_cli("estimate", *PP3, "--runtime", "megatron", "--strategy", "pp=3,dp=1,mbs=1")
    assert code == 0 and f"stages of [11, 11, 10] layers as megatron runs them: {MEGATRON_LAST} 10" in out, out
    code, out, _ = run_cli("memory", *PP3, "--runtime", "megatron", "--strategy", "pp=3,dp=1,mbs=1,recompute=full",
                           "--json")
    d = json.loads(out)
    assert d["stages"] == [[0, 11], [11, 22], [22, 32]]
    assert d["stack_settings"]["stage_split"] == f"{MEGATRON_LAST} 10" and d["stack_settings"]["recompute"]


def test_estimate_at_the_printed_setting_prices_the_same_step(run_cli):
    """The stages the printed flags run (first / last as named, the others even) priced: the CLI's step time."""
    from autopar.core.strategy import Strategy
    from autopar.cost_models.session import Inputs, build_cost_model

    code, out, _ = run_cli("estimate", "llama3-8b", "--seq-len", "2048", "--nodes", "5", "--gpus-per-node", "1",
                           "--runtime", "megatron", "--strategy", "pp=5,dp=1,mbs=1", "--json")
    d = json.loads(out)
    assert d["stack_settings"]["stage_split"] == f"{MEGATRON_FIRST} 6 {MEGATRON_LAST} 5"
    sizes = [6] + [(32 - 11) // 3] * 3 + [5]
    bounds = [sum(sizes[:j]) for j in range(6)]
    cm, _, cl, _ = build_cost_model(Inputs(model="llama3-8b", seq_len=2048, nodes=5, gpus_per_node=1,
                                           runtime="megatron"))
    s = Strategy.parse(d["strategy_string"]).resolve(cl.world)
    assert cm.estimate(s, list(zip(bounds, bounds[1:]))).step_time_s == pytest.approx(d["step_time_s"], rel=1e-12)


@pytest.mark.parametrize("cmd,runtime,strategy,words", [
    ("estimate", "deepspeed", "pp=3,dp=1,mbs=1", ("pp=3", "deepspeed", "pick pp dividing")),
    ("memory", "megatron", "pp=3,vpp=2,schedule=interleaved,dp=1,mbs=1", ("pp*vpp = 6", "megatron")),
])
def test_estimate_refuses_what_plan_refuses(run_cli, cmd, runtime, strategy, words):
    code, _, err = run_cli(cmd, *PP3, "--runtime", runtime, "--strategy", strategy)
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert all(w in err for w in words), err


def test_plan_json_and_plan_file_carry_the_settings_why_prints(run_cli, tmp_path):
    out_path = tmp_path / "plan.json"
    code, out, _ = run_cli("plan", "llama3-8b", "--seq-len", "2048", "--runtime", "megatron", "--strategy", "pp=4",
                           "--json", "--out", str(out_path))
    assert code == 0
    d = json.loads(out)
    best = d["best"]["stack_settings"]
    assert set(best) == {"recompute", "stage_split"}
    for key in ("recompute", "stage_split"):
        assert best[key] is not None and (best[key] == "" or best[key] in d["why"][0])
    sizes = [b - a for a, b in d["best"]["stages"]]
    if len(set(sizes)) > 1:
        assert best["stage_split"], sizes
    assert Plan.load(out_path).stack_settings == StackSettings(**best)


def test_old_plan_files_load_without_the_field(tmp_path):
    from autopar.core.strategy import Strategy
    from autopar.cost_models.session import Inputs, build_cost_model
    from autopar.planner.build import plan_from_strategy

    cm, _, cl, _ = build_cost_model(Inputs(model="gpt-tiny", seq_len=128, gpus_per_node=2))
    data = plan_from_strategy(cm, Strategy.parse("pp=2,dp=1,mbs=1").resolve(cl.world)).model_dump(mode="json")
    del data["stack_settings"]
    path = tmp_path / "old.json"
    path.write_text(json.dumps(data))
    assert Plan.load(path).stack_settings == StackSettings()
    with pytest.raises(ValidationError):
        StackSettings(recompute="", extra_key="x")
