"""Collective communication costs: alpha-beta model over a two-level (NVLink / network) topology.

Model. A collective over ``n`` ranks moving ``S`` bytes takes
``bus_factor(kind, n) * S / busbw + steps(kind, n) * alpha`` (Thakur, Rabenseifner & Gropp,
"Optimization of Collective Communication Operations in MPICH", IJHPCA 2005). Link
bandwidths are NCCL *bus* bandwidths per GPU as nccl-tests reports them (PERFORMANCE.md:
all-reduce busbw = algbw * 2(n-1)/n; all-gather / reduce-scatter / all-to-all busbw =
algbw * (n-1)/n), so measured busbw plugs straight into the formulas. Times are seconds,
sizes bytes, bandwidths GB/s (1e9 bytes/s). ``LinkClass.latency_s`` is alpha per ring step;
inside a node all-reduce uses ``allreduce_bw_gbps`` when set (NVLink SHARP on NVSwitch).

``S`` is: all-reduce - the tensor; all-gather - the gathered (output) size; reduce-scatter -
the full (input) size; all-to-all - bytes each rank sends in total, its own chunk included;
p2p - the message.

Assumptions (each one overlap-free or contention-free, for the caller to correct):
- No overlap with compute: the returned time is the collective alone; the caller decides
  what hides behind compute.
- Every group of the same layout runs at once (all dp groups reduce together), so across
  nodes each GPU gets only its own NIC (rail-style, one NIC per GPU as in DGX systems).
- Different collectives running at the same time (tp and dp) do not slow each other.
- Multi-node ring (NCCL): chunks are pipelined, so NVLink and NIC hops run concurrently and
  the slower share bounds the time (this reproduces DGX-A100's 192 GB/s all-reduce busbw from
  8 x 24 GB/s NICs). ``hierarchical`` is the phased 2-D algorithm (intra reduce-scatter,
  inter all-reduce of S/g per GPU over its own NIC, intra all-gather), phases not overlapped.
- ``auto`` takes the fastest candidate, as NCCL's tuner roughly does.
- NCCL's fixed per-call latency (~7-8 us base in its tuning model) and kernel launch are
  not modelled; measured ``CommFit``s include them.
- A group with uneven ranks per node is priced with its largest per-node count.
- With a node-pair bandwidth matrix the slowest pair among the spanned nodes bounds the
  inter-node share. The group priced is the one holding ``first_rank`` (default 0, see
  ``topology``); ``first_rank=None`` prices every group of the layout and returns the slowest.
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Literal, NamedTuple, get_args

from pydantic import BaseModel, ConfigDict, Field

from autopar.core.cluster import ClusterSpec, LinkClass
from autopar.cost_models.topology import (
    GroupPlacement,
    all_group_firsts,
    group_nodes,
    group_span,
    node_pair_bw,
)
from autopar.memo import MISS, IdentityMemo

__all__ = ["CommCost", "CommFit", "GroupPlacement", "all_gather_time", "all_to_all_time", "bus_factor",
           "collective_time", "group_span", "p2p_time", "reduce_scatter_time", "ring_all_reduce_time",
           "ring_steps", "tree_all_reduce_time"]

Kind = Literal["all_reduce", "all_gather", "reduce_scatter", "all_to_all", "p2p"]
Algo = Literal["auto", "ring", "tree", "hierarchical"]
KINDS = get_args(Kind)
ALGOS = get_args(Algo)
GB = 1e9


class CommCost(NamedTuple):
    time_s: float
    link: str      # "intra_node" | "inter_node" | "node_pair[a,b]" | "none": the link that bounded it
    source: str    # "datasheet" (link bandwidths) | "measurement" (a CommFit)
    algo: str      # "ring" | "tree" | "hierarchical" | "direct" | "p2p" | "fit" | "none"


class CommFit(BaseModel):
    """A measured fit ``time = alpha_s + beta_s_per_byte * S`` (algorithm factor included)."""

    model_config = ConfigDict(extra="forbid")

    kind: Kind
    group_size: int = Field(..., ge=2)
    link: Literal["intra_node", "inter_node"]
    alpha_s: float = Field(..., ge=0)
    beta_s_per_byte: float = Field(..., ge=0)
    r2: float = Field(..., le=1)
    source: Literal["measured"] = "measured"


# ----- closed forms (one level, n ranks on one link class) ------------------------------
def ring_all_reduce_time(size_bytes: float, n: int, bw_gbps: float, latency_s: float) -> float:
    """Ring all-reduce = reduce-scatter + all-gather: 2(n-1)/n * S/B + 2(n-1)*alpha (Thakur et al. 2005)."""
    if n <= 1:
        return 0.0
    return 2 * (n - 1) / n * size_bytes / (bw_gbps * GB) + 2 * (n - 1) * latency_s


def tree_all_reduce_time(size_bytes: float, n: int, bw_gbps: float, latency_s: float) -> float:
    """Double binary tree (NCCL >= 2.4): 2*S/B + 2*ceil(log2 n)*alpha.

    NCCL's tuning model (src/graph/tuning.cc) gives trees algbw = busbw / 2, i.e. time 2*S/B
    (reduce up, broadcast down); latency is one tree depth each way (Sanders et al. 2009).
    """
    if n <= 1:
        return 0.0
    return 2 * size_bytes / (bw_gbps * GB) + 2 * math.ceil(math.log2(n)) * latency_s


def all_gather_time(size_bytes: float, n: int, bw_gbps: float, latency_s: float) -> float:
    """Ring all-gather, S = gathered size: (n-1)/n * S/B + (n-1)*alpha (Thakur et al. 2005)."""
    if n <= 1:
        return 0.0
    return (n - 1) / n * size_bytes / (bw_gbps * GB) + (n - 1) * latency_s


def reduce_scatter_time(size_bytes: float, n: int, bw_gbps: float, latency_s: float) -> float:
    """Ring reduce-scatter, S = full input size: (n-1)/n * S/B + (n-1)*alpha (Thakur et al. 2005)."""
    return all_gather_time(size_bytes, n, bw_gbps, latency_s)


def all_to_all_time(size_bytes: float, n: int, bw_gbps: float, latency_s: float) -> float:
    """Pairwise all-to-all, S = bytes a rank sends in total: (n-1)/n * S/B + (n-1)*alpha (Thakur et al.)."""
    return all_gather_time(size_bytes, n, bw_gbps, latency_s)


def p2p_time(size_bytes: float, bw_gbps: float, latency_s: float) -> float:
    """One send/recv: alpha + S/B (Hockney model)."""
    return latency_s + size_bytes / (bw_gbps * GB)


def bus_factor(kind: str, n: int) -> float:
    """busbw / algbw from nccl-tests PERFORMANCE.md: 2(n-1)/n all-reduce, (n-1)/n AG/RS/A2A, 1 p2p."""
    if kind == "p2p":
        return 1.0
    if n <= 1:
        return 0.0
    return (2.0 if kind == "all_reduce" else 1.0) * (n - 1) / n


def ring_steps(kind: str, n: int) -> int:
    """Latency terms of the ring/pairwise algorithm: 2(n-1) all-reduce, n-1 AG/RS/A2A, 1 p2p."""
    if kind == "p2p":
        return 1
    return (2 if kind == "all_reduce" else 1) * max(n - 1, 0)


_FLAT = {"all_gather": all_gather_time, "reduce_scatter": reduce_scatter_time, "all_to_all": all_to_all_time}


# ----- two levels: g ranks per node on `nodes` nodes ------------------------------------
def multinode_ring_time(kind: str, size_bytes: float, n: int, g: int, nodes: int, intra: LinkClass,
                        inter_bw_gbps: float, inter_latency_s: float) -> tuple[float, str]:
    """NCCL ring across nodes, g channels each leaving the node through one GPU's NIC.

    Per GPU, (g-1)/g of the ring traffic goes over NVLink and 1/g over its own NIC, concurrently:
    time = bus_factor * S * max((g-1)/(g*B_intra), 1/(g*B_nic)) + passes * (hop latencies),
    with n-nodes NVLink hops and nodes-1 network hops per pass (2 passes for all-reduce).
    Returns (time, "intra" | "inter" = the share that bounds it).
    """
    f = bus_factor(kind, n) * size_bytes
    t_intra = f * (g - 1) / (g * intra.bw_gbps * GB)
    t_inter = f / (g * inter_bw_gbps * GB)
    passes = 2 if kind == "all_reduce" else 1
    lat = passes * ((n - nodes) * intra.latency_s + (nodes - 1) * inter_latency_s)
    return max(t_intra, t_inter) + lat, ("inter" if t_inter >= t_intra else "intra")


def multinode_tree_all_reduce_time(size_bytes: float, g: int, nodes: int, intra: LinkClass,
                                   inter_bw_gbps: float, inter_latency_s: float) -> tuple[float, str]:
    """NCCL tree across nodes (chain inside a node, double binary tree over nodes through the
    node's g NICs): 2*S/min(B_intra, g*B_nic) + 2*((g-1)*alpha_intra + ceil(log2 nodes)*alpha_inter).
    """
    node_bw = g * inter_bw_gbps
    bw = min(intra.bw_gbps, node_bw)
    lat = 2 * ((g - 1) * intra.latency_s + math.ceil(math.log2(nodes)) * inter_latency_s)
    return 2 * size_bytes / (bw * GB) + lat, ("inter" if node_bw <= intra.bw_gbps else "intra")


def hierarchical_time(kind: str, size_bytes: float, g: int, nodes: int, intra: LinkClass,
                      inter_bw_gbps: float, inter_latency_s: float) -> tuple[float, str]:
    """Phased 2-D collective, phases not overlapped (Horovod / Megatron hierarchical style).

    all-reduce: RS(S over g, NVLink) + ring AR(S/g over nodes, own NIC) + AG(S over g, NVLink);
    all-gather: AG(S/g over nodes, NIC) + AG(S over g, NVLink); reduce-scatter: the reverse.
    """
    bi, ai = intra.bw_gbps, intra.latency_s
    if kind == "all_reduce":
        t_in = reduce_scatter_time(size_bytes, g, bi, ai) + all_gather_time(size_bytes, g, bi, ai)
        t_out = ring_all_reduce_time(size_bytes / g, nodes, inter_bw_gbps, inter_latency_s)
    else:  # all_gather / reduce_scatter have the same cost structure
        t_in = all_gather_time(size_bytes, g, bi, ai)
        t_out = all_gather_time(size_bytes / g, nodes, inter_bw_gbps, inter_latency_s)
    return t_in + t_out, ("inter" if t_out >= t_in else "intra")


def multinode_all_to_all_time(size_bytes: float, n: int, g: int, intra: LinkClass,
                              inter_bw_gbps: float, inter_latency_s: float) -> tuple[float, str]:
    """All-to-all across nodes: (g-1)/n of S stays on NVLink, 1 - g/n leaves through the GPU's NIC,
    both concurrently: max(S(g-1)/n / B_intra, S(n-g)/n / B_nic) + (g-1)*alpha_intra + (n-g)*alpha_inter.
    """
    t_intra = size_bytes * (g - 1) / n / (intra.bw_gbps * GB)
    t_inter = size_bytes * (n - g) / n / (inter_bw_gbps * GB)
    lat = (g - 1) * intra.latency_s + (n - g) * inter_latency_s
    return max(t_intra, t_inter) + lat, ("inter" if t_inter >= t_intra else "intra")


# ----- measured fits -------------------------------------------------------------------
def find_fit(fits: list[CommFit] | None, kind: str, size: int, link: str) -> CommFit | None:
    """The fit for this kind and link class with the nearest group size (log scale; ties -> larger)."""
    cands = [f for f in fits or [] if f.kind == kind and f.link == link]
    if not cands:
        return None
    return min(cands, key=lambda f: (abs(math.log2(f.group_size) - math.log2(max(size, 1))), -f.group_size))


def fit_time(fit: CommFit, kind: str, size_bytes: float, n: int) -> float:
    """alpha + beta*S; for another group size the terms are rescaled by the ring step count and
    bus factor ratios (the fit already holds the algorithm factor at its own size)."""
    if n == fit.group_size or kind == "p2p":
        return fit.alpha_s + fit.beta_s_per_byte * size_bytes
    alpha = fit.alpha_s * ring_steps(kind, n) / ring_steps(kind, fit.group_size)
    beta = fit.beta_s_per_byte * bus_factor(kind, n) / bus_factor(kind, fit.group_size)
    return alpha + beta * size_bytes


# ----- dispatch ------------------------------------------------------------------------
def _pick(cands: dict[str, tuple[float, str]], algo: str) -> tuple[str, float, str]:
    """(algo, time, bound) for the requested algorithm; 'auto' or an unavailable one -> fastest."""
    if algo in cands:
        return (algo, *cands[algo])
    name = min(cands, key=lambda k: cands[k][0])
    return (name, *cands[name])


def _intra_cost(kind: str, size_bytes: float, n: int, link: LinkClass, algo: str) -> CommCost:
    """All members on one node: one link class, flat algorithms."""
    if kind == "p2p":
        return CommCost(p2p_time(size_bytes, link.bw_gbps, link.latency_s), "intra_node", "datasheet", "p2p")
    if kind == "all_to_all":
        t = all_to_all_time(size_bytes, n, link.bw_gbps, link.latency_s)
        return CommCost(t, "intra_node", "datasheet", "direct")
    if kind == "all_reduce":
        bw = link.allreduce_bw_gbps or link.bw_gbps  # NVLS reduces in the switch: higher busbw
        cands = {"ring": (ring_all_reduce_time(size_bytes, n, bw, link.latency_s), "intra"),
                 "tree": (tree_all_reduce_time(size_bytes, n, bw, link.latency_s), "intra")}
    else:
        cands = {"ring": (_FLAT[kind](size_bytes, n, link.bw_gbps, link.latency_s), "intra")}
    name, t, _ = _pick(cands, "ring" if algo == "hierarchical" else algo)
    return CommCost(t, "intra_node", "datasheet", name)


def _inter_cost(kind: str, size_bytes: float, n: int, span: tuple, cluster: ClusterSpec, algo: str) -> CommCost:
    """Members on >= 2 nodes: NVLink inside nodes, each GPU's NIC share (or the slowest node pair) across.
    ``span``: ``_layout``'s (most members on one node, nodes spanned, per-GPU bandwidth across, slowest pair)."""
    g, nodes, bw_x, pair = span
    lat_x, intra = cluster.inter_node.latency_s, cluster.intra_node
    inter_name = f"node_pair[{pair[0]},{pair[1]}]" if pair else "inter_node"
    if kind == "p2p":
        return CommCost(p2p_time(size_bytes, bw_x, lat_x), inter_name, "datasheet", "p2p")
    if kind == "all_to_all":
        t, bound = multinode_all_to_all_time(size_bytes, n, g, intra, bw_x, lat_x)
        return CommCost(t, inter_name if bound == "inter" else "intra_node", "datasheet", "direct")
    cands = {"ring": multinode_ring_time(kind, size_bytes, n, g, nodes, intra, bw_x, lat_x)}
    if g > 1:  # with one rank per node the hierarchical algorithm is the flat ring
        cands["hierarchical"] = hierarchical_time(kind, size_bytes, g, nodes, intra, bw_x, lat_x)
    if kind == "all_reduce":
        cands["tree"] = multinode_tree_all_reduce_time(size_bytes, g, nodes, intra, bw_x, lat_x)
    name, t, bound = _pick(cands, algo)
    return CommCost(t, inter_name if bound == "inter" else "intra_node", "datasheet", name)


def _chain_nodes(cluster: ClusterSpec, size: int, stride: int, first_rank: int) -> list[int]:
    """p2p: the nodes of the slowest neighbouring pair of the chain (a crossing pair if any)."""
    nodes = group_nodes(cluster, size, stride, first_rank)
    pairs = [nodes[i:i + 2] for i in range(len(nodes) - 1)]
    crossing = [p for p in pairs if p[0] != p[1]]
    if not crossing:
        return pairs[0]
    return min(crossing, key=lambda p: node_pair_bw(cluster, p)[0])


def _one_group(kind: str, size_bytes: float, size: int, stride: int, cluster: ClusterSpec, algo: str,
               fits: list[CommFit] | None, first_rank: int) -> CommCost:
    n, link, span = _layout(cluster, size, stride, first_rank, kind == "p2p")
    fit = find_fit(fits, kind, n, link)
    if fit is not None:
        return CommCost(fit_time(fit, kind, size_bytes, n), link, "measurement", "fit")
    if link == "intra_node":
        return _intra_cost(kind, size_bytes, n, cluster.intra_node, algo)
    return _inter_cost(kind, size_bytes, n, span, cluster, algo)


_LAYOUTS = IdentityMemo(20_000)   # _layout by its arguments (the cluster by identity)


def _layout(cluster: ClusterSpec, size: int, stride: int, first_rank: int, p2p: bool) -> tuple:
    """(members priced, link class, ``_inter_cost``'s span or None) of a group (``p2p``: its slowest neighbouring
    pair), memoized: a pure function of the cluster and the group's place, which every message size of a group
    reads alike (a group of 1,024 ranks lists and counts 1,024 nodes)."""
    key, out = _LAYOUTS.lookup((size, stride, first_rank, p2p), (cluster,))
    if out is MISS:
        nodes_of = _chain_nodes(cluster, size, stride, first_rank) if p2p else group_nodes(cluster, size, stride,
                                                                                           first_rank)
        counts = Counter(nodes_of)
        span = None if len(counts) == 1 else (max(counts.values()), len(counts), *node_pair_bw(cluster, nodes_of))
        out = _LAYOUTS.put(key, (cluster,), (2 if p2p else size, "intra_node" if span is None else "inter_node", span))
    return out


_MEMO = IdentityMemo(200_000)   # collective_time by its arguments (the search asks the same ones many times)


def collective_time(kind: Kind, size_bytes: float, size: int, stride: int, cluster: ClusterSpec,
                    algo: Algo = "auto", fits: list[CommFit] | None = None,
                    first_rank: int | None = 0) -> CommCost:
    """``_collective_time``, memoized: a pure function of its arguments. The cluster and the fits
    are keyed by identity and kept beside the result, so a key never outlives its objects."""
    key, out = _MEMO.lookup((kind, size_bytes, size, stride, algo, first_rank), (cluster, fits))
    if out is MISS:
        out = _MEMO.put(key, (cluster, fits), _collective_time(kind, size_bytes, size, stride, cluster, algo, fits,
                                                                first_rank))
    return out


def _collective_time(kind: Kind, size_bytes: float, size: int, stride: int, cluster: ClusterSpec,
                     algo: Algo = "auto", fits: list[CommFit] | None = None,
                     first_rank: int | None = 0) -> CommCost:
    """Time of one collective of ``size_bytes`` over the group ``(size, stride)`` on ``cluster``.

    ``kind`` p2p: one message between neighbours of the chain ``size`` members ``stride`` apart
    (e.g. pipeline stages), priced on the slowest neighbouring pair. ``algo`` applies to
    all-reduce / all-gather / reduce-scatter (tree exists for all-reduce only; an algorithm
    that does not apply falls back to the fastest). A ``CommFit`` for this kind and link class
    (nearest group size) replaces the datasheet formulas. ``first_rank=None``: slowest group.
    """
    if kind not in KINDS or algo not in ALGOS:
        raise ValueError(f"collective_time: kind {kind!r} / algo {algo!r}; kinds {KINDS}, algos {ALGOS}")
    if size <= 1 or size_bytes <= 0:
        if size >= 1:
            group_nodes(cluster, size, stride, first_rank or 0)  # still reject groups past the cluster
        return CommCost(0.0, "none", "datasheet", "none")
    if first_rank is not None:
        return _one_group(kind, size_bytes, size, stride, cluster, algo, fits, first_rank)
    costs = [_one_group(kind, size_bytes, size, stride, cluster, algo, fits, f)
             for f in all_group_firsts(cluster.world, size, stride)]
    return max(costs, key=lambda c: c.time_s)
