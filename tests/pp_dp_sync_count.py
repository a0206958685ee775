"""Run emitted pipelined ``train.py`` programs with their data-parallel collectives counted (a torchrun entry
for tests/test_pipeline_dp_sync.py): ``torchrun ... pp_dp_sync_count.py OUT_DIR STEPS PROGRAM_DIR...``, the
programs one after another in the same processes (one launch). Writes ``OUT_DIR/<program>.rank<r>.json``: per
step, each FSDP2 parameter group's all-gathers (``all_gather``) and gradient reductions (``reduce``: FSDP2's
reduce-scatter, or ``replicate``'s all-reduce), the reductions issued outside the schedule's REDUCE_GRAD
(``PipelineStage.perform_reduce_grad``, after the stage's last backward) as ``reduce_in_backward``, and the
micro-batch backwards the rank ran after its first reduction (``backwards_after_reduce``)."""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path

import torch.distributed.fsdp._fully_shard._fsdp_param_group as fsdp_group
from torch.distributed.pipelining import stage as pp_stage

out_dir, n_steps, programs = Path(sys.argv[1]), sys.argv[2], [Path(p) for p in sys.argv[3:]]
sys.path.insert(0, str(programs[0]))
from autopar_rt import runtime as rt  # noqa: E402  (the emitted programs' runtime: the same files in each)
from count_programs import run_programs  # noqa: E402  (tests/, this script's folder)

gathers: Counter = Counter()
reduces: Counter = Counter()
state = {"in_reduce_grad": False, "in_backward": 0, "reduced": False, "after": 0}


def _gather(fn):
    def wrapper(fsdp_params, *args, **kwargs):
        gathers[fsdp_params[0]._param_fqn] += 1   # one call per parameter group (FSDP unit)
        return fn(fsdp_params, *args, **kwargs)
    return wrapper


def _reduce(fn):
    def wrapper(fsdp_params, *args, **kwargs):
        reduces[fsdp_params[0]._param_fqn] += 1
        if not state["in_reduce_grad"]:
            state["in_backward"] += 1
        state["reduced"] = True
        return fn(fsdp_params, *args, **kwargs)
    return wrapper


def _marked(fn, key: str):
    def wrapper(self, *args, **kwargs):
        if key == "in_reduce_grad":
            state[key] = True
            try:
                return fn(self, *args, **kwargs)
            finally:
                state[key] = False
        state["after"] += state["reduced"]   # a backward after this step's first reduction
        return fn(self, *args, **kwargs)
    return wrapper


fsdp_group.foreach_all_gather = _gather(fsdp_group.foreach_all_gather)
fsdp_group.foreach_reduce = _reduce(fsdp_group.foreach_reduce)
base = pp_stage._PipelineStageBase
base.perform_reduce_grad = _marked(base.perform_reduce_grad, "in_reduce_grad")
base.backward_one_chunk = _marked(base.backward_one_chunk, "backward")
base.backward_weight_one_chunk = _marked(base.backward_weight_one_chunk, "backward")


def _record() -> dict:
    step = {"all_gather": dict(gathers), "reduce": dict(reduces), "reduce_in_backward": state["in_backward"],
            "backwards_after_reduce": state["after"]}
    gathers.clear()
    reduces.clear()
    state.update(in_backward=0, reduced=False, after=0)
    return step


run_programs(rt, programs, out_dir, n_steps, _record)
