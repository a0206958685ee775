"""Run emitted ZeRO-1 (``ShardedAdamW``) ``train.py`` programs with their step's events in order (a torchrun entry
for tests/test_zero1_sync.py): ``torchrun ... zero1_sync_count.py OUT_DIR STEPS PROGRAM_DIR...``, the programs one
after another in the same processes. Writes ``OUT_DIR/<program>.rank<r>.json``: per step (recorded after
``optimizer_step``) the events of the step in order: ``bwd`` (a backward pass returned: a micro-batch's, or a
pipeline stage's), ``rs`` / ``ag`` / ``bc`` (a reduce-scatter / all-gather / broadcast was issued), ``rs_in_bwd`` /
``ag_in_bwd`` / ``bc_in_bwd`` (issued while autograd ran a backward), ``blk`` (a transformer block's forward
began), ``land`` (a ZeRO-1 span's all-gather was waited and copied into its parameters); under a pipeline also
``b<i>`` / ``w<i>`` ... ``b<i>.`` / ``w<i>.``: stage ``i``'s backward (input, or full) / weight-gradient pass of one
micro-batch began ... ended (``backward_one_chunk`` / ``backward_weight_one_chunk``). ZeRO-1's buckets are cut
at 16 KiB here, so the tiny models reduce and gather in several spans."""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.pipelining.stage import _PipelineStageBase

out_dir, n_steps, programs = Path(sys.argv[1]), sys.argv[2], [Path(p) for p in sys.argv[3:]]
sys.path.insert(0, str(programs[0]))
from autopar_rt import runtime as rt  # noqa: E402  (the emitted programs' runtime: the same files in each)
from autopar_rt import runtime_zero1  # noqa: E402
from count_programs import run_programs  # noqa: E402  (tests/, this script's folder)

events: list[str] = []


def _in_backward() -> bool:
    return torch._C._current_graph_task_id() != -1


def _collective(fn, name: str):
    def wrapper(*args, **kwargs):
        events.append(f"{name}_in_bwd" if _in_backward() else name)
        return fn(*args, **kwargs)
    return wrapper


def _backward(fn):
    def wrapper(*args, **kwargs):
        out = fn(*args, **kwargs)
        events.append("bwd")
        return out
    return wrapper


def _landing(fn):
    def wrapper(self, spans):
        spans = list(spans)
        events.extend("land" for sp in spans if sp.gathering is not None)
        return fn(self, spans)
    return wrapper


def _block(module, args) -> None:
    if type(module).__name__ == "Block":
        events.append("blk")


def _stage_pass(fn, tag: str):
    def wrapper(self, *args, **kwargs):
        events.append(f"{tag}{self.stage_index}")
        out = fn(self, *args, **kwargs)
        events.append(f"{tag}{self.stage_index}.")
        return out
    return wrapper


def _unrecorded(fn):
    """``rt.wait_params`` after the last step: its landings belong to no step (nor to the next program's first)."""
    def wrapper(*args, **kwargs):
        n = len(events)
        out = fn(*args, **kwargs)
        del events[n:]
        return out
    return wrapper


runtime_zero1.ZERO1_BUCKET_BYTES = 16 * 2**10
_PipelineStageBase.backward_one_chunk = _stage_pass(_PipelineStageBase.backward_one_chunk, "b")
_PipelineStageBase.backward_weight_one_chunk = _stage_pass(_PipelineStageBase.backward_weight_one_chunk, "w")
rt.wait_params = _unrecorded(rt.wait_params)
runtime_zero1.Bucket._land_all = _landing(runtime_zero1.Bucket._land_all)
torch.nn.modules.module.register_module_forward_pre_hook(_block)
dist.reduce_scatter_tensor = _collective(dist.reduce_scatter_tensor, "rs")
dist.all_gather_into_tensor = _collective(dist.all_gather_into_tensor, "ag")
dist.broadcast = _collective(dist.broadcast, "bc")
torch.autograd.backward = _backward(torch.autograd.backward)


def _record() -> dict:
    step = {"events": list(events)}
    events.clear()
    return step


run_programs(rt, programs, out_dir, n_steps, _record, at="optimizer_step")
