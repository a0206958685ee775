"""The loop the collective-counting torchrun entries share (tests/zb_fsdp_count.py, tests/pp_dp_sync_count.py,
tests/zero1_sync_count.py): run each emitted ``train.py`` in turn in the same processes, recording per step what
``record()`` returns after each ``pp_step`` (or the runtime function ``at`` names), and write
``OUT_DIR/<program>.rank<r>.json`` (and the program's own ``<program>.metrics.jsonl``). ``launch``: the tests' side,
one torchrun of an entry over emitted programs, the recorded steps back."""

from __future__ import annotations

import faulthandler
import json
import os
import re
import runpy
import subprocess
import sys
import warnings
from pathlib import Path

import torch.distributed as dist

KILLED = re.compile(r"exitcode\s*:\s*-(6|7|11)\b")   # torchrun's summary: a rank killed by SIGABRT/SIGBUS/SIGSEGV


def run_programs(rt, programs: list[Path], out_dir: Path, n_steps: str, record, at: str = "pp_step") -> None:
    """``record()`` reads and resets the counters of the step that just ended (one step's sync)."""
    steps: list[dict] = []
    step_fn = getattr(rt, at)

    def _step(*args, **kwargs):
        out = step_fn(*args, **kwargs)
        steps.append(record())
        return out

    setattr(rt, at, _step)
    faulthandler.enable()   # a rank that aborts (SIGABRT/SIGSEGV) prints its Python stack: the test names where
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
    if done.returncode != 0 and KILLED.search(done.stderr):
        # CI once saw one rank of test_zero1_sync abort ("terminate called without an active exception", SIGABRT)
        # in 1 of ~25 runs; 22 runs under load here did not reproduce it. A rank killed by a signal is launched
        # once more (said as a warning, with the first run's output); a Python error or a wrong count still fails.
        first = _failure(done.stderr, out_dir, names, ranks)
        warnings.warn(f"{entry.name}: a rank died of a signal; launched again. {first}", stacklevel=2)
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout_s)
    assert done.returncode == 0, _failure(done.stderr, out_dir, names, ranks)
    return {n: [json.loads((out_dir / f"{n}.rank{r}.json").read_text()) for r in range(ranks)] for n in names}


def _failure(stderr: str, out_dir: Path, names, ranks: int) -> str:
    """What a failed launch says: which programs each rank finished, and the ranks' own error output (a Python
    traceback, a fault handler's stack) before torchrun's summary, which would otherwise fill the message."""
    done = {n: [r for r in range(ranks) if (out_dir / f"{n}.rank{r}.json").exists()] for n in names}
    own = stderr.split("Traceback (most recent call last):\n  File \"<frozen runpy>\"")[0]
    return f"ranks that finished each program: {done}\n{own[-6000:]}\n... torchrun: {stderr[-1500:]}"
