"""Stage partition and per-layer recompute: the DP against brute force on small random models.

The models are hand-made ``LayerTemplate``s (no graph capture) with random sizes, so the
cost model prices them in microseconds and every layout x recompute assignment can be
enumerated. ``tiny_cost_model`` is shared with tests/test_planner.py.
"""

from __future__ import annotations

import itertools
import random

import pytest

from autopar.core.model_spec import ModelSpec
from autopar.core.strategy import Strategy
from autopar.cost_models.estimate import CostModel
from autopar.cost_models.layer_cost import RECOMPUTE_MODES, LayerCost
from autopar.cost_models.layer_model import LayerTemplate, OpTerm, SavedTerm
from autopar.planner import partition as part
from autopar.planner import recompute as rc
from autopar.profiles.hw import default_cluster_for_gpu, load_gpu_profile

H, SEQ, MB = 64, 128, 2**20


def _block(rng: random.Random, indices: list[int], moe: bool = False) -> LayerTemplate:
    """A transformer-like block: attention core (selective recompute drops it), tp GEMMs,
    replicated norms, optionally experts; sizes scaled at random."""
    k = rng.uniform(0.5, 2.0)
    g = SEQ * H
    ops = [OpTerm("qkv", "gemm", "tp", 6 * g * H * k, 12 * g * H * k, 8 * g * k, gemm=(SEQ, 3 * H * k, H)),
           OpTerm("core", "attention", "tp", 4 * SEQ * g * k, 10 * SEQ * g * k, 6 * g * k, attn_core=True),
           OpTerm("wo", "gemm", "tp", 2 * g * H * k, 4 * g * H * k, 4 * g * k, gemm=(SEQ, H, H * k), tp_dim="k"),
           OpTerm("norm", "membound", "rep", 5 * g, 10 * g, 8 * g)]
    ffn = "expert" if moe else "tp"
    ops.append(OpTerm("w1", "gemm", ffn, 8 * g * H * k, 16 * g * H * k, 10 * g * k, gemm=(SEQ, 4 * H * k, H)))
    saved = [SavedTerm("x", 2 * g, "rep"), SavedTerm("qkv", 6 * g * k, "tp"),
             SavedTerm("probs", rng.uniform(2, 6) * SEQ * SEQ * 4, "tp", attn_core=True),
             SavedTerm("h", 8 * g * k, ffn), SavedTerm("mask", SEQ * SEQ, "rep", const=True)]
    scale = rng.uniform(20, 60) * MB / sum(t.bytes for t in saved)   # tens of MB per layer and sequence
    saved = [SavedTerm(t.name, t.bytes * scale, t.shard, t.attn_core, t.const) for t in saved]
    params = rng.uniform(1, 4) * 1e6
    return LayerTemplate(name="block" + ("_moe" if moe else ""), kind="block", indices=indices, is_moe=moe,
                         params_tp=params, params_rep=params / 50, params_expert=8 * params if moe else 0.0,
                         ops=ops, saved=saved, input_bytes=2 * g * scale)


def _edge(kind: str) -> LayerTemplate:
    g = SEQ * H
    return LayerTemplate(name=kind, kind=kind, indices=[], params_vocab=512 * H * 40,
                         ops=[OpTerm("lookup", "membound", "vocab", 0, 0, 4 * g)],
                         saved=[SavedTerm("out", 2 * g * 40, "rep")], temp_bytes=4 * MB if kind == "output" else 0)


def tiny_cost_model(seed: int, layers: int = 4, nodes: int = 1, gpus_per_node: int = 4, moe: bool = False,
                    usable_mib: float = 600, kinds: int = 2) -> CostModel:
    """A random small model on a small cluster whose GPU memory is scaled down so that
    memory binds: some layouts need recompute, some do not fit."""
    rng = random.Random(seed)
    groups = [list(range(layers))] if kinds == 1 else [list(range(layers // 2)), list(range(layers // 2, layers))]
    blocks = [_block(rng, idx, moe=moe and j == len(groups) - 1) for j, idx in enumerate(groups)]
    extra = dict(family="moe", num_experts=4, topk=2, moe_ffn_hidden=64, first_dense_layers=len(groups[0]),
                 ffn_hidden=256) if moe else dict(family="gpt", ffn_hidden=256)
    spec = ModelSpec(name=f"tiny{seed}", hidden=H, layers=layers, heads=4, kv_heads=4, vocab=512, max_seq_len=SEQ,
                     **extra)
    base = load_gpu_profile("h100-sxm")
    over = base.framework_overhead_bytes
    gpu = base.model_copy(update={"mem_capacity_bytes": int(over + usable_mib * MB / base.usable_mem_fraction)})
    cluster = default_cluster_for_gpu("h100-sxm", nodes=nodes, gpus_per_node=gpus_per_node)
    return CostModel(spec, cluster, SEQ, [_edge("embedding"), *blocks, _edge("output")], gpu)


def layouts(L: int, p: int, v: int):
    """Every layout of the planner's space: v periods of C = L/v layers, rank r holding the same
    c_r >= 1 consecutive positions of each period."""
    C = L // v
    for cuts in itertools.combinations(range(1, C), p - 1):
        counts = [b - a for a, b in zip((0, *cuts), (*cuts, C))]
        offs = [sum(counts[:r]) for r in range(p)]
        yield [(k * C + offs[r], k * C + offs[r] + counts[r]) for k in range(v) for r in range(p)]


def brute_force(cm: CostModel, s: Strategy, modes=RECOMPUTE_MODES) -> float:
    best = float("inf")
    for stages in layouts(cm.num_layers, s.pp, s.vpp):
        for rec in itertools.product(modes, repeat=cm.num_layers):
            e = cm.estimate(s, stages, list(rec))
            if e.feasible:
                best = min(best, e.step_time_s)
    return best


STRATEGIES = [  # (strategy on 4 GPUs, model seed, layers)
    ("dp=1,tp=1,pp=4,mbs=1,gbs=8", 1, 4), ("dp=2,tp=1,pp=2,mbs=2,gbs=8,zero=1", 1, 4),
    ("dp=1,tp=2,pp=2,mbs=1,gbs=4,sp=1", 2, 6), ("dp=2,tp=1,pp=2,vpp=2,schedule=interleaved,mbs=1,gbs=8", 3, 4),
    ("dp=2,tp=1,pp=2,mbs=1,gbs=8,zero=3", 4, 6), ("dp=4,tp=1,pp=1,mbs=1,gbs=8", 5, 4),
    ("dp=2,tp=1,pp=2,mbs=1,gbs=8,schedule=gpipe", 6, 4),
    ("dp=1,tp=1,pp=2,cp=2,vpp=3,schedule=interleaved,mbs=1,gbs=6", 7, 6),
]


@pytest.mark.parametrize("text,seed,layers", STRATEGIES)
def test_partition_dp_equals_brute_force(text, seed, layers):
    # The DP's layout + per-layer recompute is the best of every layout x recompute assignment,
    # and its predicted step time is exactly what estimate() says for it.
    for usable in (250, 600):
        cm = tiny_cost_model(seed, layers=layers, usable_mib=usable)
        s = Strategy.parse(text).resolve(cm.cluster.world)
        cm.check(s)
        expect = brute_force(cm, s)
        res = part.partition(cm, s)
        if expect == float("inf"):
            assert res is None
            continue
        # The DP prices everything but the SM contention of overlapped collectives, which estimate
        # adds after it (see test_planner.py): its optimum is at most the brute-force best, and the
        # estimate of its choice exceeds its own price by at most that contention, so the choice is
        # within the contention of the best.
        assert res is not None and res.step_time_s <= expect * (1 + 1e-9)
        e = cm.estimate(s, res.stages, res.layer_recompute)
        contention = e.time.get("comm_contention", 0.0)
        assert e.feasible and res.step_time_s * (1 - 1e-9) <= e.step_time_s <= res.step_time_s + contention + 1e-12
        assert e.step_time_s <= expect + contention + 1e-12
        # the DP's memory of every rank is the cost model's
        assert [r.mem_bytes for r in res.ranks] == pytest.approx([r.mem_bytes for r in e.ranks], rel=1e-9)


def test_some_case_needs_partial_recompute():
    # The brute-force cases above are only meaningful if memory binds: at least one of them
    # recomputes some layers but not all.
    mixed = 0
    for text, seed, layers in STRATEGIES:
        cm = tiny_cost_model(seed, layers=layers, usable_mib=250)
        res = part.partition(cm, Strategy.parse(text).resolve(cm.cluster.world))
        if res is not None and 0 < sum(m != "none" for m in res.layer_recompute) < layers:
            mixed += 1
    assert mixed >= 1


def test_upper_bound_prunes_only_worse_layouts():
    cm = tiny_cost_model(11, layers=6, usable_mib=400)
    s = Strategy.parse("dp=1,tp=1,pp=2,cp=2,mbs=1,gbs=8").resolve(cm.cluster.world)
    best = part.partition(cm, s)
    assert best is not None
    assert part.partition(cm, s, upper=best.step_time_s * 1.0001).step_time_s == pytest.approx(best.step_time_s)
    assert part.partition(cm, s, upper=best.step_time_s) is None


def _random_cost(rng: random.Random) -> LayerCost:
    fwd = rng.uniform(1, 2)
    act = {"none": rng.uniform(50, 100), "selective": rng.uniform(20, 60), "op": rng.uniform(10, 30),
           "full": rng.uniform(1, 10)}
    return LayerCost(fwd_s=fwd, bwd_s=2 * fwd, recompute_s={"none": 0.0, "selective": rng.uniform(0.1, 0.8),
                                                             "op": rng.uniform(0.2, 1.2), "full": fwd},
                     comm_s={}, recompute_comm_s=rng.uniform(0, 0.2), act_bytes=act,
                     work_bytes={"none": 0.0, "selective": rng.uniform(5, 40), "op": rng.uniform(10, 80),
                                 "full": rng.uniform(20, 120)},
                     params_dense=1.0, params_expert=0.0)


@pytest.mark.parametrize("seed", range(12))
def test_recompute_choice_equals_brute_force(seed):
    # recompute.choose against every per-layer assignment: in_flight * sum(act) + max(work) <= budget.
    rng = random.Random(seed)
    groups = [(_random_cost(rng), rng.randint(1, 3)) for _ in range(rng.randint(1, 3))]
    layers = [c for c, n in groups for _ in range(n)]
    in_flight = rng.choice([1, 2, 3.5])
    budget = rng.uniform(0.3, 1.1) * in_flight * sum(c.act_bytes["none"] for c in layers)
    best = None
    for modes in itertools.product(RECOMPUTE_MODES, repeat=len(layers)):
        mem = in_flight * sum(c.act_bytes[m] for c, m in zip(layers, modes)) + \
            max([c.work_bytes[m] for c, m in zip(layers, modes)] + [0.0])
        t = sum(rc.extra_time(c, m) for c, m in zip(layers, modes))
        if mem <= budget and (best is None or t < best):
            best = t
    got = rc.choose(groups, in_flight, budget)
    if best is None:
        assert got is None
    else:
        assert got is not None and got.extra_s == pytest.approx(best)
        assert in_flight * got.act_bytes + got.work_bytes <= budget * (1 + 1e-12)


def test_assign_puts_the_chosen_counts_on_layers():
    rng = random.Random(3)
    a, b = _random_cost(rng), _random_cost(rng)
    choice = rc.RecomputeChoice(0.0, 0.0, 0.0, ((1, 1, 1), (2, 0, 0)), ("none", "selective", "full"))
    got = rc.assign([[0, 1, 2], [3, 4]], choice)
    assert sorted(got.values()) == sorted(["full", "selective", "none", "none", "none"])
    assert got[0] == "full" and got[3] == "none"
    assert a is not b


def test_layouts_cover_every_contiguous_partition_without_interleaving():
    # v = 1: compositions of L into p positive parts, C(L-1, p-1) of them.
    assert len(list(layouts(6, 3, 1))) == 10
    assert all(st[0][0] == 0 and st[-1][1] == 6 for st in layouts(6, 3, 1))
    # v = 2: both chunks of a rank are equally long.
    for st in layouts(8, 2, 2):
        assert st[0][1] - st[0][0] == st[2][1] - st[2][0]


def _partition_counting(monkeypatch, cm, s, upper, screen: bool):
    """``partition`` with the stage DP's pre-pricing floor on or off, and the rank pricings it made."""
    from autopar.planner import stage_dp
    calls = []
    price = part.RankPricer._price
    with monkeypatch.context() as m:
        m.setattr(part.RankPricer, "_price", lambda self, *a: calls.append(a[0]) or price(self, *a))
        if not screen:
            m.setattr(stage_dp, "_hopeless", lambda *a: False)
            m.setattr(stage_dp, "_counts_to_try", lambda pr, r, o, lo, hi, *a: range(lo, hi + 1))
        return part.partition(cm, s, upper=upper), len(calls)


@pytest.mark.parametrize("text,kinds", [("dp=1,tp=1,pp=4,mbs=1,gbs=8", 1), ("dp=2,tp=1,pp=2,mbs=1,gbs=8,zero=3", 1),
                                        ("dp=1,tp=1,pp=4,mbs=1,gbs=2", 2), ("dp=2,tp=1,pp=2,mbs=2,gbs=4,zero=3", 2),
                                        ("dp=1,tp=1,pp=4,vpp=2,schedule=interleaved,mbs=1,gbs=8", 1)])
def test_ranks_skipped_by_the_floor_change_nothing(monkeypatch, text, kinds):
    """The DP prices a rank only when some label could pass the bound with it (stage_dp._hopeless,
    _counts_to_try): the layout, recompute and price are those of the DP that prices every rank,
    under no bound and under a bound near the optimum, and it prices no more ranks."""
    for seed, usable in ((21, 300), (22, 600)):
        cm = tiny_cost_model(seed, layers=16, usable_mib=usable, kinds=kinds)
        s = Strategy.parse(text).resolve(cm.cluster.world)
        best, _ = _partition_counting(monkeypatch, cm, s, part.INF, screen=False)
        for upper in (part.INF, best.step_time_s * 1.02 if best else part.INF):
            (a, n_all), (b, n_screened) = (_partition_counting(monkeypatch, cm, s, upper, x) for x in (False, True))
            assert (a is None) == (b is None)
            if a is not None:
                assert (a.counts, a.layer_recompute, a.step_time_s) == (b.counts, b.layer_recompute, b.step_time_s)
            assert n_screened <= n_all


def test_the_floor_skips_ranks():
    # 800 MiB: at 600 the prices of 11dba7d (after the final refit, 8816de6) leave no rank the floor can skip
    cm = tiny_cost_model(21, layers=16, usable_mib=800, kinds=1)
    s = Strategy.parse("dp=2,tp=1,pp=2,mbs=1,gbs=8,zero=3").resolve(cm.cluster.world)
    with pytest.MonkeyPatch.context() as mp:
        (a, n_all), (b, n_screened) = (_partition_counting(mp, cm, s, part.INF, x) for x in (False, True))
    assert a.counts == b.counts and n_screened < n_all
