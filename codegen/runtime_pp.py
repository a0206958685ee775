"""Pipeline parallel with ``torch.distributed.pipelining``.

``split_stages`` runs first (on the meta device): each pipeline rank keeps a copy of the
model per virtual stage it runs, with the blocks outside the stage's layer range deleted
(``layers`` is a ``ModuleDict`` keyed by global index, so names and checkpoint keys stay
those of the full model) and ``tok_embeddings``/``norm``/``output`` set to ``None`` where
the stage does not hold them. The other techniques then apply to each part, and
``apply_pp`` wraps the materialized parts in ``PipelineStage`` objects and builds the
schedule: GPipe, 1F1B, interleaved 1F1B or looped zero bubble (virtual stage ``i`` on rank
``i % pp``), or the V-shaped ZBV / DualPipeV (rank ``r`` runs stages ``r`` and ``2pp-1-r``). The
placement comes in as data (``STAGE_RANKS`` in train.py, written by emit from
``techniques.pipeline.stage_rank``, the rule the cost model prices), not re-derived here.

Tied embeddings across the two ends of the pipeline get one more gradient all-reduce
(``sync_grads``) between the ranks holding the first and last stage, as Megatron-LM does.
"""

from __future__ import annotations

import copy

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from autopar.codegen.runtime_mesh import ParallelMesh


def split_stages(model: nn.Module, mesh: ParallelMesh, stages: list[tuple[int, int]],
                 ranks: list[int] | None = None) -> tuple[list, list]:
    """This rank's model parts and their virtual stage indices: stage ``i`` (``stages[i] =
    (layer_start, layer_end)``) runs on pp rank ``ranks[i]`` (default ``i % pp``, looped)."""
    pp, rank = mesh.size("pp"), mesh.rank("pp")
    ranks = ranks or [i % pp for i in range(len(stages))]
    mine = [i for i in range(len(stages)) if ranks[i] == rank]
    parts = []
    for n, i in enumerate(mine):
        part = model if n == len(mine) - 1 else copy.deepcopy(model)  # meta tensors: copies are free
        start, end = stages[i]
        for name in list(part.layers.keys()):
            if not start <= int(name) < end:
                del part.layers[name]
        if i != 0:
            part.tok_embeddings = part.pos_embeddings = None
        if i != len(stages) - 1:
            part.norm = part.output = None
        parts.append(part)
    if pp > 1 and model.spec.tie_embeddings:
        _tie_across_stages(parts, mine, mesh, len(stages), ranks[-1])
    return parts, mine


def _tie_across_stages(parts: list, mine: list[int], mesh: ParallelMesh, n_virtual: int, last: int) -> None:
    """One process group per (dp, cp, tp) coordinate joining the first and the last pipeline
    rank; ``sync_grads`` sums the tied weight's gradient over it."""
    grid = mesh.world.mesh  # [pp, dp, cp, tp] -> global rank
    first = 0   # last: the rank of the output stage (V schedules put it on rank 0: an emit rule refuses ties)
    pairs = [[int(grid[first, d, c, t]), int(grid[last, d, c, t])]
             for d in range(grid.shape[1]) for c in range(grid.shape[2]) for t in range(grid.shape[3])]
    group, _ = dist.new_subgroups_by_enumeration(pairs)  # every rank creates every group
    for part, i in zip(parts, mine):
        if i == 0:
            part.tied_grad_groups = [("tok_embeddings.weight", group)]
        elif i == n_virtual - 1:
            part.tied_grad_groups = [("output.weight", group)]


def even_stages(layers: int, n: int) -> list[tuple[int, int]]:
    """The partition the cost model prices (``cost_models.estimate.even_stages``), imported
    when called: the run directory's runtime ships without the cost model."""
    from autopar.cost_models.estimate import even_stages as split

    return split(layers, n)


def lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy (fp32) over the tokens given."""
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())


def apply_pp(parts: list[nn.Module], stage_ids: list[int], n_stages: int, mesh: ParallelMesh,
             schedule: str, n_microbatches: int, device: torch.device, loss_fn=lm_loss):
    """``PipelineStage`` per part (shapes inferred from the first microbatch) and the schedule.

    The loss is the mean over a microbatch; the schedule divides gradients by the number of
    microbatches (``scale_grads``), so they are those of the mean over the rank's batch."""
    from torch.distributed.pipelining import PipelineStage
    from torch.distributed.pipelining import schedules as S

    group = mesh.group("pp")
    stages = [PipelineStage(part, i, n_stages, device, group=group) for part, i in zip(parts, stage_ids)]
    multi = {"interleaved": S.ScheduleInterleaved1F1B, "zb_interleaved": S.ScheduleInterleavedZeroBubble,
             "zbv": S.ScheduleZBVZeroBubble, "dualpipev": S.ScheduleDualPipeV}
    if schedule in multi:  # several stages per rank; the zero-bubble ones split backward into B and W
        return multi[schedule](stages, n_microbatches, loss_fn=loss_fn)
    cls = S.ScheduleGPipe if schedule == "gpipe" else S.Schedule1F1B
    return cls(stages[0], n_microbatches, loss_fn=loss_fn)


def pp_step(schedule, stage_ids: list[int], n_stages: int, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """One pipelined forward/backward over the rank's batch; returns the sum of token losses
    on the rank holding the last stage (0 elsewhere), like ``train_step``."""
    losses: list = []
    kwargs = {"target": targets, "losses": losses} if n_stages - 1 in stage_ids else {}
    # return_outputs=False: the last stage would otherwise keep every microbatch's logits
    if 0 in stage_ids:
        schedule.step(inputs, return_outputs=False, **kwargs)
    else:
        schedule.step(return_outputs=False, **kwargs)
    per_micro = targets.numel() / max(len(losses), 1)  # microbatches are equal slices
    if not losses:
        return torch.zeros((), dtype=torch.float64, device=targets.device)
    return torch.stack([loss.detach().double() for loss in losses]).sum() * per_micro  # no host sync
