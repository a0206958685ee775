"""Process group start-up and the device mesh of a plan.

Rank order (``autopar.core.strategy``): tp innermost, then cp, then dp, pp outermost,
so ``rank = ((pp_i * dp + dp_i) * cp + cp_i) * tp + tp_i``. Tensor parallel groups are
neighbours (one node, fastest links) and pipeline stages the farthest apart.

The expert mapping (MoE Parallel Folding, Liu et al. 2025; ``autopar.core.strategy``) folds
``ep`` and ``etp`` over the same ranks: the ``dp * cp * tp`` ranks of a pipeline stage,
flattened with tp innermost, split into ``edp`` (outer) x ``ep`` x ``etp`` (innermost). An
expert-parallel group is ``ep`` ranks ``etp`` apart, an expert-tensor-parallel group ``etp``
consecutive ranks sharing one set of experts (their ffn dimension split), and each expert
shard is replicated on ``edp = dp * cp * tp / (ep * etp)`` ranks.
"""

from __future__ import annotations

import datetime
import os
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

DIMS = ("pp", "dp", "cp", "tp")
EXPERT_DIMS = ("edp", "ep", "etp")
_OWN_GROUP = False


@dataclass
class ParallelMesh:
    """The world mesh ``(pp, dp, cp, tp)`` plus the derived meshes the apply_* functions use.

    Flattened and unflattened meshes are kept here: slicing a flattened dim from the root
    mesh is deprecated in torch, which asks callers to keep them."""

    world: DeviceMesh
    dp_cp: DeviceMesh                 # gradient averaging group: data and context parallel ranks
    ep_mesh: DeviceMesh | None = None  # (edp, ep, etp) over a stage's dp*cp*tp ranks, when ep*etp > 1

    def size(self, dim: str) -> int:
        if dim in DIMS:
            return self.world.size(DIMS.index(dim))
        if dim == "dp_cp":
            return self.dp_cp.size()
        if dim in EXPERT_DIMS:
            return self.ep_mesh.size(EXPERT_DIMS.index(dim)) if self.ep_mesh is not None else 1
        raise KeyError(dim)

    def rank(self, dim: str) -> int:
        if dim in DIMS:
            return self.world.get_local_rank(dim)
        if dim == "dp_cp":
            return self.dp_cp.get_local_rank()
        if dim in EXPERT_DIMS:
            return self.ep_mesh.get_local_rank(dim) if self.ep_mesh is not None else 0
        raise KeyError(dim)

    def group(self, dim: str) -> dist.ProcessGroup:
        if dim in DIMS:
            return self.world.get_group(dim)
        if dim == "dp_cp":
            return self.dp_cp.get_group()
        return self.ep_mesh.get_group(dim)

    def __getitem__(self, dim: str) -> DeviceMesh:
        if dim in DIMS:
            return self.world[dim]
        if dim == "dp_cp":
            return self.dp_cp
        return self.ep_mesh[dim]


def init_distributed(device_type: str, timeout_s: float = 600.0) -> torch.device:
    """Join the job started by torchrun (or make a one-rank group for ``python train.py``).

    ``timeout`` is always set: a collective reached by only some ranks then fails with an
    error instead of hanging for the default half hour."""
    global _OWN_GROUP
    if dist.is_initialized():  # a harness running several programs in one job
        return _device(device_type, int(os.environ.get("LOCAL_RANK", "0")))
    if "RANK" not in os.environ:  # plain `python train.py`: a world of one
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    device = _device(device_type, int(os.environ.get("LOCAL_RANK", "0")))
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    _OWN_GROUP = True
    return device


def _device(device_type: str, local_rank: int) -> torch.device:
    if device_type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        return device
    return torch.device("cpu")


def shutdown() -> None:
    """Destroy the process group ``init_distributed`` created (not one it found)."""
    global _OWN_GROUP
    if _OWN_GROUP and dist.is_initialized():
        dist.destroy_process_group()
    _OWN_GROUP = False


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def build_mesh(device_type: str, pp: int = 1, dp: int = 1, cp: int = 1, tp: int = 1, ep: int = 1,
               etp: int = 1) -> ParallelMesh:
    """The ``(pp, dp, cp, tp)`` mesh (documented rank order) and its ``dp_cp`` / ``(edp, ep, etp)`` views."""
    world = dist.get_world_size()
    if pp * dp * cp * tp != world:
        raise RuntimeError(f"plan needs pp*dp*cp*tp = {pp}*{dp}*{cp}*{tp} = {pp * dp * cp * tp} ranks, "
                           f"but this job has {world}; launch with the commands in the docstring")
    mesh = init_device_mesh(device_type, (pp, dp, cp, tp), mesh_dim_names=DIMS)
    dp_cp = mesh["dp", "cp"]._flatten("dp_cp")
    ep_mesh = None
    if ep * etp > 1:
        stage = dp * cp * tp
        if stage % (ep * etp):
            raise RuntimeError(f"ep*etp={ep * etp} must divide dp*cp*tp={stage}")
        ep_mesh = mesh["dp", "cp", "tp"]._flatten("stage")._unflatten(0, (stage // (ep * etp), ep, etp), EXPERT_DIMS)
    return ParallelMesh(world=mesh, dp_cp=dp_cp, ep_mesh=ep_mesh)
