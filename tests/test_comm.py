"""Collective cost model: closed forms (Thakur et al. 2005), nccl-tests busbw, placement, fits."""

from __future__ import annotations

import math

import pytest

from autopar.core.cluster import ClusterSpec, LinkClass
from autopar.cost_models.comm import (
    CommFit,
    all_gather_time,
    all_to_all_time,
    bus_factor,
    collective_time,
    hierarchical_time,
    multinode_all_to_all_time,
    p2p_time,
    reduce_scatter_time,
    ring_all_reduce_time,
    tree_all_reduce_time,
)
from autopar.cost_models.topology import all_group_firsts, dense_placements, expert_placements, group_span
from autopar.errors import InputError
from autopar.profiles.hw import load_cluster

GB = 1e9


def _cluster(nodes=4, gpn=8, intra=(200.0, 3e-6), inter=(24.0, 1e-5), matrix=None, ar_bw=None):
    return ClusterSpec(gpu="a100-80g", nodes=nodes, gpus_per_node=gpn,
                       intra_node=LinkClass(bw_gbps=intra[0], latency_s=intra[1], allreduce_bw_gbps=ar_bw),
                       inter_node=LinkClass(bw_gbps=inter[0], latency_s=inter[1]), node_pair_bw_gbps=matrix)


# ----- closed forms -------------------------------------------------------------------------
def test_ring_all_reduce_closed_form():
    # 2(n-1)/n * S/B + 2(n-1)*alpha with S=1 GB, n=8, B=100 GB/s, alpha=5 us
    assert ring_all_reduce_time(1e9, 8, 100, 5e-6) == pytest.approx(2 * 7 / 8 * 1e9 / 100e9 + 14 * 5e-6)
    assert ring_all_reduce_time(1e9, 8, 100, 5e-6) == pytest.approx(0.01757)


def test_tree_all_gather_reduce_scatter_a2a_p2p_closed_forms():
    assert tree_all_reduce_time(1e9, 8, 100, 5e-6) == pytest.approx(2 * 1e9 / 100e9 + 2 * 3 * 5e-6)
    assert tree_all_reduce_time(1e9, 6, 100, 0.0) == pytest.approx(0.02)
    ag = 3 / 4 * 4e8 / 50e9 + 3 * 2e-6
    assert all_gather_time(4e8, 4, 50, 2e-6) == pytest.approx(ag)
    assert reduce_scatter_time(4e8, 4, 50, 2e-6) == pytest.approx(ag)
    assert all_to_all_time(4e8, 4, 50, 2e-6) == pytest.approx(ag)
    assert p2p_time(1e8, 50, 1e-5) == pytest.approx(1e-5 + 2e-3)


def test_single_rank_is_free():
    for fn in (ring_all_reduce_time, tree_all_reduce_time, all_gather_time, reduce_scatter_time, all_to_all_time):
        assert fn(1e9, 1, 100, 1e-5) == 0.0
    cost = collective_time("all_reduce", 1e9, 1, 1, _cluster())
    assert cost.time_s == 0.0 and cost.link == "none"


@pytest.mark.parametrize("n", [2, 4, 8, 16, 64])
def test_busbw_consistency_nccl_tests(n):
    # nccl-tests PERFORMANCE.md: busbw = algbw * 2(n-1)/n (all-reduce), algbw * (n-1)/n (all-gather)
    busbw, size = 150.0, 1e12
    algbw = size / ring_all_reduce_time(size, n, busbw, 0.0) / GB
    assert algbw == pytest.approx(busbw * n / (2 * (n - 1)))
    assert size / all_gather_time(size, n, busbw, 0.0) / GB == pytest.approx(busbw * n / (n - 1))
    assert bus_factor("all_reduce", n) == pytest.approx(2 * (n - 1) / n)


# ----- placement ------------------------------------------------------------------------
def test_group_span():
    c = _cluster()
    assert group_span(c, 8, 1) == (8, 1)       # tp innermost: one node
    assert group_span(c, 4, 8) == (1, 4)       # dp stride 8: one rank on each of 4 nodes
    assert group_span(c, 16, 1) == (8, 2)
    assert group_span(c, 4, 2) == (4, 1)
    assert group_span(_cluster(nodes=8), 4, 16) == (1, 4)  # ranks 0, 16, 32, 48: nodes 0, 2, 4, 6
    assert group_span(_cluster(nodes=2), 4, 3) == (3, 2)  # ranks 0,3,6 on node 0 and 9 on node 1


def test_group_past_cluster_is_input_error():
    with pytest.raises(InputError, match="cluster has 32"):
        group_span(_cluster(), 8, 8)
    with pytest.raises(InputError):
        collective_time("all_reduce", 1e6, 8, 8, _cluster())


def test_strategy_placements():
    d = dense_placements(tp=8, cp=2, dp=4, pp=2)
    assert (d["tp"].stride, d["cp"].stride, d["dp"].stride, d["pp"].stride) == (1, 8, 16, 64)
    e = expert_placements(etp=1, ep=8, edp=8)
    assert (e["ep"].stride, e["edp"].stride) == (1, 8)
    assert all_group_firsts(32, 4, 8) == list(range(8))
    assert all_group_firsts(32, 8, 1) == [0, 8, 16, 24]


def test_tp_intra_dp_inter():
    c = load_cluster("dgx-a100", nodes=4)
    tp = collective_time("all_reduce", 1e9, 8, 1, c)
    dp = collective_time("all_reduce", 1e9, 4, 8, c)
    assert tp.link == "intra_node" and dp.link == "inter_node"
    assert tp.source == dp.source == "datasheet"
    assert tp.time_s == pytest.approx(ring_all_reduce_time(1e9, 8, 200, 3e-6))
    # one rank per node: each GPU only has its own NIC (24 GB/s)
    assert dp.time_s == pytest.approx(ring_all_reduce_time(1e9, 4, 24, 1e-5))


def test_nvls_allreduce_bw_only_for_all_reduce():
    c = load_cluster("dgx-h100")
    ar = collective_time("all_reduce", 1e11, 8, 1, c)
    ag = collective_time("all_gather", 1e11, 8, 1, c)
    assert bus_factor("all_reduce", 8) * 1e11 / ar.time_s / GB == pytest.approx(480, rel=1e-3)
    assert bus_factor("all_gather", 8) * 1e11 / ag.time_s / GB == pytest.approx(370, rel=1e-3)


def test_multinode_all_reduce_reproduces_dgx_a100_busbw():
    # AddyLaddy (NVIDIA/nccl #812): DGX-A100 with 8x HDR200 measures 192 GB/s all-reduce busbw
    c = load_cluster("dgx-a100", nodes=2)
    cost = collective_time("all_reduce", 1e11, 16, 1, c)
    assert cost.link == "inter_node" and cost.algo == "ring"
    assert bus_factor("all_reduce", 16) * 1e11 / cost.time_s / GB == pytest.approx(192, rel=0.01)


def test_algorithms_and_auto():
    c = _cluster()
    costs = {a: collective_time("all_reduce", 1e9, 32, 1, c, algo=a) for a in ("ring", "tree", "hierarchical")}
    auto = collective_time("all_reduce", 1e9, 32, 1, c)
    assert auto.time_s == min(x.time_s for x in costs.values())
    assert {x.algo for x in costs.values()} == {"ring", "tree", "hierarchical"}
    # hierarchical = RS(8, NVLink) + AR(S/8 over 4 nodes, own NIC) + AG(8, NVLink)
    expect = (2 * reduce_scatter_time(1e9, 8, 200, 3e-6) + ring_all_reduce_time(1e9 / 8, 4, 24, 1e-5))
    assert costs["hierarchical"].time_s == pytest.approx(expect)
    assert hierarchical_time("all_reduce", 1e9, 8, 4, c.intra_node, 24, 1e-5)[0] == pytest.approx(expect)
    # latency-bound small messages: the tree wins
    small = {a: collective_time("all_reduce", 1e3, 32, 1, c, algo=a).time_s for a in ("ring", "tree")}
    assert small["tree"] < small["ring"]


def test_all_to_all_inter_share_over_nic():
    c = _cluster(nodes=2)
    cost = collective_time("all_to_all", 1.6e9, 16, 1, c)
    # 7/16 of S over NVLink, 8/16 over the GPU's NIC, concurrently
    t_in, t_out = 1.6e9 * 7 / 16 / 200e9, 1.6e9 * 8 / 16 / 24e9
    assert cost.time_s == pytest.approx(max(t_in, t_out) + 7 * 3e-6 + 8 * 1e-5)
    assert cost.link == "inter_node" and cost.algo == "direct"
    assert multinode_all_to_all_time(1.6e9, 16, 8, c.intra_node, 24, 1e-5)[0] == pytest.approx(cost.time_s)
    assert collective_time("all_to_all", 1.6e9, 8, 1, c).link == "intra_node"


def test_p2p_chain_uses_crossing_pair():
    c = _cluster(nodes=2)
    assert collective_time("p2p", 1e8, 2, 4, c).link == "intra_node"     # stages 0 and 1 on node 0
    cross = collective_time("p2p", 1e8, 4, 4, c)                          # stage 1 -> 2 leaves the node
    assert cross.link == "inter_node" and cross.time_s == pytest.approx(p2p_time(1e8, 24, 1e-5))


# ----- node-pair matrix ------------------------------------------------------------------
def _slow_pair_cluster():
    m = [[24.0] * 4 for _ in range(4)]
    m[2][3] = m[3][2] = 5.0
    return _cluster(nodes=4, matrix=m)


def test_node_pair_matrix_slows_only_groups_spanning_the_pair():
    slow, plain = _slow_pair_cluster(), _cluster(nodes=4)
    fast_group = collective_time("all_reduce", 1e9, 16, 1, slow)                 # nodes 0, 1
    assert fast_group.time_s == pytest.approx(collective_time("all_reduce", 1e9, 16, 1, plain).time_s)
    whole = collective_time("all_reduce", 1e9, 32, 1, slow)                      # nodes 0..3
    assert whole.time_s > 1.5 * collective_time("all_reduce", 1e9, 32, 1, plain).time_s
    assert whole.link == "node_pair[2,3]"
    on_slow = collective_time("all_reduce", 1e9, 16, 1, slow, first_rank=16)    # nodes 2, 3
    assert on_slow.time_s > 1.5 * fast_group.time_s
    worst = collective_time("all_reduce", 1e9, 16, 1, slow, first_rank=None)
    assert worst.time_s == on_slow.time_s
    dp = collective_time("all_reduce", 1e9, 2, 8, slow)                          # nodes 0, 1: fast
    assert dp.time_s == pytest.approx(ring_all_reduce_time(1e9, 2, 24, 1e-5))


def test_node_pair_matrix_uses_slower_direction():
    m = [[48.0, 30.0], [12.0, 48.0]]
    cost = collective_time("p2p", 1e9, 2, 8, _cluster(nodes=2, matrix=m))
    assert cost.time_s == pytest.approx(p2p_time(1e9, 12, 1e-5))


# ----- measured fits ---------------------------------------------------------------------
def test_fit_replaces_datasheet():
    c = _cluster(nodes=1)
    fit = CommFit(kind="all_reduce", group_size=8, link="intra_node", alpha_s=2e-5, beta_s_per_byte=1e-11, r2=0.99)
    cost = collective_time("all_reduce", 1e8, 8, 1, c, fits=[fit])
    assert cost.source == "measurement" and cost.algo == "fit"
    assert cost.time_s == pytest.approx(2e-5 + 1e-11 * 1e8)
    # another kind or link class: datasheet
    assert collective_time("all_gather", 1e8, 8, 1, c, fits=[fit]).source == "datasheet"
    assert collective_time("all_reduce", 1e8, 8, 8, _cluster(nodes=8), fits=[fit]).source == "datasheet"


def test_fit_nearest_size_rescaled():
    c = _cluster(nodes=1)
    fits = [CommFit(kind="all_reduce", group_size=s, link="intra_node", alpha_s=1e-5 * s, beta_s_per_byte=1e-10,
                    r2=0.9) for s in (2, 4)]
    cost = collective_time("all_reduce", 1e6, 8, 1, c, fits=fits)               # nearest: 4
    expect = 4e-5 * 14 / 6 + 1e-10 * 1e6 * (14 / 8) / (6 / 4)
    assert cost.time_s == pytest.approx(expect)
    assert collective_time("all_reduce", 1e6, 2, 1, c, fits=fits).time_s == pytest.approx(2e-5 + 1e-4)


def test_fit_schema():
    with pytest.raises(ValueError):
        CommFit(kind="all_reduce", group_size=1, link="intra_node", alpha_s=0, beta_s_per_byte=0, r2=1)
    with pytest.raises(ValueError):
        CommFit(kind="bcast", group_size=2, link="intra_node", alpha_s=0, beta_s_per_byte=0, r2=1)


def test_unknown_kind_or_algo():
    with pytest.raises(ValueError, match="bcast"):
        collective_time("bcast", 1e6, 2, 1, _cluster())
    with pytest.raises(ValueError, match="ring2"):
        collective_time("all_reduce", 1e6, 2, 1, _cluster(), algo="ring2")


def test_cpu_cluster_two_ranks():
    c = load_cluster("cpu")
    cost = collective_time("all_reduce", 4e6, 2, 1, c)
    assert cost.link == "intra_node"
    bw, lat = c.intra_node.bw_gbps, c.intra_node.latency_s  # measured by profile-comm (docs/profiling.md)
    assert cost.time_s == pytest.approx(min(ring_all_reduce_time(4e6, 2, bw, lat),
                                            tree_all_reduce_time(4e6, 2, bw, lat)))
    assert math.isfinite(cost.time_s)
