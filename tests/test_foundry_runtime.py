"""--runtime llm-foundry: torch's program (``core.gpu.STACK_PROGRAM``) priced with llm-foundry's own fitted
constants (``stacks: llm-foundry:`` of a hardware profile); plan records it, emit and validate refuse it."""

from __future__ import annotations

import json
from typing import get_args

import pytest

from autopar.core.gpu import STACK_PROGRAM, Runtime, StackConstants
from autopar.core.plan import Plan
from autopar.core.strategy import Strategy
from autopar.cost_models.session import RUNTIMES, Inputs, build_cost_model, same_job
from autopar.planner.awkward import sub_cluster

STRATEGY = "dp=16,zero=3,mbs=1,gbs=32"


def test_every_stack_names_its_program_once():
    assert set(STACK_PROGRAM) == set(get_args(Runtime)) and RUNTIMES == tuple(STACK_PROGRAM)
    assert set(STACK_PROGRAM.values()) <= set(RUNTIMES) and STACK_PROGRAM["llm-foundry"] == "torch"


def _priced(runtime: str, stacks: dict, kernels: dict | None = None, model: str = "llama-tiny",
            seq: int = 128) -> tuple[object, float]:
    """(CostModel, step seconds) of ``STRATEGY`` with the profile's stack entries (and kernels) replaced."""
    cm, _, cluster, _ = build_cost_model(Inputs(model=model, gpu="h100-sxm", nodes=2, seq_len=seq, runtime=runtime))
    gpu = cm.gpu.model_copy(update={"stacks": {**cm.gpu.stacks, **stacks}, **(kernels or {})})
    cm.gpu = cm.timer.gpu = gpu  # the CostModel read the profile's at construction
    cm.stack = cm.timer.stack = gpu.stack(runtime)
    return cm, cm.estimate(Strategy.parse(STRATEGY).resolve(cluster.world)).step_time_s


def test_llm_foundry_runs_torchs_program_with_its_own_constants():
    neutral = {"llm-foundry": StackConstants(), "torch": StackConstants()}
    cm, foundry = _priced("llm-foundry", neutral)
    assert (cm.ctx.runtime, cm.stack_name) == ("torch", "llm-foundry")
    assert foundry == pytest.approx(_priced("torch", neutral)[1], rel=1e-12)  # same program, same constants
    slower = {"llm-foundry": StackConstants(step_overhead_s=0.5)}  # a hardware-level field the stack overrides
    assert _priced("llm-foundry", slower)[1] == pytest.approx(foundry + 0.5, rel=1e-9)  # its constants are its own...
    assert _priced("torch", slower)[1] == pytest.approx(_priced("torch", neutral)[1], rel=1e-12)  # not torch's


def test_a_kernel_measured_for_llm_foundry_is_its_own(tmp_path):
    cfg = tmp_path / "gpt.json"  # large enough to be GPU-bound, attention-heavy at 8k
    cfg.write_text(json.dumps(dict(model_type="gpt2", n_embd=2048, n_layer=2, n_head=16, vocab_size=1024,
                                   n_positions=8192)))
    neutral = {"llm-foundry": StackConstants(), "torch": StackConstants()}
    gpu = build_cost_model(Inputs(model="llama-tiny", gpu="h100-sxm"))[0].gpu
    kernels = {"attention_kernels": {"flash2": gpu.attention_kernels["flash2"].model_copy(
        update={"stacks": ["llm-foundry"]})}}
    step = {(rt, k is not None): _priced(rt, neutral, k, str(cfg), 8192)[1]
            for rt in ("torch", "llm-foundry") for k in (None, kernels)}
    assert step["llm-foundry", True] < 0.95 * step["llm-foundry", False]  # FA2 as measured runs above the curve
    assert step["torch", True] == pytest.approx(step["torch", False], rel=1e-12)  # not torch's kernel


def test_the_job_on_another_cluster_keeps_the_stack():
    cm, *_ = build_cost_model(Inputs(model="llama-tiny", gpu="h100-sxm", nodes=2, runtime="llm-foundry"))
    other = same_job(cm, cluster=sub_cluster(cm.cluster, 8))
    assert (other.stack_name, other.ctx.runtime, other.stack) == ("llm-foundry", "torch", cm.stack)


def test_fsdp1_is_llm_foundrys(run_cli):
    with pytest.raises(Exception, match="--runtime llm-foundry only"):
        build_cost_model(Inputs(model="llama-tiny", runtime="torch", fsdp_impl="fsdp1_pure"))
    cm, *_ = build_cost_model(Inputs(model="llama-tiny", runtime="llm-foundry", fsdp_impl="fsdp1_pure"))
    assert cm.ctx.fsdp_impl == "fsdp1_pure"
    code, out, err = run_cli("estimate", "llama-tiny", "--gpu", "h100-sxm", "--runtime", "llm-foundry",
                             "--strategy", "dp=8,zero=3,mbs=1", "--json")
    assert code == 0 and json.loads(out)["step_time_s"] > 0, err


def test_plan_records_llm_foundry_and_emit_refuses_it(run_cli, tmp_path):
    out = tmp_path / "p.json"
    code, stdout, err = run_cli("plan", "llama-tiny", "--runtime", "llm-foundry", "--top", "1", "--out", str(out))
    assert code == 0, err
    plan = Plan.model_validate_json(out.read_text())
    assert plan.runtime == "llm-foundry" and "--runtime llm-foundry" in plan.provenance.command
    assert "re-plan with --runtime torch" in " ".join(stdout.split())
    code, _, err = run_cli("emit", str(out), "--out", str(tmp_path / "run"))
    assert code == 2 and "runtime=llm-foundry" in err and len(err.strip().splitlines()) == 1
    code, _, err = run_cli("validate", "llama-tiny", "--nproc", "1", "--runtime", "llm-foundry")
    assert code == 2 and "--runtime=llm-foundry" in err and len(err.strip().splitlines()) == 1
