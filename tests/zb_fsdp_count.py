"""Run an emitted ``train.py`` with FSDP2's collectives counted per parameter group and step (a torchrun
entry for tests/test_zero_bubble_fsdp.py): ``torchrun ... zb_fsdp_count.py OUT_DIR STEPS PROGRAM_DIR...``, the
programs one after another in the same processes (one launch). Writes ``OUT_DIR/<program>.rank<r>.json``: per
step, each group's all-gathers and reduce-scatters; ``<program>.metrics.jsonl``: the program's own step lines."""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path

import torch.distributed.fsdp._fully_shard._fsdp_param_group as fsdp_group

out_dir, n_steps, programs = Path(sys.argv[1]), sys.argv[2], [Path(p) for p in sys.argv[3:]]
sys.path.insert(0, str(programs[0]))
from autopar_rt import runtime as rt  # noqa: E402  (the emitted programs' runtime: the same files in each)
from count_programs import run_programs  # noqa: E402  (tests/, this script's folder)

gathers: Counter = Counter()
reduces: Counter = Counter()


def _counted(fn, counts: Counter):
    def wrapper(fsdp_params, *args, **kwargs):
        counts[fsdp_params[0]._param_fqn] += 1   # one call per parameter group (FSDP unit)
        return fn(fsdp_params, *args, **kwargs)
    return wrapper


fsdp_group.foreach_all_gather = _counted(fsdp_group.foreach_all_gather, gathers)
fsdp_group.foreach_reduce = _counted(fsdp_group.foreach_reduce, reduces)


def _record() -> dict:
    step = {"all_gather": dict(gathers), "reduce_scatter": dict(reduces)}
    gathers.clear()
    reduces.clear()
    return step


run_programs(rt, programs, out_dir, n_steps, _record)
