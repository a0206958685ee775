"""Expert placement: objective, exact ILP, bounds, scalable search, placement file, CLI."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest

from autopar.cli.main import main
from autopar.errors import InputError
from autopar.planner.experts import (
    ExpertPlacement,
    check_assignment,
    evaluate,
    make_problem,
    placement_stats,
    random_placement,
    round_robin,
    routing_cost_factors,
    solve_placement,
    to_assignment,
    to_matrix,
)
from autopar.planner.experts_ilp import cross_bound, load_bound, lower_bound, solve_exact
from autopar.planner.experts_search import search
from autopar.profiles.routing import RoutingTrace, synthetic_trace


def _hand_trace() -> RoutingTrace:
    """2 layers, 4 experts, top-1: experts 0,1 feed 2,3 and vice versa."""
    load = np.array([[4, 3, 2, 1], [1, 2, 3, 4]])
    trans = np.zeros((1, 4, 4), dtype=int)
    trans[0, 0, 3], trans[0, 1, 2], trans[0, 2, 1], trans[0, 3, 0] = 4, 3, 2, 1
    return RoutingTrace.from_arrays(load, trans, topk=1, tokens=10)


# ----- objective ------------------------------------------------------------------------------
def test_evaluate_by_hand():
    tr = _hand_trace()
    p = make_problem(tr, ep=2, a2a_cost=1.0)
    assert p.comm_weight == pytest.approx(1.0 / (2 * 1))
    # layer 0: {0,1} | {2,3}; layer 1: {2,3} | {0,1}: every transition stays on its rank
    ev = evaluate(p, to_matrix([[[0, 1], [2, 3]], [[2, 3], [0, 1]]], 4))
    assert ev.rank_load.tolist() == [[7, 3], [7, 3]]
    assert ev.cross.tolist() == [0.0]
    # layer 1: {0,1} | {2,3}: every transition crosses; rank 0 sends 4 + 3, rank 1 sends 2 + 1
    ev = evaluate(p, to_matrix([[[0, 1], [2, 3]], [[0, 1], [2, 3]]], 4))
    assert ev.cross.tolist() == [10.0]
    assert ev.sent.tolist() == [[7.0, 3.0]]
    assert ev.objective == pytest.approx((7 + 7) + 0.5 * 10)


def test_replicas_split_load_and_keep_local_copies():
    tr = _hand_trace()
    p = make_problem(tr, ep=2, replicas=2)           # 6 copies, 3 per rank; the two hottest get a copy
    assert p.copies.tolist() == [[2, 2, 1, 1], [1, 1, 2, 2]]
    X = to_matrix([[[0, 1, 2], [0, 1, 3]], [[3, 2, 0], [3, 2, 1]]], 4)
    ev = evaluate(p, X)
    assert ev.rank_load[0].tolist() == [2 + 1.5 + 2, 2 + 1.5 + 1]
    # 0 -> 3: both copies of 0 find a copy of 3 on their rank; 2 -> 1 and 3 -> 0 cross
    assert ev.cross[0] == pytest.approx(2 + 1)


def test_baselines_are_valid_placements():
    tr = synthetic_trace(12, 3, 2, 200, seed=0)
    for R in (0, 4):
        p = make_problem(tr, 4, replicas=R)
        for X in (round_robin(p), random_placement(p, 1)):
            check_assignment(to_assignment(X), 3, 4, 12, R)
    p = make_problem(tr, 4)
    assert to_assignment(round_robin(p))[0] == [[0, 4, 8], [1, 5, 9], [2, 6, 10], [3, 7, 11]]


@pytest.mark.parametrize("ep, replicas, match", [
    (16, 0, "exceed num_experts"), (5, 0, "not divisible"), (4, -1, "replicas"), (0, 0, "ep"),
])
def test_infeasible_sizes_say_what_to_relax(ep, replicas, match):
    with pytest.raises(InputError, match=match) as err:
        make_problem(synthetic_trace(8, 2, 1, 50, seed=0), ep, replicas)
    assert "\n" not in err.value.message


# ----- exact ILP and bounds -------------------------------------------------------------------------
def _brute_force(p) -> float:
    """Enumerate every placement of a tiny instance (no replicas)."""
    E, G = p.num_experts, p.ep
    layer_options = []
    for perm in itertools.permutations(range(E)):
        Xl = np.zeros((E, G), dtype=bool)
        Xl[list(perm), np.arange(E) % G] = True
        layer_options.append(Xl)
    uniq = {x.tobytes(): x for x in layer_options}.values()
    return min(evaluate(p, np.stack(c)).objective for c in itertools.product(list(uniq), repeat=p.num_layers))


def test_exact_ilp_matches_brute_force_and_bounds_hold():
    tr = synthetic_trace(4, 3, 2, 60, skew=1.0, affinity=0.6, seed=2)
    p = make_problem(tr, 2)
    best = _brute_force(p)
    for solver in ("highs", "cbc"):
        res = solve_exact(p, 10, solver)
        assert res.optimal and res.objective == pytest.approx(best)
        assert evaluate(p, res.X).objective == pytest.approx(best)
    assert lower_bound(p)[0] <= best + 1e-9


def test_pair_cross_bound_is_valid():
    tr = synthetic_trace(6, 2, 1, 300, skew=0.5, affinity=0.5, seed=1)
    p = make_problem(tr, 2, comm_weight=1.0, load_weight=0.0)
    assert cross_bound(p, 0) <= _brute_force(p) + 1e-9          # objective is the cross count here
    assert (load_bound(p) >= p.load.sum(axis=1) / 2).all()


@pytest.mark.parametrize("E, G, L, k, skew, aff, R, seed", [
    (6, 2, 3, 1, 1.0, 0.7, 0, 0), (8, 4, 3, 2, 1.0, 0.8, 0, 1), (8, 2, 3, 2, 0.5, 0.5, 0, 2),
    (8, 4, 3, 1, 0.5, 0.9, 0, 3), (6, 4, 3, 1, 1.2, 0.8, 2, 4),
])
def test_search_finds_the_ilp_optimum_on_small_instances(E, G, L, k, skew, aff, R, seed):
    tr = synthetic_trace(E, L, k, 300, skew=skew, affinity=aff, seed=seed)
    p = make_problem(tr, G, replicas=R)
    exact = solve_exact(p, 30, "highs")
    assert exact.optimal
    # stop_at: the search returns as soon as it reaches the optimum (it cannot prove it)
    X, _ = search(p, time_limit_s=20, restarts=30, seed=0, stop_at=exact.objective)
    assert evaluate(p, X).objective == pytest.approx(exact.objective, rel=1e-6)


def test_strong_affinity_halves_traffic_with_balanced_load():
    tr = synthetic_trace(32, 8, 1, 16384, skew=0.5, affinity=0.9, seed=0)
    pl = solve_placement(tr, 4, method="search", time_limit_s=6, restarts=2)
    mine = placement_stats(tr, pl, 8192)
    rr = placement_stats(tr, round_robin(make_problem(tr, 4)), 8192)
    assert mine["cross_rank_tokens"] <= 0.5 * rr["cross_rank_tokens"]
    assert mine["max_load_ratio"] <= 1.05
    assert 0 <= pl.gap < 0.1 and pl.lower_bound <= pl.objective


def test_auto_uses_the_exact_ilp_when_small():
    tr = synthetic_trace(8, 3, 1, 300, skew=1.0, affinity=0.8, seed=0)
    pl = solve_placement(tr, 4, time_limit_s=20)
    assert pl.method == "exact" and pl.gap == pytest.approx(0.0, abs=1e-6)
    assert pl.objective == pytest.approx(pl.load_term + pl.comm_term)


# ----- statistics and placement file ----------------------------------------------------------------
def test_placement_stats_bytes_and_ratios():
    tr = synthetic_trace(8, 3, 2, 400, skew=0.8, affinity=0.5, seed=0)
    X = round_robin(make_problem(tr, 4))
    s = placement_stats(tr, X, bytes_per_token=100.0)
    assert s["a2a_bytes_per_rank_mean"] * 4 == pytest.approx(s["cross_rank_tokens"] / 2 * 100.0)
    assert s["a2a_bytes_per_rank_max"] >= s["a2a_bytes_per_rank_mean"]
    assert s["max_load_ratio"] >= 1.0 and s["worst_layer_load_ratio"] >= s["max_load_ratio"] - 1e-12
    assert 0 < s["cross_fraction"] < 1


def test_placement_file_roundtrip_and_validation(tmp_path):
    tr = synthetic_trace(8, 3, 1, 300, seed=0)
    pl = solve_placement(tr, 4, method="search", time_limit_s=2, restarts=1)
    pl.save(tmp_path / "p.json")
    back = ExpertPlacement.load_file(tmp_path / "p.json")
    assert back.assignment == pl.assignment and (back.matrix() == pl.matrix()).all()
    data = json.loads((tmp_path / "p.json").read_text())
    data["assignment"][1][0] = data["assignment"][1][0][:1]
    (tmp_path / "bad.json").write_text(json.dumps(data))
    with pytest.raises(InputError, match=r"assignment\[1\]\[0\] must hold 2"):
        ExpertPlacement.load_file(tmp_path / "bad.json")


def test_routing_cost_factors_for_the_cost_model():
    tr = synthetic_trace(16, 4, 1, 4000, skew=0.5, affinity=0.9, seed=1)
    base = routing_cost_factors(tr, 4)                          # the program's default placement
    assert base["load_imbalance"] > 1.0 and 0.8 < base["a2a_volume_factor"] < 1.2
    pl = solve_placement(tr, 4, method="search", time_limit_s=3, restarts=1)
    placed = routing_cost_factors(tr, 4, pl)
    assert placed["a2a_volume_factor"] < 0.5 * base["a2a_volume_factor"]
    assert placed["load_imbalance"] < base["load_imbalance"]
    with pytest.raises(InputError, match="ep=4, but the plan has 4 x 16 on ep=8"):
        pl.check_fits(4, 16, 8)


def test_default_baseline_is_the_emitted_programs_placement():
    """Without a placement, the cost factors and the `experts` baseline use the ranks the emitted
    program gives each expert (codegen's contiguous blocks), not round-robin."""
    from autopar.codegen.runtime_moe import contiguous_placement
    from autopar.planner.experts import contiguous

    tr = synthetic_trace(16, 4, 1, 4000, skew=0.5, affinity=0.9, seed=1)
    X = contiguous(make_problem(tr, 4))
    assert to_assignment(X)[0] == contiguous_placement(16, 4)
    program = ExpertPlacement(ep=4, num_experts=16, num_layers=tr.num_layers,
                              assignment=[contiguous_placement(16, 4)] * tr.num_layers)
    assert routing_cost_factors(tr, 4) == routing_cost_factors(tr, 4, program)
    rr = placement_stats(tr, round_robin(make_problem(tr, 4)), bytes_per_token=1.0)
    assert routing_cost_factors(tr, 4)["load_imbalance"] != pytest.approx(rr["max_load_ratio"])
    assert contiguous(make_problem(tr, 4, replicas=4)) is None
    with pytest.raises(InputError, match="ep: num_experts=16 \\+ replicas=0 is not divisible by ep=3"):
        routing_cost_factors(tr, 3)


# ----- CLI ----------------------------------------------------------------------------------------
def test_cli_experts_json_plot_and_out(tmp_path, capsys):
    synthetic_trace(16, 4, 1, 4000, skew=0.5, affinity=0.9, seed=1).save(tmp_path / "t.json")
    main(["experts", str(tmp_path / "t.json"), "--ep", "4", "--time-limit", "3", "--method", "search",
          "--out", str(tmp_path / "p.json"), "--plot", str(tmp_path / "h.png"), "--json"])
    report = json.loads(capsys.readouterr().out)
    for key in ("cross_rank_tokens", "round_robin_cross_rank_tokens", "max_load_ratio", "lower_bound", "gap",
                "solve_time_s", "default_cross_rank_tokens", "cross_rank_reduction_vs_default"):
        assert key in report
    assert report["cross_rank_tokens"] < 0.5 * report["round_robin_cross_rank_tokens"]
    assert ExpertPlacement.load_file(tmp_path / "p.json").ep == 4
    assert (tmp_path / "h.png").read_bytes()[:4] == b"\x89PNG"


def test_cli_experts_table_with_cbc(tmp_path, capsys):
    synthetic_trace(8, 2, 1, 200, seed=0).save(tmp_path / "t.json")
    main(["experts", str(tmp_path / "t.json"), "--ep", "2", "--solver", "cbc", "--method", "exact"])
    out = capsys.readouterr().out
    assert "round-robin" in out and "gap 0.00%" in out


def _bad_trace(tmp_path, mutate) -> str:
    data = json.loads(synthetic_trace(8, 3, 1, 100, seed=0).model_dump_json())
    mutate(data)
    (tmp_path / "t.json").write_text(json.dumps(data))
    return str(tmp_path / "t.json")


@pytest.mark.parametrize("mutate, argv, match", [
    (lambda d: d["load"].pop(), ["--ep", "2"], "load has shape"),
    (lambda d: d["transitions"][0][0].__setitem__(0, -5), ["--ep", "2"], "negative"),
    (lambda d: None, ["--ep", "16"], "exceed num_experts"),
    (lambda d: None, ["--ep", "2", "--solver", "glpk"], "solver"),
])
def test_cli_bad_input_one_line_exit_2(tmp_path, capsys, mutate, argv, match):
    path = _bad_trace(tmp_path, mutate)
    with pytest.raises(SystemExit) as exc:
        main(["experts", path, *argv])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and match in err and err.count("\n") == 1


def test_assignment_splits_copies_that_share_a_rank():
    from autopar.planner.experts_search import assign_layer

    tr = synthetic_trace(8, 2, 1, 400, skew=1.5, seed=0)
    p = make_problem(tr, 4, replicas=8)                        # hot experts get up to 4 copies
    rng = np.random.default_rng(0)
    for _ in range(20):
        gain = rng.random((8, 4)) * (rng.random((8, 4)) < 0.3) * 100   # ties push copies together
        Xl = assign_layer(p, 0, gain)
        assert (Xl.sum(axis=1) == p.copies[0]).all() and (Xl.sum(axis=0) == p.slots).all()
