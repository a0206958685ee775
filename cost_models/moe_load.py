"""Expert load and all-to-all volume from a routing trace and an expert placement.

Uniform top-k routing (the default) gives every expert-parallel rank the same load and
sends a fraction ``(ep - 1)/ep`` of the routed tokens off-rank. A routing trace
(``profiles.routing``) replaces both with measured figures:

- straggler ratio: per MoE layer, the most loaded rank's token copies over the mean,
  averaged over layers (the all-to-all and the expert GEMMs wait for the straggler);
- cross fraction: of the tokens passing from layer ``l`` to ``l+1``, the share whose
  experts sit on different ranks (ExFlow, Yao et al. 2024: tokens that stay on a rank
  skip the dispatch).

The placement (``autopar experts --out placement.json``; ``assignment[l][r]`` = expert
ids on rank r) fixes ``ep``; with a trace alone, experts are placed in contiguous
blocks of ``E/ep`` per rank, as Megatron-Core does.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np

from autopar.errors import InputError
from autopar.profiles.routing import RoutingTrace

LoadFn = Callable[[int], tuple[float, float]]


def uniform(ep: int) -> tuple[float, float]:
    """Uniform routing: balanced ranks, (ep-1)/ep of the routed tokens leave the rank."""
    return 1.0, (ep - 1) / ep if ep > 1 else 0.0


def rank_of(assignment: list[list[list[int]]], num_experts: int) -> np.ndarray:
    """[L, E] -> the first rank holding each expert (replicas share the load evenly)."""
    L = len(assignment)
    out = np.full((L, num_experts), -1, dtype=np.int64)
    for l, ranks in enumerate(assignment):
        for r, ids in enumerate(ranks):
            for e in ids:
                if out[l, e] < 0:
                    out[l, e] = r
    return out


def contiguous(num_layers: int, num_experts: int, ep: int) -> np.ndarray:
    return np.tile(np.arange(num_experts) // (num_experts // ep), (num_layers, 1))


def stats(trace: RoutingTrace, ranks: np.ndarray, ep: int) -> tuple[float, float]:
    """(mean over layers of max/mean rank load, cross-rank fraction of layer transitions)."""
    load = trace.load_array
    ratios = []
    for l in range(trace.num_layers):
        per_rank = np.bincount(ranks[l], weights=load[l], minlength=ep)
        mean = per_rank.mean()
        ratios.append(per_rank.max() / mean if mean > 0 else 1.0)
    trans = trace.transitions_array
    total = cross = 0.0
    for l in range(trans.shape[0]):
        same = ranks[l][:, None] == ranks[l + 1][None, :]
        total += trans[l].sum()
        cross += trans[l][~same].sum()
    frac = cross / total if total > 0 else uniform(ep)[1]
    return float(np.mean(ratios)), float(frac)


def load_ratio_from_files(placement: str | None, trace: str | None) -> LoadFn:
    """A function ep -> (straggler ratio, cross fraction) for the cost model."""
    if trace is None:
        raise InputError("--placement needs --trace TRACE too: the placement says where experts sit, "
                         "the trace how many tokens each one gets")
    tr = RoutingTrace.load_file(trace)
    if placement is None:
        def by_ep(ep: int) -> tuple[float, float]:
            if ep <= 1 or tr.num_experts % ep:
                return uniform(ep)
            return stats(tr, contiguous(tr.num_layers, tr.num_experts, ep), ep)
        return by_ep
    data = _read_placement(Path(placement))
    if data["num_experts"] != tr.num_experts or len(data["assignment"]) != tr.num_layers:
        raise InputError(f"--placement: {placement} is for {len(data['assignment'])} layers x "
                         f"{data['num_experts']} experts, the trace has {tr.num_layers} x {tr.num_experts}")
    fixed_ep = data["ep"]
    ranks = rank_of(data["assignment"], tr.num_experts)
    fixed = stats(tr, ranks, fixed_ep)

    def by_placement(ep: int) -> tuple[float, float]:
        if ep == fixed_ep:
            return fixed
        # another ep (the search tries several): the trace with Megatron's contiguous blocks
        if ep <= 1 or tr.num_experts % ep:
            return uniform(ep)
        return stats(tr, contiguous(tr.num_layers, tr.num_experts, ep), ep)

    return by_placement


def _read_placement(path: Path) -> dict:
    if not path.is_file():
        raise InputError(f"--placement: {path} does not exist; write one with `autopar experts TRACE --ep N --out`")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(f"--placement: {path} is not valid JSON ({exc})") from None
    for key in ("ep", "num_experts", "assignment"):
        if key not in data:
            raise InputError(f"--placement: {path} has no field '{key}'")
    return data
