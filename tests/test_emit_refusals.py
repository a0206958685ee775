"""What ``emit`` refuses before writing anything: a plan priced for another software stack
(``runtime`` other than torch), and per-layer recompute modes that break the same emit rules as
``strategy.recompute`` would (a hand-edited ``layer_recompute``). Fast: no torchrun."""

from __future__ import annotations

import pytest
from helpers_plans import make_plan

from autopar.codegen.emit_checks import check_plan
from autopar.errors import InputError


def _emit(run_cli, plan, tmp_path):
    path, out = tmp_path / "p.json", tmp_path / "run"
    plan.save(path)
    code, _, err = run_cli("emit", str(path), "--out", str(out), "--device", "cpu")
    return code, err, out


@pytest.mark.parametrize("runtime", ["megatron", "deepspeed", "torchtitan"])
def test_emit_refuses_a_plan_priced_for_another_runtime(run_cli, tmp_path, runtime):
    plan = make_plan("gpt-tiny", 2, "dp=2").model_copy(update={"runtime": runtime})
    code, err, out = _emit(run_cli, plan, tmp_path)
    assert code == 2, err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and f"runtime={runtime}" in lines[0] and "--runtime torch" in lines[0], err
    assert "Traceback" not in err and not out.exists()


def test_emit_accepts_the_torch_runtime(run_cli, tmp_path):
    code, err, out = _emit(run_cli, make_plan("gpt-tiny", 2, "dp=2"), tmp_path)
    assert code == 0, err
    assert (out / "train.py").exists()


def test_per_layer_op_recompute_with_offload_is_refused(run_cli, tmp_path):
    """strategy.recompute=none passes the offload rule; a layer of ``op`` under offload=1 must not."""
    plan = make_plan("gpt-tiny", 2, "dp=2,zero=3,offload=1,recompute=none",
                     layer_recompute=["none", "op", "none", "none"])
    with pytest.raises(InputError) as exc:
        check_plan(plan, "cpu")
    assert "offload=1 with recompute=op" in exc.value.message and "layer_recompute" in exc.value.message
    code, err, out = _emit(run_cli, plan, tmp_path)
    assert code == 2 and "recompute=op" in err and len(err.strip().splitlines()) == 1, err
    assert not out.exists()
    # the same plan with per-layer modes the rule allows is emitted
    check_plan(plan.model_copy(update={"layer_recompute": ["none", "full", "none", "full"]}), "cpu")


def test_per_layer_selective_under_a_zero_bubble_schedule_is_refused():
    plan = make_plan("gpt-tiny", 2, "pp=2,vpp=2,schedule=zb_interleaved,mbs=1,recompute=full",
                     layer_recompute=["selective", "full", "full", "full"])
    with pytest.raises(InputError) as exc:
        check_plan(plan, "cpu")
    assert "zb_interleaved" in exc.value.message and "recompute=selective" in exc.value.message
    check_plan(plan.model_copy(update={"layer_recompute": ["none", "full", "none", "full"]}), "cpu")
