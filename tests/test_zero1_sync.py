"""ZeRO-1 as autopar's program runs it (``dp_mode`` "zero1": ``runtime_zero1.ShardedAdamW``), counted on 4 gloo
ranks: gradients accumulate whole over the step's micro-batches, then one reduce-scatter per reduction group after
the last backward and one all-gather of the updated slices, with no backward left to hide them. Priced so:
``cost_models.fsdp.syncs_after_backward`` (the whole sync exposed; tests/test_pipeline_dp_sync.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent

PLANS = {   # name: (strategy, backward passes per step on every rank); 4 micro-batches per step
    "z1_dp": ("dp=4,mbs=1,gbs=16,zero=1", 4),
    "z1_pp": ("pp=2,dp=2,schedule=1f1b,mbs=1,gbs=8,zero=1", 4),
}


@pytest.mark.slow
def test_sharded_adamw_syncs_after_the_last_backward(tmp_path):
    sys.path.insert(0, str(HERE))
    from helpers_plans import make_plan

    from autopar.codegen.emit import emit
    from autopar.cost_models import fsdp

    for name, (text, _) in PLANS.items():
        plan = make_plan("gpt-tiny", 4, text, global_batch=16 if "pp" not in text else 8, dtype="bf16")
        assert plan.strategy.num_micro_batches == 4
        assert fsdp.syncs_after_backward("torch", plan.strategy, plan.dtype, "fsdp2")   # priced exposed
        emit(plan, tmp_path / name, "cpu")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=4",
           str(HERE / "zero1_sync_count.py"), str(tmp_path), "2", *(str(tmp_path / n) for n in PLANS)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    for name, (_, backwards) in PLANS.items():
        for r in range(4):
            steps = json.loads((tmp_path / f"{name}.rank{r}.json").read_text())
            assert len(steps) == 2
            for step in steps:
                ev = step["events"]
                assert ev.count("bwd") == backwards, (name, r, ev)
                last = max(i for i, e in enumerate(ev) if e == "bwd")
                assert ev[last + 1:] == ["rs", "ag"], (name, r, ev)   # one bucket: after every backward
