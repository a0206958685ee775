"""Run an emitted ``train.py`` with FSDP2's collectives counted per parameter group and step (a torchrun
entry for tests/test_zero_bubble_fsdp.py): ``torchrun ... zb_fsdp_count.py OUT_DIR STEPS PROGRAM_DIR...``, the
programs one after another in the same processes (one launch). Writes ``OUT_DIR/<program>.rank<r>.json``: per
step, each group's all-gathers and reduce-scatters; ``<program>.metrics.jsonl``: the program's own step lines."""

from __future__ import annotations

import json
import os
import runpy
import sys
from collections import Counter
from pathlib import Path

import torch.distributed as dist
import torch.distributed.fsdp._fully_shard._fsdp_param_group as fsdp_group

out_dir, n_steps, programs = Path(sys.argv[1]), sys.argv[2], [Path(p) for p in sys.argv[3:]]
sys.path.insert(0, str(programs[0]))
from autopar_rt import runtime as rt  # noqa: E402  (the emitted programs' runtime: the same files in each)

gathers: Counter = Counter()
reduces: Counter = Counter()
steps: list[dict] = []


def _counted(fn, counts: Counter):
    def wrapper(fsdp_params, *args, **kwargs):
        counts[fsdp_params[0]._param_fqn] += 1   # one call per parameter group (FSDP unit)
        return fn(fsdp_params, *args, **kwargs)
    return wrapper


fsdp_group.foreach_all_gather = _counted(fsdp_group.foreach_all_gather, gathers)
fsdp_group.foreach_reduce = _counted(fsdp_group.foreach_reduce, reduces)
pp_step = rt.pp_step


def _step(*args, **kwargs):
    """The step's counts: what ran from the previous step's end to this step's end (one step's sync)."""
    loss = pp_step(*args, **kwargs)
    steps.append({"all_gather": dict(gathers), "reduce_scatter": dict(reduces)})
    gathers.clear()
    reduces.clear()
    return loss


rt.pp_step = _step
dist.init_process_group("gloo")   # one group for every program (runtime_mesh.init_distributed finds it)
for program in programs:
    steps.clear()
    metrics = out_dir / f"{program.name}.metrics.jsonl"
    sys.argv = [str(program / "train.py"), "--steps", n_steps, "--metrics-file", str(metrics)]
    runpy.run_path(str(program / "train.py"), run_name="__main__")
    (out_dir / f"{program.name}.rank{os.environ.get('RANK', '0')}.json").write_text(json.dumps(steps))
dist.destroy_process_group()
