"""The prepared GPU check (benchmarks/gpu_check.sh) runs end to end on CPU with --dry-run.

It is the one command a session lent an H100/H200 runs (docs/validation.md, "GPU check");
this test keeps it working on machines without one.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_check_dry_run(tmp_path):
    """--quick, the mode a short device session runs: the emitted program before the MoE validation."""
    out = tmp_path / "gpu-check"
    env = {**os.environ, "PYTHON": sys.executable}
    proc = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_check.sh"), "--dry-run", "--quick", "--out",
                           str(out)], capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads((out / "summary.json").read_text())
    assert result["env"]["device"] == "cpu" and result["env"]["torch"]
    assert result["summary"]["profile_measured"] and (out / "profile-cpu-dry-run.json").is_file()
    ok = [r for r in result["strategies"] if r["status"] == "ok"]
    assert len(ok) == len(result["strategies"]) >= 3, [r.get("error") for r in result["strategies"]]
    for row in ok:  # both profiles priced every run that ran
        assert row["measured_time_s"] > 0 and row["datasheet_time_s"] > 0 and row["mem_err_datasheet_pct"] is not None
    assert result["emitted"]["status"] == "ok" and result["emitted"]["checkpoints"] == ["step-00000006"]
    assert result["summary"]["complete"] and not result["summary"]["skipped"]
    assert [d.split(":")[0] for d in result["summary"]["done"]] == [
        "profile llama", "profile moe", "validate llama fp32", "emitted program", "validate moe fp32"]
    assert "| step time |" in (out / "summary.md").read_text()
    assert len([p for p in out.iterdir() if p.is_file()]) <= 5  # what a device session copies back


def test_gpu_check_deadline_keeps_a_summary(tmp_path):
    """A deadline no step fits: every step is skipped and said so, summary.json / .md are still written."""
    out = tmp_path / "o"
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_check.py"), "--dry-run", "--quick",
                           "--deadline-s", "0", "--out", str(out)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stderr[-2000:]
    result = json.loads((out / "summary.json").read_text())
    assert result["summary"]["complete"] and result["summary"]["done"][0] == "profile llama: FAILED"
    assert len(result["summary"]["skipped"]) == 5 and result["emitted"]["status"] == "not run"
    assert "skipped: profile llama" in (out / "summary.md").read_text()


def test_gpu_check_refuses_without_cuda(tmp_path):
    """Without --dry-run on a machine with no CUDA device the driver says so (exit 2), writing nothing."""
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_check.py"), "--out", str(tmp_path / "o")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "no CUDA device" in proc.stderr
    assert not (tmp_path / "o" / "summary.json").exists()
