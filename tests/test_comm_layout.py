"""comm._layout: a group's place on the cluster (members priced, link class, nodes spanned, the bandwidth across),
memoized by the cluster's identity, is what the unmemoized topology functions give, for every first rank,
stride and kind; and collective_time reads it the same for every message size."""

from __future__ import annotations

from collections import Counter

from autopar.core.cluster import ClusterSpec, LinkClass
from autopar.cost_models import comm
from autopar.cost_models.topology import all_group_firsts, group_nodes, node_pair_bw

MATRIX = [[50.0, 20.0, 30.0, 25.0], [20.0, 50.0, 10.0, 40.0], [30.0, 10.0, 50.0, 35.0], [25.0, 40.0, 35.0, 50.0]]


def _cluster(matrix=None) -> ClusterSpec:
    return ClusterSpec(gpu="a100-80g", nodes=4, gpus_per_node=8, intra_node=LinkClass(bw_gbps=200.0, latency_s=3e-6),
                       inter_node=LinkClass(bw_gbps=24.0, latency_s=1e-5), node_pair_bw_gbps=matrix)


def _expected(cluster: ClusterSpec, size: int, stride: int, first: int, p2p: bool) -> tuple:
    """The layout as _one_group worked it out before the memo, from the topology functions directly."""
    nodes_of = comm._chain_nodes(cluster, size, stride, first) if p2p else group_nodes(cluster, size, stride, first)
    counts = Counter(nodes_of)
    if len(set(nodes_of)) == 1:
        return 2 if p2p else size, "intra_node", None
    return 2 if p2p else size, "inter_node", (max(counts.values()), len(counts), *node_pair_bw(cluster, nodes_of))


def test_the_memoized_layout_is_the_topologys():
    for cluster in (_cluster(), _cluster(MATRIX)):
        for size, stride in ((2, 1), (8, 1), (4, 4), (2, 8), (4, 8), (16, 2), (8, 4), (32, 1)):
            for first in all_group_firsts(cluster.world, size, stride):
                for p2p in (False, True):
                    want = _expected(cluster, size, stride, first, p2p)
                    assert comm._layout(cluster, size, stride, first, p2p) == want
                    assert comm._layout(cluster, size, stride, first, p2p) == want   # the memo's hit


def test_each_cluster_object_keeps_its_own_layouts():
    slow_03 = [[50.0 if {a, b} != {0, 3} else 5.0 for b in range(4)] for a in range(4)]
    got_a, got_b = (comm._layout(c, 4, 8, 0, False) for c in (_cluster(MATRIX), _cluster(slow_03)))
    assert got_a[2] == (1, 4, 10.0, (1, 2)) and got_b[2] == (1, 4, 5.0, (0, 3))


def test_collective_times_read_one_layout_for_every_size():
    cluster = _cluster(MATRIX)
    for kind in ("all_reduce", "all_gather", "reduce_scatter", "all_to_all", "p2p"):
        for size_bytes in (1e3, 1e6, 1e9):
            got = comm.collective_time(kind, size_bytes, 8, 4, cluster, first_rank=1)
            ref = comm._collective_time(kind, size_bytes, 8, 4, cluster, first_rank=1)
            assert got == ref and got.time_s > 0
