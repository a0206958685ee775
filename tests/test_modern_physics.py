"""Modern-stack pricing: the overlap / contention / scaling formulas, fp8 GEMMs, the per-stack
constants, --runtime and --dtype fp8 at the CLI, and the published-row mapping."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from autopar.core.gpu import StackConstants
from autopar.cost_models.compute import OpTimer, fp8_cast_bytes, stack_matmul_eff
from autopar.cost_models.overlap import contention_time, exposed_behind, inter_node_factor, zero3_edges
from autopar.profiles.hw import load_gpu_profile

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
SHARED = Path(__file__).resolve().parents[2] / "shared" / "validation"


def test_exposed_behind_limits():
    # full overlap: only the excess over the compute window shows (the old FSDP model)
    assert exposed_behind(3.0, 5.0, 1.0) == 0.0
    assert exposed_behind(7.0, 5.0, 1.0) == pytest.approx(2.0)
    # no overlap: all of it shows; half: half runs alone, the other half hides if it fits
    assert exposed_behind(3.0, 5.0, 0.0) == pytest.approx(3.0)
    assert exposed_behind(4.0, 1.0, 0.5) == pytest.approx(2.0 + 1.0)
    assert exposed_behind(0.0, 1.0, 0.5) == 0.0


def test_edges_contention_and_node_scaling():
    assert zero3_edges(0.2, 0.3) == pytest.approx(0.5)
    assert contention_time(2.0, 0.1) == pytest.approx(0.2)
    assert contention_time(-1.0, 0.1) == 0.0
    assert inter_node_factor(1, 0.5) == 1.0
    assert inter_node_factor(16, 0.1) == pytest.approx(1.4)   # 1 + 0.1 * log2(16)
    assert inter_node_factor(64, 0.0) == 1.0


def test_fp8_gemm_runs_at_the_fp8_peak_with_cast_traffic():
    gpu = load_gpu_profile("h100-sxm")
    bf16, fp8 = OpTimer(gpu, "bf16"), OpTimer(gpu, "fp8")
    m = n = k = 8192
    t16, t8 = bf16.gemm(m, n, k), fp8.gemm(m, n, k)
    assert t8 < t16 < 2.2 * t8          # about twice as fast, less the cast kernels
    assert fp8.peak == bf16.peak         # attention, elementwise and the MFU basis stay bf16
    fwd, bwd = fp8_cast_bytes(m, n, k)
    assert fwd == 5 * (m * k + k * n) and bwd == 5 * m * n + 2 * (m * k + k * n)


def test_stack_constants_scale_and_cap():
    st = StackConstants(matmul_scale=1.2, fp8_matmul_scale=0.6)
    assert stack_matmul_eff(0.5, st, "bf16") == pytest.approx(0.6)
    assert stack_matmul_eff(0.9, st, "bf16") == 1.0
    assert stack_matmul_eff(0.5, st, "fp8") == pytest.approx(0.3)


def test_unfitted_profiles_are_neutral():
    """The CPU profile (closed loop) has no fitted stacks: its pricing does not change."""
    cpu = load_gpu_profile("cpu")
    assert cpu.stack("torch") == StackConstants()
    assert StackConstants().zero3_overlap == 1.0 and StackConstants().step_overhead_s == 0.0


def test_runtime_changes_the_price(run_cli):
    import json

    args = ["estimate", "llama-tiny", "--gpu", "h100-sxm", "--nodes", "2", "--seq-len", "128",
            "--global-batch", "32", "--strategy", "dp=16,zero=3,mbs=1", "--json"]
    out = {rt: json.loads(run_cli(*args, "--runtime", rt)[1])["step_time_s"] for rt in ("torch", "deepspeed")}
    assert out["torch"] > 0 and out["deepspeed"] > 0
    code, _, err = run_cli(*args, "--runtime", "jax")
    assert code == 2 and "--runtime=jax" in err and len(err.strip().splitlines()) == 1


def test_plan_refuses_fp8_for_the_torch_runtime(run_cli):
    code, _, err = run_cli("plan", "llama3-8b", "--dtype", "fp8")
    assert code == 2 and "--runtime megatron" in err and len(err.strip().splitlines()) == 1


def test_row_mapping_synthetic():
    sys.path.insert(0, str(BENCH))
    import published_rows as pr

    run = {"id": "x", "software": "torchtitan (PyTorch FSDP2)", "precision": "fp8 linears",
           "model": {"name": "Llama-2-13B", "layers": None, "seq_len": 4096},
           "hardware": {"gpu": "H100-SXM5-80GB", "num_gpus": 16, "gpus_per_node": 8},
           "parallel": {"tp": 2, "pp": 1, "dp": 8, "microbatch": 2, "global_batch": 64, "zero_stage": 3,
                        "recompute": "selective op"},
           "measured": {"tokens_per_sec_per_gpu": 1000}}
    case = pr.case_for(run)
    assert (case.runtime, case.gpu, case.dtype, case.nodes) == ("torch", "h100-sxm", "fp8", 2)
    assert case.config["num_hidden_layers"] == 40            # filled from the public config (ARCHS)
    assert "tp=2" in case.strategy and "zero=3" in case.strategy and "recompute=selective" in case.strategy
    run["model"]["name"] = "Nemotron_3_Nano"
    with pytest.raises(pr.RowSkip, match="Mamba"):
        pr.case_for(run)


@pytest.mark.skipif(not (SHARED / "published_modern.yaml").is_file(), reason="shared/validation not present")
def test_every_modern_row_maps_or_names_what_it_lacks():
    sys.path.insert(0, str(BENCH))
    import published_rows as pr

    runs = pr.load_runs(SHARED / "published_modern.yaml")
    skipped = []
    for run in runs:
        try:
            pr.case_for(run)
        except pr.RowSkip as exc:
            assert str(exc) and "\n" not in str(exc)
            skipped.append(run["id"])
    assert len(skipped) <= 0.03 * len(runs)
