"""Heterogeneous clusters: node groups priced with their own GPU and the slowest link; stages kept
on one GPU type with layers split by speed; a layout that cannot keep stages whole is refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from autopar.core.cluster import ClusterSpec
from autopar.cost_models import hetero as hc
from autopar.cost_models.session import Inputs, build_cost_model
from autopar.errors import InputError
from autopar.planner import hetero
from autopar.planner.search import Constraints

MIXED = Path(__file__).resolve().parent / "fixtures" / "clusters" / "mixed-h100-a100.yaml"


@pytest.fixture(scope="module")
def mixed():
    cm, *_ = build_cost_model(Inputs(model="gpt-small", cluster=str(MIXED), seq_len=256))
    return cm


def test_cluster_file_has_groups(mixed):
    cl = mixed.cluster
    assert cl.heterogeneous and cl.nodes == 4 and cl.world == 32 and cl.gpu == "h100-sxm"
    assert [g.gpu for g in cl.node_groups] == ["h100-sxm", "a100-80g"]


def test_priced_with_the_slow_groups_numbers(mixed):
    models = hc.group_models(mixed)
    # every inter-node collective at the slowest link: the A100 group's 24 GB/s on half its NICs
    assert hc.slowest_inter_link(mixed.cluster).bw_gbps == pytest.approx(12.0)
    assert all(m.cluster.inter_node.bw_gbps == pytest.approx(12.0) for m in models)
    assert [m.gpu.name for m in models] == ["h100-sxm", "a100-80g"]
    assert models[1].cluster.intra_node.bw_gbps == 200          # the A100 nodes' own NVLink
    hp = hetero.plan(mixed, 64, Constraints())
    b = hp.best
    s, stages = b.strategy, b.stages
    per = [m.estimate(s, stages, None) for m in models]
    for j, g in enumerate(b.stage_group):                       # each stage at its own GPU type
        assert b.stage_fwd_s[j] == pytest.approx(per[g].ranks[j].fwd_s, rel=1e-3) or s.recompute != "none"
        assert b.stage_usable_bytes[j] == per[g].usable_bytes
    assert hp.slow_group == 1 and b.feasible and b.step_time_s > 0


def test_layers_split_by_speed():
    # A100 3.2x slower per layer than H100: the DP gives the fast stage more layers
    times = [[1.0] * 8, [3.2] * 8]
    stages = hetero.split_by_speed(times, [(0.0, 0.0), (0.0, 0.0)], [0, 1])
    assert stages == [(0, 6), (6, 8)]
    # and with the stages the other way round
    assert hetero.split_by_speed(times, [(0.0, 0.0), (0.0, 0.0)], [1, 0]) == [(0, 2), (2, 8)]


def test_stage_layouts_keep_groups_whole():
    assert hetero.stage_layouts([16, 16], 8) == [(2, [0, 1]), (4, [0, 0, 1, 1]), (8, [0, 0, 0, 0, 1, 1, 1, 1])]
    assert hetero.stage_layouts([24, 16], 4) == []   # stage sizes dividing both give 5+ stages > 4 layers


def test_cannot_keep_stages_on_one_gpu_type_says_so(tmp_path):
    path = tmp_path / "odd.yaml"
    path.write_text(MIXED.read_text().replace("nodes: 2\n  - name: a100", "nodes: 3\n  - name: a100"))
    cm, *_ = build_cost_model(Inputs(model="llama-tiny", cluster=str(path), seq_len=64))
    with pytest.raises(InputError, match="cannot keep each pipeline stage on one GPU type"):
        hetero.plan(cm, 40, Constraints())


def test_groups_must_add_up():
    with pytest.raises(ValueError, match="node_groups hold 4 nodes but nodes=3"):
        ClusterSpec.model_validate(dict(nodes=3, intra_node=dict(bw_gbps=1, latency_s=0),
                                        inter_node=dict(bw_gbps=1, latency_s=0),
                                        node_groups=[dict(gpu="h100-sxm", nodes=2), dict(gpu="a100-80g", nodes=2)]))


def test_cli_plans_the_mixed_cluster(run_cli):
    code, out, err = run_cli("plan", "gpt-small", "--cluster", str(MIXED), "--seq-len", "256", "--global-batch",
                             "64", "--json")
    assert code == 0, err
    obj = json.loads(out)
    assert {st["gpu"] for st in obj["stages"]} == {"h100-sxm", "a100-80g"}
    assert obj["slowest_group"] == "a100-half-nics"
    assert obj["step_time_s"] <= obj["even_split_step_time_s"] * (1 + 1e-9)
