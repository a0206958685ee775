"""Expert parallel: each ``ep`` rank keeps the experts the plan's placement names for it.

Token dispatch (per MoE layer, per microbatch), over the ``ep`` group of ``G`` ranks:

1. every (token, slot) routed to expert ``e`` goes to the rank holding ``e``; assignments
   are sorted by (rank, expert) so each rank's rows are contiguous;
2. counts are exchanged, then the rows and their expert ids with ``all_to_all_single``
   (uneven splits);
3. each rank runs its experts on what it received;
4. the outputs return with the reverse ``all_to_all_single`` and are weighted by the gate
   values and summed per token on the source rank (``index_add``), as the single-process
   ``GroupedExperts`` does.

The functional all-to-all is differentiable (its backward is the reverse exchange), and the
gate weights are applied at the source, so router gradients stay local. Routing is the
model's own ``TopKRouter`` on the same tokens, so it equals a single-process run.

Replicated experts (an expert on two ranks of one group) are not supported yet: the
placement must list every expert exactly once per layer.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as fc
from torch import nn

from autopar.codegen.runtime_mesh import ParallelMesh
from autopar.profiles.models.layers import GroupedExperts


def round_robin_placement(num_experts: int, ep: int) -> list[list[int]]:
    return [[e for e in range(num_experts) if e % ep == r] for r in range(ep)]


def apply_ep(model: nn.Module, mesh: ParallelMesh, placement: list[list[list[int]]] | None,
             first_moe_layer: int = 0) -> nn.Module:
    """Keep, on each rank, the experts ``placement[moe_layer][ep_rank]`` lists (global MoE
    layer index = ``first_moe_layer + moe_layer``); default: expert ``e`` on rank ``e % ep``."""
    ep = mesh.size("ep")
    if ep == 1:
        return model
    rank, group = mesh.rank("ep"), mesh.group("ep")
    for name, block in model.layers.items():
        experts = getattr(block.feed_forward, "experts", None)
        if not isinstance(experts, GroupedExperts):
            continue
        num = experts.w1.shape[0]
        layer = placement[int(name) - first_moe_layer] if placement else round_robin_placement(num, ep)
        _keep_experts(experts, layer, rank, group)
    return model


def _keep_experts(experts: GroupedExperts, layer: list[list[int]], rank: int, group) -> None:
    """Slice the stacked weights to this rank's experts (still on the meta device) and swap
    in the dispatching forward."""
    owner = torch.empty(experts.w1.shape[0], dtype=torch.long)
    for r, ids in enumerate(layer):
        owner[ids] = r
    ids = list(layer[rank])
    for pname in ("w1", "w3", "w2"):
        full = getattr(experts, pname)
        setattr(experts, pname, nn.Parameter(torch.empty((len(ids),) + tuple(full.shape[1:]),
                                                         dtype=full.dtype, device=full.device)))
    experts.local_expert_ids = ids  # materialize takes these rows of each full initial tensor
    experts.expert_owner = owner
    experts.ep_group = group
    experts.ep_size = len(layer)
    experts.register_buffer("expert_ids", torch.tensor(ids, device=experts.w1.device), persistent=False)
    experts.__class__ = ExpertParallelGroupedExperts


class ExpertParallelGroupedExperts(GroupedExperts):
    """``GroupedExperts`` holding a subset of experts, with all-to-all token dispatch."""

    def forward(self, x: torch.Tensor, idx: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        T, k = idx.shape
        dest = self.expert_owner.to(idx.device)[idx.reshape(-1)]            # [T*k] rank per assignment
        order = torch.argsort(dest * len(self.expert_owner) + idx.reshape(-1), stable=True)
        token, slot = order // k, order % k
        send = torch.bincount(dest, minlength=self.ep_size)
        recv = torch.empty_like(send)
        dist.all_to_all_single(recv, send, group=self.ep_group)
        send_l, recv_l = send.tolist(), recv.tolist()
        rows = fc.all_to_all_single(x[token], recv_l, send_l, self.ep_group)
        eids = fc.all_to_all_single(idx.reshape(-1)[order], recv_l, send_l, self.ep_group)
        out_rows = self._run_local(rows, eids)
        back = fc.all_to_all_single(out_rows, send_l, recv_l, self.ep_group)
        y = back * weight[token, slot].unsqueeze(-1)
        return torch.zeros_like(x).index_add(0, token, y)

    def _run_local(self, rows: torch.Tensor, eids: torch.Tensor) -> torch.Tensor:
        """Each received row through its expert (rows of one expert are batched). An expert
        with no rows still runs on an empty batch: its gradient is then zeros, not None, so
        every rank of an FSDP group reduces the same set of gradients."""
        outs, where = [], []
        for local, gid in enumerate(self.local_expert_ids):
            sel = torch.nonzero(eids == gid).squeeze(-1)
            outs.append(self.expert_forward(local, rows[sel]))
            where.append(sel)
        if not outs:  # this rank holds no expert of the layer
            return rows * 0
        perm = torch.cat(where)
        return torch.zeros_like(rows).index_copy(0, perm, torch.cat(outs))
