"""The planner's search: equal to exhaustive enumeration on small spaces, sound bounds, known
answers on real models, and the nothing-fits report."""

from __future__ import annotations

import itertools
import random

import pytest
from pydantic import ValidationError
from test_partition import layouts, tiny_cost_model

from autopar import techniques
from autopar.core.strategy import Strategy
from autopar.cost_models.estimate import CostModel
from autopar.cost_models.layer_cost import RECOMPUTE_MODES
from autopar.cost_models.session import Inputs, build_cost_model
from autopar.errors import InputError
from autopar.planner import explain
from autopar.planner import search as S


# ----- exhaustive enumeration (independent of the planner's enumeration code) --------------------
def all_strategies(cm: CostModel, gb: int, fixed: dict):
    """Every Strategy that resolves and passes cm.check, with the planner's documented rules:
    tp and ep*etp inside a node; interleaved needs v | L, L/v >= pp, (pp-1) m >= v pp. GPipe is
    included (the planner leaves it out as never faster than 1F1B: this checks the claim)."""
    world, gpn, L = cm.cluster.world, cm.cluster.gpus_per_node, cm.num_layers
    spec = cm.spec
    eps = [(e, t) for e in range(1, 5) for t in range(1, 5)] if spec.is_moe else [(1, 1)]
    for tp, cp, pp, mbs, (ep, etp) in itertools.product(range(1, world + 1), range(1, world + 1),
                                                        range(1, world + 1), range(1, gb + 1), eps):
        if world % (tp * cp * pp) or gpn % tp or gpn % (ep * etp):
            continue
        for sp, zero, off, (sched, v) in itertools.product(
                (False, True), range(4), (False, True),
                [("1f1b", 1), ("gpipe", 1)] + [("interleaved", v) for v in range(2, L + 1)]):
            vals = dict(dp=-1, tp=tp, cp=cp, pp=pp, ep=ep, etp=etp, micro_batch=mbs, global_batch=gb,
                        sequence_parallel=sp, zero_stage=zero, offload_optimizer=off, schedule=sched, vpp=v)
            if any(vals[k] != x for k, x in fixed.items()):
                continue
            try:
                s = Strategy(**vals).resolve(world)
                cm.check(s)
                techniques.check(s, cm.spec, cm.seq_len, emitted=True)   # the search space is what emit runs
            except (InputError, ValidationError):
                continue
            m = s.num_micro_batches
            if sched == "interleaved" and (L % v or L // v < pp or (pp - 1) * m < v * pp):
                continue
            yield s


def exhaustive_best(cm: CostModel, gb: int, fixed: dict) -> float:
    modes = (fixed["recompute"],) if "recompute" in fixed else RECOMPUTE_MODES
    best = float("inf")
    for s in all_strategies(cm, gb, {k: v for k, v in fixed.items() if k != "recompute"}):
        for stages in layouts(cm.num_layers, s.pp, s.vpp):
            for rec in itertools.product(modes, repeat=cm.num_layers):
                e = cm.estimate(s, stages, list(rec))
                if e.feasible and e.step_time_s < best:
                    best = e.step_time_s
    return best


CASES = [  # (seed, layers, nodes, gpus per node, moe, usable MiB, global batch, fixed knobs)
    (1, 4, 1, 4, False, 450, 4, {"offload_optimizer": False, "zero_stage": 1}),
    (2, 4, 2, 2, False, 300, 4, {"offload_optimizer": False, "sequence_parallel": False, "zero_stage": 2}),
    (3, 4, 1, 2, False, 220, 8, {"zero_stage": 0}),
    (4, 3, 1, 4, True, 700, 4, {"offload_optimizer": False, "zero_stage": 3, "micro_batch": 1}),
    (5, 6, 1, 2, False, 500, 8, {"offload_optimizer": False, "zero_stage": 0, "micro_batch": 1}),
    (6, 4, 1, 4, False, 1000, 4, {"offload_optimizer": True, "zero_stage": 2, "recompute": "selective"}),
]


@pytest.mark.parametrize("seed,layers,nodes,gpn,moe,usable,gb,fixed", CASES)
def test_search_equals_exhaustive_enumeration(seed, layers, nodes, gpn, moe, usable, gb, fixed):
    # Acceptance: on small spaces the planner's best equals exhaustive enumeration of every
    # strategy x layout x per-layer recompute under the same cost model.
    cm = tiny_cost_model(seed, layers=layers, nodes=nodes, gpus_per_node=gpn, moe=moe, usable_mib=usable)
    expect = exhaustive_best(cm, gb, fixed)
    # the zero-bubble schedules are left out: their layouts are not enumerated here (test_zero_bubble.py)
    res = S.search(cm, gb, S.Constraints(fixed=dict(fixed), schedules=("1f1b", "gpipe", "interleaved")), top_k=3)
    assert expect < float("inf"), "the case should have a feasible plan"
    assert res.candidates, res.stats
    # the fastest candidate; the printed first may be a simpler one within 1% (planner/rank.py tie rule)
    # Exact (rel 1e-9) until the fitted stacks added compute slowed by overlapped communication
    # (CostModel.overlap_contention): estimate prices it after the partition, the partition DP's
    # objective does not hold it yet, so the search can miss the optimum by that term (open; see
    # docs/planner.md): the best is within that term of the optimum.
    best = min(res.candidates, key=lambda c: c.estimate.step_time_s)
    contention = best.estimate.time.get("comm_contention", 0.0)
    assert best.estimate.feasible and best.estimate.step_time_s <= expect + contention + 1e-12
    assert best.estimate.step_time_s >= expect * (1 - 1e-9)   # never better than the true optimum
    # listed by the estimate (rank.order), not by the partition's price, which leaves terms out (the
    # contention above; since bca667a, dp4 pp1's estimate is 8% above its price in the fixed1 case)
    times = [c.estimate.step_time_s for c in res.candidates]
    assert all(a <= b * 1.01 for i, a in enumerate(times) for b in times[i + 1:])
    for c in res.candidates:  # every reported plan is what estimate() says of it, but the contention term
        extra = c.estimate.time.get("comm_contention", 0.0)
        assert c.estimate.feasible and c.step_time_s * (1 - 1e-9) <= c.estimate.step_time_s
        assert c.estimate.step_time_s <= c.step_time_s + extra + 1e-12


def test_the_optimum_is_listed_under_a_step_overhead():
    # A constant per-step overhead (the Hopper refit's 0.05 s) puts every plan of a tiny model within the
    # tie rule's 1%: the simpler plans listed first pushed the optimum (dp2 pp2 GPipe, found by the search)
    # past top_k (search 0.050509 s vs exhaustive 0.050448 s in the fixed1 case); it must stay listed.
    cm = tiny_cost_model(2, layers=4, nodes=2, gpus_per_node=2, usable_mib=300)
    cm.stack = cm.timer.stack = cm.stack.model_copy(update={"step_overhead_s": 0.05})
    cons = S.Constraints(fixed={"offload_optimizer": False, "sequence_parallel": False, "zero_stage": 2},
                         schedules=("1f1b", "gpipe", "interleaved"))
    every = S.search(cm, 4, cons, top_k=100, exhaustive=True).candidates
    best = min(c.estimate.step_time_s for c in every)
    assert sum(c.estimate.step_time_s < best * 1.01 for c in every) > 3   # the tie band holds more than top_k
    assert min(c.estimate.step_time_s for c in S.search(cm, 4, cons, top_k=3).candidates) == best


def test_search_reports_its_work():
    cm = tiny_cost_model(1, layers=4, usable_mib=450)
    st = S.search(cm, 4, top_k=2).stats
    assert st.space > 0 and st.priced >= 1 and st.layer_pricings >= 1 and st.search_time_s > 0
    assert st.pruned_memory + st.enumerated <= st.space
    assert st.priced <= st.enumerated


@pytest.mark.parametrize("seed", range(6))
def test_memory_floor_never_exceeds_a_real_peak(seed):
    # The floor prunes before pricing, so it must be a lower bound of every layout's peak.
    rng = random.Random(seed)
    cm = tiny_cost_model(seed, layers=4, moe=seed % 2 == 1, usable_mib=400)
    for s in rng.sample(list(all_strategies(cm, 4, {})), 15):
        sh = S.Sharding(s.tp, s.cp, s.pp, s.dp, s.ep, s.etp, s.sequence_parallel, s.micro_batch)
        floor = S.floor_terms(cm, sh, RECOMPUTE_MODES).bytes(cm, sh, s.zero_stage, s.offload_optimizer,
                                                             S.min_in_flight(s.pp, s.num_micro_batches,
                                                                             s.schedule, s.vpp))
        for stages in layouts(cm.num_layers, s.pp, s.vpp):
            e = cm.estimate(s, stages, ["full"] * cm.num_layers)
            assert floor <= e.peak_bytes - e.memory_overhead + 1e-6


def test_layer_prices_do_not_depend_on_pp_or_dp():
    # search.pricing_key prices a sharding once for every dp and pp: check it on a MoE model,
    # where dp enters the expert GEMMs through dp / edp.
    cm = tiny_cost_model(3, layers=4, nodes=2, gpus_per_node=4, moe=True)
    a = Strategy.parse("dp=4,tp=2,pp=1,ep=2,mbs=1,gbs=8").resolve(8)
    b = Strategy.parse("dp=2,tp=2,pp=2,ep=2,mbs=1,gbs=8").resolve(8)
    key = S.pricing_key(S.Sharding(2, 1, 1, 4, 2, 1, False, 1))
    ref = cm.layer_costs(S.probe(key, 8))
    for s in (a, b):
        costs = cm.layer_costs(s)
        for i in range(cm.num_layers):
            assert costs[i].time("none") == pytest.approx(ref[i].time("none"), rel=1e-12)
            assert costs[i].act_bytes == pytest.approx(ref[i].act_bytes)


def test_constraints_narrow_the_space():
    cm = tiny_cost_model(2, layers=4, nodes=1, gpus_per_node=4, usable_mib=600)
    res = S.search(cm, 4, S.Constraints(fixed={"pp": 1, "zero_stage": 3}, max_tp=2), top_k=5)
    assert res.candidates
    for c in res.candidates:
        assert c.strategy.pp == 1 and c.strategy.zero_stage == 3 and c.strategy.tp <= 2
    assert S.search(cm, 4, S.Constraints(fixed={"cp": 1}), top_k=3).candidates[0].strategy.cp == 1
    with pytest.raises(InputError):
        S.Constraints(fixed={"bogus": 1})


def test_nothing_fits_reports_the_closest_configuration():
    cm = tiny_cost_model(1, layers=4, usable_mib=20)
    cons = S.Constraints(fixed={"offload_optimizer": False})   # with everything offloaded (CPUOffloadPolicy) it fits
    res = S.search(cm, 4, cons)
    e = explain.closest(cm, cons, 4)
    assert not res.candidates and e is not None and not e.feasible
    msg = explain.overflow_message(e)
    assert "nothing fits" in msg and "GiB over" in msg


# ----- known answers on real models (graph capture: a few seconds each) ------------------------
def _plan(model: str, nodes: int = 1, gpu: str = "h100-sxm", top_k: int = 2, **kw):
    cm, spec, cl, seq = build_cost_model(Inputs(model=model, gpu=gpu, nodes=nodes, **kw))
    from autopar.cost_models.session import default_global_batch

    return cm, S.search(cm, default_global_batch(cl.world, seq), top_k=top_k)


def test_gpt_1_3b_on_8_gpus_is_pure_data_parallel():
    _, res = _plan("gpt3-1.3b")
    s = res.candidates[0].strategy
    assert (s.dp, s.tp, s.pp, s.cp) == (8, 1, 1, 1)


def test_llama3_70b_on_8_gpus_gets_a_feasible_sharded_plan():
    # 70B x 16 bytes of mixed-precision Adam state is 1.1 TB: it fits 8 x 80 GB only with the
    # optimizer states offloaded to the host and the rest sharded.
    _, res = _plan("llama3-70b")
    best = res.candidates[0]
    assert best.estimate.feasible
    s = best.strategy
    assert s.zero_stage == 3 or s.tp * s.pp > 1


def test_moe_with_dominant_experts_uses_expert_parallelism():
    # 64 experts of width 8192 on h = 1024 over 8 layers: 12.9B expert parameters, ~99% of the
    # model; their 206 GB of states cannot sit on every GPU of a node of 8 x 80 GB.
    from autopar.cost_models.templates import build_templates
    from autopar.profiles.hw import default_cluster_for_gpu, load_gpu_profile
    from autopar.profiles.intake import preset

    spec = preset("moe-tiny").model_copy(update={
        "name": "moe-experts-heavy", "hidden": 1024, "heads": 8, "kv_heads": 8, "head_dim": 128, "layers": 8,
        "num_experts": 64, "moe_ffn_hidden": 8192, "first_dense_layers": 0, "shared_experts": 0,
        "max_seq_len": 2048, "vocab": 32000})
    cluster = default_cluster_for_gpu("h100-sxm", nodes=1, gpus_per_node=8)
    cm = CostModel(spec, cluster, 2048, build_templates(spec, 2048, "bf16"), load_gpu_profile("h100-sxm"))
    res = S.search(cm, 64, S.Constraints(fixed={"offload_optimizer": False}), top_k=1)
    assert res.candidates and res.candidates[0].strategy.ep > 1


def test_405b_on_16_gpus_does_not_fit_and_says_by_how_much():
    # without offload: CPUOffloadPolicy puts every state on the host, and host memory is not priced
    cons = S.Constraints(fixed={"offload_optimizer": False})
    cm, spec, cl, seq = build_cost_model(Inputs(model="llama3-405b", gpu="h100-sxm", nodes=2))
    from autopar.cost_models.session import default_global_batch

    res = S.search(cm, default_global_batch(cl.world, seq), cons, top_k=2)
    assert not res.candidates
    msg = explain.overflow_message(explain.closest(cm, cons, res.global_batch))
    assert "GiB over" in msg
    hints = explain.fit_suggestions(cm, cons, res.global_batch, max_nodes_factor=8)
    assert any("GPUs" in h for h in hints)
