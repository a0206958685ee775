"""A measured GPU profile: the peak and curves reach the large-matrix regime (model ops count),
``--extend`` keeps the best peak and refits over both runs' points, and MFU stays against the
GPU type's datasheet peak when predictions come from a measured profile."""

from __future__ import annotations

import json

import pytest

from autopar.core.gpu import GpuProfile
from autopar.core.strategy import Strategy
from autopar.cost_models.compute import OpTimer
from autopar.cost_models.session import Inputs, build_cost_model
from autopar.profiles.hw import load_gpu_profile


def _gpu_measured(tmp_path, peak_tflops: float = 67.74) -> str:
    """A measured profile of an H100 (no CPU cores) whose fitted peak is far below the datasheet."""
    data = load_gpu_profile("h100-sxm").model_dump()
    data.update(name="h100-fake-measured", aliases=[], peak_tflops={"bf16": peak_tflops}, cores=None,
                meta={"measured": True, "device": "NVIDIA H100 80GB HBM3"}, measured_ops={})
    path = tmp_path / "prof.json"
    path.write_text(json.dumps(data))
    return str(path)


def _estimate(**inp):
    cm, _, cluster, _ = build_cost_model(Inputs(model="gpt-tiny", seq_len=32, **inp))
    return cm.estimate(Strategy(dp=cluster.world, micro_batch=1, global_batch=cluster.world))


def test_mfu_uses_datasheet_peak_with_measured_gpu_profile(tmp_path):
    e = _estimate(gpu="h100-sxm", gpus_per_node=1, dtype="bf16", profile=_gpu_measured(tmp_path))
    assert e.peak_flops == pytest.approx(989.4e12)
    plain = _estimate(gpu="h100-sxm", gpus_per_node=1, dtype="bf16")
    assert plain.peak_flops == pytest.approx(989.4e12)


def test_mfu_fp8_basis_is_bf16_datasheet(tmp_path):
    e = _estimate(gpu="h100-sxm", gpus_per_node=1, dtype="fp8")
    assert e.peak_flops == pytest.approx(989.4e12)


def test_mfu_cpu_profile_keeps_its_own_peak():
    e = _estimate(gpu="cpu", gpus_per_node=1, dtype="fp32")
    assert e.peak_flops == pytest.approx(OpTimer(load_gpu_profile("cpu"), "fp32").peak)
    assert GpuProfile.model_validate(load_gpu_profile("cpu").model_dump()).cores is not None
