"""The program options a plan is priced with (--runtime, --compile, --loss-parallel,
--moe-capacity-factor, --no-a2a-overlap, --cross-entropy) travel with it: recorded in the Plan, in its reproducing
command, and on every cost model of the same job; options autopar's own program does not run are
refused for --runtime torch."""

from __future__ import annotations

from autopar.core.plan import Plan
from autopar.cost_models.layer_cost import PROGRAM_OPTIONS
from autopar.cost_models.session import Inputs, build_cost_model
from autopar.planner.awkward import sub_cluster, with_cluster


def test_plan_records_the_stack_options(run_cli, tmp_path):
    out = tmp_path / "p.json"
    code, stdout, err = run_cli("plan", "moe-tiny", "--runtime", "megatron", "--moe-capacity-factor", "1",
                                "--no-a2a-overlap", "--cross-entropy", "native", "--top", "1", "--out", str(out))
    assert code == 0, err
    plan = Plan.model_validate_json(out.read_text())
    assert (plan.runtime, plan.moe_capacity_factor, plan.a2a_overlap) == ("megatron", 1.0, False)
    assert plan.cross_entropy == "native"
    cmd = plan.provenance.command
    assert "--runtime megatron" in cmd and "--moe-capacity-factor 1.0" in cmd and "--no-a2a-overlap" in cmd
    assert "--cross-entropy native" in cmd
    assert "re-plan with --runtime torch" in " ".join(stdout.split())   # not "next: autopar emit"


def test_torch_runtime_refuses_token_dropping(run_cli):
    code, out, err = run_cli("estimate", "moe-tiny", "--strategy", "dp=8", "--moe-capacity-factor", "1")
    assert code == 2 and "--moe-capacity-factor=1.0" in err and "dropless" in err and "Traceback" not in err


def test_other_runtimes_refuse_megatrons_loss_kernel(run_cli):
    code, out, err = run_cli("estimate", "moe-tiny", "--strategy", "dp=8", "--cross-entropy", "native")
    assert code == 2 and "--cross-entropy=native" in err and "--runtime megatron" in err and "Traceback" not in err


def test_other_clusters_of_the_job_price_the_same_program():
    cm, *_ = build_cost_model(Inputs(model="moe-tiny", runtime="megatron", moe_capacity_factor=1.25,
                                     a2a_overlap=False, cross_entropy="native"))
    other = with_cluster(cm, sub_cluster(cm.cluster, 4))
    assert {k: getattr(other.ctx, k) for k in PROGRAM_OPTIONS} == {k: getattr(cm.ctx, k) for k in PROGRAM_OPTIONS}


def test_a_shorter_sequence_of_the_job_prices_the_same_program():
    # the "what to change" suggestions (planner.explain) price --seq-len alternatives with same_job:
    # the runtime, its options and its templates (fused as Megatron runs them) must carry over
    from autopar.cost_models.session import program_templates, same_job

    cm, *_ = build_cost_model(Inputs(model="moe-tiny", runtime="megatron", moe_capacity_factor=1.25,
                                     a2a_overlap=False, seq_len=512, cross_entropy="native"))
    short = same_job(cm, seq_len=256)
    assert short.ctx.runtime == "megatron" and short.seq_len == 256
    assert {k: getattr(short.ctx, k) for k in PROGRAM_OPTIONS} == {k: getattr(cm.ctx, k) for k in PROGRAM_OPTIONS}
    assert short.templates == program_templates(cm.spec, 256, cm.dtype, cm.gpu, "megatron")
    assert short.templates != program_templates(cm.spec, 256, cm.dtype, cm.gpu, "torch")  # unfused there
