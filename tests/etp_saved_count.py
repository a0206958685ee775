"""Saved-for-backward bytes of one expert layer of autopar's expert-parallel program on each rank (a torchrun entry
for tests/test_etp_memory.py): ``torchrun --nproc-per-node 2 etp_saved_count.py OUT_JSON HIDDEN FFN EXPERTS TOPK
TOKENS``. Two mappings of the 2 gloo ranks (data parallel 2 folded into the expert mesh): ep 2 (each rank holds half
the experts) and etp 2 (each rank holds every expert's half ffn width). Each rank routes its own ``TOKENS`` tokens;
the bytes are counted by ``torch.autograd.graph.saved_tensors_hooks`` once per storage, parameters left out, and
summed over the ranks (the rows each rank receives under ep depend on the routing, their sum does not)."""

from __future__ import annotations

import json
import sys

import torch
import torch.distributed as dist

from autopar.codegen import runtime_moe
from autopar.codegen.runtime_mesh import build_mesh
from autopar.profiles.models.layers import GroupedExperts


def _saved_bytes(layer: GroupedExperts, x, idx, weight) -> int:
    params = {runtime_moe._local(p).untyped_storage().data_ptr() for p in layer.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        st = getattr(t, "elem", t).untyped_storage()  # a functional collective's result wraps its tensor
        if st.data_ptr() not in params:
            seen[st.data_ptr()] = max(seen.get(st.data_ptr(), 0), st.nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = layer(x, idx, weight)
    y.sum().backward()
    return sum(seen.values())


def _layer(hidden: int, ffn: int, experts: int, ep: int, etp: int) -> GroupedExperts:
    layer = GroupedExperts(hidden, ffn, experts)
    mesh = build_mesh("cpu", dp=2, ep=ep, etp=etp)
    runtime_moe._keep_experts(layer, runtime_moe.contiguous_placement(experts, ep), mesh, False)
    for p in layer.parameters():
        with torch.no_grad():
            runtime_moe._local(p).normal_()
    return layer


def main() -> None:
    out, hidden, ffn, experts, topk, tokens = sys.argv[1], *map(int, sys.argv[2:])
    dist.init_process_group("gloo")
    gen = torch.Generator().manual_seed(dist.get_rank())
    x = torch.randn(tokens, hidden, generator=gen, requires_grad=True)
    idx = torch.stack([torch.randperm(experts, generator=gen)[:topk] for _ in range(tokens)])
    weight = torch.rand(tokens, topk, generator=gen, requires_grad=True)
    got = {}
    for name, ep, etp in (("ep2", 2, 1), ("etp2", 1, 2)):
        total = torch.tensor([_saved_bytes(_layer(hidden, ffn, experts, ep, etp), x, idx, weight)], dtype=torch.float64)
        dist.all_reduce(total)
        got[name] = float(total)
    if dist.get_rank() == 0:
        with open(out, "w") as f:
            json.dump(got, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
