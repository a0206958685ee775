"""Where the ranks of a process group sit on the cluster.

Global rank r lives on node ``r // gpus_per_node``. The generated programs order ranks
with tp innermost, then cp, then dp, then pp outermost (expert mapping: etp, ep, edp), so
a group is fully described by its size and the stride between consecutive members:
``ranks = first_rank + i * stride``. By default the group is the one holding rank 0
(``first_rank=0``): with a stride below ``gpus_per_node`` it covers consecutive nodes from
node 0, with a larger stride every (stride/gpus_per_node)-th node. Pass ``first_rank`` to
price a specific group, or use ``all_group_firsts`` to examine each group in turn.
"""

from __future__ import annotations

from collections import Counter
from typing import NamedTuple

from autopar.core.cluster import ClusterSpec
from autopar.errors import InputError


class GroupPlacement(NamedTuple):
    """A process group: ``size`` members, ``stride`` apart in the global rank order."""

    size: int
    stride: int = 1
    first_rank: int = 0


def group_ranks(size: int, stride: int, first_rank: int = 0) -> list[int]:
    return [first_rank + i * stride for i in range(size)]


def group_nodes(cluster: ClusterSpec, size: int, stride: int, first_rank: int = 0) -> list[int]:
    """Node id of each member; InputError if the group runs past the cluster."""
    if size < 1 or stride < 1 or first_rank < 0:
        raise InputError(f"group: size={size}, stride={stride}, first_rank={first_rank} must be positive")
    last = first_rank + (size - 1) * stride
    if last >= cluster.world:
        raise InputError(f"group: size {size} x stride {stride} from rank {first_rank} needs {last + 1} ranks "
                         f"but the cluster has {cluster.world} ({cluster.short()}); use fewer/smaller groups")
    return [r // cluster.gpus_per_node for r in group_ranks(size, stride, first_rank)]


def group_span(cluster: ClusterSpec, size: int, stride: int, first_rank: int = 0) -> tuple[int, int]:
    """``(ranks_per_node, nodes_spanned)``; ranks_per_node is the largest count on one node."""
    counts = Counter(group_nodes(cluster, size, stride, first_rank))
    return max(counts.values()), len(counts)


def node_pair_bw(cluster: ClusterSpec, nodes: list[int]) -> tuple[float, tuple[int, int] | None]:
    """Per-GPU inter-node bandwidth (GB/s) of a group spanning ``nodes``, and the slowest pair.

    Without a matrix this is the cluster's ``inter_node.bw_gbps`` (pair None). With
    ``node_pair_bw_gbps`` the slowest pair among the spanned nodes bounds the group (a ring
    or tree moves data across every pair's path), taking the slower direction of each pair.
    """
    m = cluster.node_pair_bw_gbps
    uniq = sorted(set(nodes))
    if m is None or len(uniq) < 2:
        return cluster.inter_node.bw_gbps, None
    pairs = [(a, b) for i, a in enumerate(uniq) for b in uniq[i + 1:]]
    slowest = min(pairs, key=lambda p: min(m[p[0]][p[1]], m[p[1]][p[0]]))
    return min(m[slowest[0]][slowest[1]], m[slowest[1]][slowest[0]]), slowest


def all_group_firsts(world: int, size: int, stride: int) -> list[int]:
    """First rank of every group with this (size, stride) layout; the groups partition the world."""
    block = size * stride
    return [b + off for b in range(0, world - block + 1, block) for off in range(stride)]


def dense_placements(tp: int = 1, cp: int = 1, dp: int = 1, pp: int = 1) -> dict[str, GroupPlacement]:
    """Groups of the dense mapping: tp innermost, then cp, dp, pp outermost."""
    return {"tp": GroupPlacement(tp, 1), "cp": GroupPlacement(cp, tp),
            "dp": GroupPlacement(dp, tp * cp), "pp": GroupPlacement(pp, tp * cp * dp)}


def expert_placements(etp: int = 1, ep: int = 1, edp: int = 1) -> dict[str, GroupPlacement]:
    """Groups of the expert mapping folded over the same ranks: etp innermost, then ep, edp."""
    return {"etp": GroupPlacement(etp, 1), "ep": GroupPlacement(ep, etp), "edp": GroupPlacement(edp, etp * ep)}
