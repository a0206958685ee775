"""Awkward GPU counts: plans on fewer GPUs and at the nearest batch a mesh takes, priced and ranked."""

from __future__ import annotations

import json

import pytest

from autopar.cost_models.session import Inputs, build_cost_model
from autopar.planner import awkward
from autopar.planner.search import Constraints, search


def test_arithmetic_of_the_530b_sweep_count():
    # 641 x 8 A100: 641 is prime and above the 105 layers, so dp must hold it and divide the batch
    assert awkward.largest_prime_factor(5128) == 641 and awkward.largest_prime_factor(5120) == 5
    assert awkward.is_awkward(5128, found_all=False) and not awkward.is_awkward(5120, found_all=True)
    assert awkward.nearest_batches(5128, 2520)[0] == 2564   # 4 x 641, +44
    assert awkward.fewer_gpu_counts(awkward.sub_cluster(_cm(13).cluster, 13))[:2] == [12, 11]


def _cm(nodes: int):
    cm, *_ = build_cost_model(Inputs(model="llama-tiny", gpu="cpu", nodes=nodes, gpus_per_node=1, seq_len=64))
    return cm


@pytest.fixture(scope="module")
def prime13():
    cm = _cm(13)                      # 13 ranks: prime, above the 4 layers, no divisor of batch 16
    res = search(cm, 16, Constraints(), top_k=3)
    return cm, res, awkward.alternatives(cm, 16, Constraints(), res, top_k=3)


def test_prime_count_gets_fewer_gpus_and_nearest_batch(prime13):
    cm, res, alts = prime13
    assert res.stats.space == 0 and alts is not None
    kinds = {o.kind: o for o in alts.options}
    assert set(kinds) == {"fewer_gpus", "other_batch"}
    fewer, moved = kinds["fewer_gpus"], kinds["other_batch"]
    assert fewer.gpus == 12 and fewer.idle_gpus == 1 and fewer.global_batch == 16
    assert fewer.best.strategy.dp * fewer.best.strategy.pp * fewer.best.strategy.tp * fewer.best.strategy.cp == 12
    assert moved.gpus == 13 and moved.global_batch == 13   # the nearest multiple of 13
    assert moved.best.strategy.dp == 13
    for o in alts.options:   # each priced by the cost model on its own cluster
        assert o.best.estimate.step_time_s == pytest.approx(o.best.step_time_s, rel=1e-6)
        assert o.cm.cluster.world == o.gpus
    assert alts.recommended in alts.options and alts.reason


def test_recommendation_rule(prime13):
    _, _, alts = prime13
    by = {o.kind: o for o in alts.options}
    chosen, _ = awkward.recommend(alts.options, 16)
    moved_wins = by["other_batch"].time_per_sequence_s < \
        by["fewer_gpus"].time_per_sequence_s * (1 - awkward.BATCH_CHANGE_MARGIN)
    assert chosen is (by["other_batch"] if moved_wins else by["fewer_gpus"])
    only_moved, why = awkward.recommend([by["other_batch"]], 16)
    assert only_moved is by["other_batch"] and "requested global batch" in why


def test_exact_flags_forbid_alternatives(prime13):
    cm, res, _ = prime13
    no_fewer = awkward.alternatives(cm, 16, Constraints(), res, 3, exact_gpus=True)
    assert [o.kind for o in no_fewer.options] == ["other_batch"]
    assert awkward.alternatives(cm, 16, Constraints(), res, 3, exact_gpus=True, exact_batch=True) is None


def test_smooth_count_is_left_alone():
    cm = _cm(4)
    res = search(cm, 16, Constraints(), top_k=2)
    assert res.candidates and awkward.alternatives(cm, 16, Constraints(), res) is None


def test_cli_prints_alternatives_and_json(run_cli):
    args = ["plan", "llama-tiny", "--gpu", "cpu", "--gpus-per-node", "1", "--nodes", "13", "--seq-len", "64",
            "--global-batch", "16", "--top", "2"]
    code, out, err = run_cli(*args)
    assert code == 0, err
    assert "awkward GPU count" in out and "recommended (*)" in out and "1 idle" in out
    code, out, _ = run_cli(*args, "--json")
    alt = json.loads(out)["alternatives"]
    assert code == 0 and sum(o["recommended"] for o in alt["options"]) == 1
    code, _, err = run_cli(*args, "--exact-gpus", "--exact-batch")
    assert code == 2 and "no configuration satisfies" in err
