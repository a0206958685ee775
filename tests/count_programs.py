"""The loop the collective-counting torchrun entries share (tests/zb_fsdp_count.py, tests/pp_dp_sync_count.py,
tests/zero1_sync_count.py): run each emitted ``train.py`` in turn in the same processes, recording per step what
``record()`` returns after each ``pp_step`` (or the runtime function ``at`` names), and write
``OUT_DIR/<program>.rank<r>.json`` (and the program's own ``<program>.metrics.jsonl``). ``launch``: the tests' side,
one torchrun of an entry over emitted programs, the recorded steps back."""

from __future__ import annotations

import json
import os
import runpy
import subprocess
import sys
from pathlib import Path

import torch.distributed as dist


def run_programs(rt, programs: list[Path], out_dir: Path, n_steps: str, record, at: str = "pp_step") -> None:
    """``record()`` reads and resets the counters of the step that just ended (one step's sync)."""
    steps: list[dict] = []
    step_fn = getattr(rt, at)

    def _step(*args, **kwargs):
        out = step_fn(*args, **kwargs)
        steps.append(record())
        return out

    setattr(rt, at, _step)
    dist.init_process_group("gloo")   # one group for every program (runtime_mesh.init_distributed finds it)
    for program in programs:
        steps.clear()
        metrics = out_dir / f"{program.name}.metrics.jsonl"
        sys.argv = [str(program / "train.py"), "--steps", n_steps, "--metrics-file", str(metrics)]
        runpy.run_path(str(program / "train.py"), run_name="__main__")
        (out_dir / f"{program.name}.rank{os.environ.get('RANK', '0')}.json").write_text(json.dumps(steps))
    dist.destroy_process_group()


def launch(entry: Path, out_dir: Path, names, n_steps: int = 2, ranks: int = 4,
           timeout_s: float = 300) -> dict[str, list[list[dict]]]:
    """Run ``entry`` under torchrun on ``ranks`` gloo ranks over the programs ``out_dir/<name>``; returns each
    program's recorded steps per rank."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}",
           str(entry), str(out_dir), str(n_steps), *(str(out_dir / n) for n in names)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout_s)
    assert done.returncode == 0, done.stderr[-3000:]
    return {n: [json.loads((out_dir / f"{n}.rank{r}.json").read_text()) for r in range(ranks)] for n in names}
