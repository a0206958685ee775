"""Expert parallel: each ``ep`` rank keeps the experts the plan's placement names for it.

Token dispatch (per MoE layer, per microbatch), over the ``ep`` group of ``G`` ranks:

1. every (token, slot) routed to expert ``e`` goes to the rank holding ``e``; assignments
   are sorted by (rank, expert) so each rank's rows are contiguous;
2. counts are exchanged, then the rows and their expert ids with ``all_to_all_single``
   (uneven splits);
3. each rank runs its experts on what it received;
4. the outputs return with the reverse ``all_to_all_single`` and are weighted by the gate
   values and summed per token on the source rank (``layers.WeightedSum``), as the single-process
   ``GroupedExperts`` does.

The functional all-to-all is differentiable (its backward is the reverse exchange), and the
gate weights are applied at the source, so router gradients stay local. Routing is the
model's own ``TopKRouter`` on the same tokens, so it equals a single-process run.

With tensor parallel (tp > 1) and no sequence parallel the tokens entering an MoE layer are the
same on every tp rank: each tp rank dispatches its 1/tp share of them (``_SliceRows``; the backward
gathers the input gradients) and the expert outputs are all-gathered over tp (``_GatherRows``; the
backward keeps the rank's share), Megatron's scatter/gather pair. Under sequence parallel
(``techniques.moe_program.moe_tokens_local``) the layer takes the rank's sequence shard as it is:
the router routes it, the shard is dispatched and its output returned on the shard (no gather, no
slice; ``apply_tp`` marks the layer ``tokens_local``). The router's gate, replicated over tp, then
sees only the shard: its weight gradient is summed over tp in backward (``_TpSummedLinear``), as
Megatron-Core all-reduces the router's gradients over tp. Shared experts run beside it as the dense
MLP does under sp (their input all-gathered over tp, w1/w3 column-, w2 row-parallel, the output
reduce-scattered back to the shard: Megatron-Core's ``SharedExpertMLP``); Qwen2-MoE's shared gate
reads the shard, its weight gradient summed over tp like the router's. With expert tensor
parallel (etp > 1) the ``etp`` ranks of a group hold the same experts, their ffn dimension
split (w1/w3 column-wise, w2 row-wise, DTensor ``Shard`` over the ``etp`` mesh): the rows a
rank received are all-gathered over etp, each rank computes its partial outputs, and a
reduce-scatter returns each rank the sum for its own rows. The expert mesh (edp, ep, etp)
folds over a stage's dp*cp*tp ranks (``runtime_mesh``).

Replicated experts (an expert on two ranks of one group) are not supported yet: the
placement must list every expert exactly once per layer.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as fc
from torch import nn
from torch.distributed.tensor import DTensor, Shard, distribute_tensor

from autopar.codegen.runtime_mesh import ParallelMesh
from autopar.profiles.models.layers import GroupedExperts, WeightedSum, expert_counts, padded_layout, scatter_rows


def contiguous_placement(num_experts: int, ep: int) -> list[list[int]]:
    """Rank ``r`` holds experts ``[r E/ep, (r+1) E/ep)``: Megatron-Core's and torchtitan's layout, and
    the one the cost model prices a routing trace on when the plan names no placement
    (``cost_models.moe_load.contiguous``), so a trace's busiest rank is the program's."""
    per = num_experts // ep
    return [list(range(r * per, (r + 1) * per)) for r in range(ep)]


def apply_ep(model: nn.Module, mesh: ParallelMesh, placement: list[list[list[int]]] | None,
             first_moe_layer: int = 0) -> nn.Module:
    """Keep, on each rank, the experts ``placement[moe_layer][ep_rank]`` lists (global MoE
    layer index = ``first_moe_layer + moe_layer``; default: contiguous blocks of experts),
    their ffn dimension split over ``etp``."""
    ep = mesh.size("ep")
    if ep * mesh.size("etp") == 1:
        return model
    for name, block in model.layers.items():
        experts = getattr(block.feed_forward, "experts", None)
        if not isinstance(experts, GroupedExperts):
            continue
        num = experts.w1.shape[0]
        layer = placement[int(name) - first_moe_layer] if placement else contiguous_placement(num, ep)
        _keep_experts(experts, layer, mesh, getattr(block.feed_forward, "tokens_local", False))
    return model


def route_local_tokens(moe: nn.Module, tp_group) -> None:
    """The MoE layer takes this rank's sequence shard (module docstring): its router's gate weight
    gradient is summed over ``tp_group``, and Qwen2-MoE's shared-expert gate's (a replicated linear
    on the shard too); ``apply_ep`` then dispatches the shard as it is. The shared experts themselves
    are split by ``apply_tp``'s plan (a sequence-parallel MLP on the flattened shard)."""
    moe.tokens_local = True
    for gate in (moe.router.gate, getattr(moe, "shared_gate", None)):
        if gate is not None:
            gate.tp_group = tp_group
            gate.__class__ = _TpSummedLinear


class SumGradColumns(torch.autograd.Function):
    """Identity forward; backward all-reduces the gradient of columns ``[start:]`` over ``group`` (0: all of it:
    the MoE router's weight under shard dispatch; MLA's shared RoPE key columns, ``runtime_parallel``)."""

    @staticmethod
    def forward(ctx, x, start, group):
        ctx.start, ctx.group = start, group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone()
        part = grad[..., ctx.start:].contiguous()
        dist.all_reduce(part, group=ctx.group)
        grad[..., ctx.start:] = part
        return grad, None, None


class _TpSummedLinear(nn.Linear):
    """A linear replicated over the tp ranks, each applying it to its own tokens: the weight's
    gradient (each rank's share) is summed over tp once per backward, so every rank keeps the same
    weight (Megatron-Core's router under sequence parallel: its gradient all-reduced over tp)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x, SumGradColumns.apply(self.weight, 0, self.tp_group), self.bias)


def _keep_experts(experts: GroupedExperts, layer: list[list[int]], mesh: ParallelMesh, own_tokens: bool) -> None:
    """Slice the stacked weights to this rank's experts (still on the meta device), split their
    ffn dimension over etp, and swap in the dispatching forward (``own_tokens``: of the rank's shard,
    no split over tp)."""
    owner = torch.empty(experts.w1.shape[0], dtype=torch.long)
    for r, ids in enumerate(layer):
        owner[ids] = r
    ids = list(layer[mesh.rank("ep")])
    for pname, ffn_dim in (("w1", 2), ("w3", 2), ("w2", 1)):
        full = getattr(experts, pname)
        mine = torch.empty((len(ids),) + tuple(full.shape[1:]), dtype=full.dtype, device=full.device)
        if mesh.size("etp") > 1:
            mine = distribute_tensor(mine, mesh["etp"], [Shard(ffn_dim)])
        setattr(experts, pname, nn.Parameter(mine))
    experts.local_expert_ids = ids  # materialize takes these rows of each full initial tensor
    experts.expert_owner = owner
    local = torch.full((len(owner),), -1, dtype=torch.long)  # global expert id -> index among this rank's
    local[ids] = torch.arange(len(ids))
    experts.local_index = local
    experts.ep_group, experts.ep_size = mesh.group("ep"), len(layer)
    experts.etp_group = mesh.group("etp") if mesh.size("etp") > 1 else None
    experts.tp_group = mesh.group("tp") if mesh.size("tp") > 1 and not own_tokens else None
    experts.register_buffer("expert_ids", torch.tensor(ids, device=experts.w1.device), persistent=False)
    experts.__class__ = ExpertParallelGroupedExperts


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


def _all_gather_rows(t: torch.Tensor, group, sizes: list[int]) -> torch.Tensor:
    """Concatenate every rank's rows (``sizes[r]`` rows on rank r; padded for the collective)."""
    pad = t.new_zeros((max(sizes),) + tuple(t.shape[1:]))
    pad[: t.shape[0]] = t
    out = [torch.empty_like(pad) for _ in sizes]
    dist.all_gather(out, pad, group=group)
    return torch.cat([o[:n] for o, n in zip(out, sizes)])


def _own_rows(t: torch.Tensor, group, sizes: list[int]) -> torch.Tensor:
    start = sum(sizes[: dist.get_rank(group)])
    return t[start: start + sizes[dist.get_rank(group)]]


class _GatherRows(torch.autograd.Function):
    """Forward: all ranks' rows. Backward: this rank's rows of the gradient, summed over the
    group first when every rank used all rows with its own weight shard (``reduce_grad``)."""

    @staticmethod
    def forward(ctx, t, group, sizes, reduce_grad):
        ctx.group, ctx.sizes, ctx.reduce_grad = group, sizes, reduce_grad
        return _all_gather_rows(t, group, sizes)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        if ctx.reduce_grad:
            dist.all_reduce(grad, group=ctx.group)
        return _own_rows(grad, ctx.group, ctx.sizes).contiguous(), None, None, None


class _SliceRows(torch.autograd.Function):
    """Forward: this rank's rows (of the sum over the group with ``reduce_fwd``: the partial
    outputs of a row-split w2). Backward: every rank's row gradients gathered."""

    @staticmethod
    def forward(ctx, t, group, sizes, reduce_fwd):
        ctx.group, ctx.sizes = group, sizes
        if reduce_fwd:
            t = t.clone()
            dist.all_reduce(t, group=group)
        return _own_rows(t, group, sizes).clone()

    @staticmethod
    def backward(ctx, grad):
        return _all_gather_rows(grad.contiguous(), ctx.group, ctx.sizes), None, None, None


def _group_sizes(n: int, group, device) -> list[int]:
    """Row counts of every rank of ``group`` (exchanged: they differ after routing)."""
    mine = torch.tensor([n], dtype=torch.long, device=device)
    out = [torch.zeros_like(mine) for _ in range(dist.get_world_size(group))]
    dist.all_gather(out, mine, group=group)
    return [int(x) for x in out]


class ExpertParallelGroupedExperts(GroupedExperts):
    """``GroupedExperts`` holding a subset of experts, with all-to-all token dispatch."""

    def forward(self, x: torch.Tensor, idx: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        if self.tp_group is None:
            return self._dispatch(x, idx, weight)
        tp = dist.get_world_size(self.tp_group)
        sizes = [len(c) for c in torch.arange(x.shape[0]).tensor_split(tp)]
        x_s = _SliceRows.apply(x, self.tp_group, sizes, False)
        w_s = _SliceRows.apply(weight, self.tp_group, sizes, False)
        y = self._dispatch(x_s, _own_rows(idx, self.tp_group, sizes), w_s)
        return _GatherRows.apply(y, self.tp_group, sizes, False)

    def _dispatch(self, x: torch.Tensor, idx: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        T, k = idx.shape
        dest = _on_device(self, "expert_owner", idx.device)[idx.reshape(-1)]  # [T*k] rank per assignment
        order = torch.argsort(dest * len(self.expert_owner) + idx.reshape(-1), stable=True)
        token, slot = order // k, order % k
        send = expert_counts(dest, self.ep_size)
        recv = torch.empty_like(send)
        dist.all_to_all_single(recv, send, group=self.ep_group)
        send_l, recv_l = send.tolist(), recv.tolist()
        rows = fc.all_to_all_single(x[token], recv_l, send_l, self.ep_group)
        eids = fc.all_to_all_single(idx.reshape(-1)[order], recv_l, send_l, self.ep_group)
        out_rows = self._run_etp(rows, eids)
        back = fc.all_to_all_single(out_rows, send_l, recv_l, self.ep_group)
        return WeightedSum.apply(back, weight[token, slot], token, x)

    def _run_etp(self, rows: torch.Tensor, eids: torch.Tensor) -> torch.Tensor:
        """The experts on the received rows; under etp on the rows of the whole etp group, each
        rank's ffn shard giving partial outputs, summed and returned per rank (reduce-scatter)."""
        if self.etp_group is None:
            return self._run_local(rows, eids)
        sizes = _group_sizes(rows.shape[0], self.etp_group, rows.device)
        all_rows = _GatherRows.apply(rows, self.etp_group, sizes, True)
        all_eids = _all_gather_rows(eids, self.etp_group, sizes)
        return _SliceRows.apply(self._run_local(all_rows, all_eids), self.etp_group, sizes, True)

    def expert_weights(self) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """(w1, w3, w2) of each local expert on this rank's ffn shard (under etp the DTensors' local tensors)."""
        w1, w3, w2 = _local(self.w1), _local(self.w3), _local(self.w2)
        return list(zip(w1.unbind(0), w3.unbind(0), w2.unbind(0)))

    def _run_local(self, rows: torch.Tensor, eids: torch.Tensor) -> torch.Tensor:
        """Each received row through its expert: the rows sorted by local expert once, their counts read
        with one host sync (``GroupedExperts.run_sorted``), the outputs put back in the received order.
        An expert with no rows still runs on an empty batch: its gradient is then zeros, not None, so
        every rank of an FSDP group reduces the same set of gradients."""
        if not self.local_expert_ids:  # this rank holds no expert of the layer
            return rows * 0
        local = _on_device(self, "local_index", eids.device)[eids]
        order = torch.argsort(local, stable=True)
        dev_counts = expert_counts(local, len(self.local_expert_ids))
        counts = dev_counts.tolist()
        bucket = self.row_bucket.get(rows.device.type, 1)
        if bucket == 1:
            out = self.run_sorted(rows.index_select(0, order), counts)
        else:  # each expert's rows padded (GroupedExperts.row_bucket); the pad rows' outputs dropped
            pos, padded = padded_layout(local.index_select(0, order), dev_counts, counts, bucket)
            out = self.run_sorted(rows.index_select(0, scatter_rows(pos, order, sum(padded))), padded)
            out = out.index_select(0, pos)
        # back to the received order by a gather with the inverse permutation: index_copy's backward keeps its
        # source (all the etp group's rows x hidden, for its shape alone); index_select's keeps the index only
        inverse = torch.empty_like(order).index_copy_(0, order, torch.arange(len(order), device=order.device))
        return out.index_select(0, inverse)


def _on_device(experts: nn.Module, name: str, device: torch.device) -> torch.Tensor:
    """A host-side index table of ``experts`` on ``device``, copied once (a host-to-device copy of
    pageable memory blocks the host until the stream is idle)."""
    cache = experts.__dict__.setdefault("_device_tables", {})
    key = (name, str(device))
    if key not in cache:
        cache[key] = getattr(experts, name).to(device)
    return cache[key]
