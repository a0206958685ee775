"""What a pipeline rank runs after each of its chunks' REDUCE_GRAD (a torchrun entry for
tests/test_reduce_grad_order.py): ``torchrun ... reduce_grad_order_count.py OUT_DIR STEPS PROGRAM_DIR...``, the
emitted programs one after another in the same processes (``count_programs.run_programs``). Writes
``OUT_DIR/<program>.rank<r>.json``: per step, ``order``, the rank's backwards (``B<stage>``) and REDUCE_GRADs
(``R<stage>``, ``PipelineStage.perform_reduce_grad``) as they ran; ``reduces``, the gradient reductions each
REDUCE_GRAD issued (``foreach_reduce``: replicate's all-reduce per FSDP unit); and ``waits``, the reductions whose
events the compute stream was made to wait on inside it (``FSDPParamGroup.finalize_backward`` over
``comm_ctx._last_post_reduce_events``: on a GPU no kernel the rank enqueues after the REDUCE_GRAD starts before
them)."""

from __future__ import annotations

import sys
from pathlib import Path

import torch.distributed.fsdp._fully_shard._fsdp_param_group as fsdp_group
from torch.distributed.pipelining import stage as pp_stage

out_dir, n_steps, programs = Path(sys.argv[1]), sys.argv[2], [Path(p) for p in sys.argv[3:]]
sys.path.insert(0, str(programs[0]))
from autopar_rt import runtime as rt  # noqa: E402  (the emitted programs' runtime: the same files in each)
from count_programs import run_programs  # noqa: E402  (tests/, this script's folder)

step: dict = {"order": [], "reduces": {}, "waits": {}}
inside: list[int] = []   # the stage whose REDUCE_GRAD is running


def _reduce_grad(fn):
    def wrapper(self, *args, **kwargs):
        step["order"].append(f"R{self.stage_index}")
        inside.append(self.stage_index)
        try:
            return fn(self, *args, **kwargs)
        finally:
            inside.pop()
    return wrapper


def _backward(fn):
    def wrapper(self, *args, **kwargs):
        step["order"].append(f"B{self.stage_index}")
        return fn(self, *args, **kwargs)
    return wrapper


def _reduce(fn):
    def wrapper(*args, **kwargs):
        key = str(inside[-1]) if inside else "outside"
        step["reduces"][key] = step["reduces"].get(key, 0) + 1
        return fn(*args, **kwargs)
    return wrapper


def _finalize(fn):
    def wrapper(self, *args, **kwargs):
        if inside and self.comm_ctx._last_post_reduce_events:
            key = str(inside[-1])
            step["waits"][key] = step["waits"].get(key, 0) + len(self.comm_ctx._last_post_reduce_events)
        return fn(self, *args, **kwargs)
    return wrapper


fsdp_group.foreach_reduce = _reduce(fsdp_group.foreach_reduce)
fsdp_group.FSDPParamGroup.finalize_backward = _finalize(fsdp_group.FSDPParamGroup.finalize_backward)
base = pp_stage._PipelineStageBase
base.perform_reduce_grad = _reduce_grad(base.perform_reduce_grad)
base.backward_one_chunk = _backward(base.backward_one_chunk)
base.backward_weight_one_chunk = _backward(base.backward_weight_one_chunk)


def _record() -> dict:
    out = {k: (list(v) if isinstance(v, list) else dict(v)) for k, v in step.items()}
    step.update(order=[], reduces={}, waits={})
    return out


run_programs(rt, programs, out_dir, n_steps, _record)
