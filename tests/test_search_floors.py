"""Floors the search reads before it partitions a configuration (planner/rank_floor.py, planner/bounds.py) that
count what a GPU plan pays beyond its layers' prices: each stays under the price it bounds, and each binds
somewhere (the search prunes with it)."""

from __future__ import annotations

from test_partition import tiny_cost_model

from autopar.core.strategy import Strategy
from autopar.cost_models.session import Inputs, build_cost_model
from autopar.planner import bounds, step_floors
from autopar.planner import partition as part
from autopar.planner import rank_floor as rf
from autopar.planner import search as S


def filled(cm, gb: int, cons: S.Constraints | None = None) -> tuple[bounds.Space, list[tuple]]:
    """A search's state after ``_fill`` and the (sharding, knobs) rows it queued."""
    sp = bounds.Space(cm, cons or S.Constraints(), gb)
    rows = []
    sp.push = lambda lb, kind, *payload: rows.append(payload)
    S._fill(sp)
    return sp, rows


def test_the_slowest_rank_floor_counts_the_gradients_a_zero_bubble_stage_holds(monkeypatch):
    # zero-bubble FSDP2 (ZeRO-2 or offload) accumulates every stage parameter's unsharded gradient to the stage's
    # last backward (runtime_memory.deferred_fsdp_memory): the rank floor counts them whole, less the block the
    # estimate takes off the communication buffers; still under the partition's slowest rank, above the floor with
    # sharded gradients where memory binds (a 70B model: its gradients weigh against the activations)
    cm = build_cost_model(Inputs(model="llama3-70b", nodes=4, seq_len=4096))[0]
    gb = 64
    sp, rows = filled(cm, gb, S.Constraints(fixed={"schedule": "zb_interleaved", "zero_stage": 2, "micro_batch": 1}))
    checked = raised = 0
    for sh, knobs in rows:
        for k in knobs:
            s = bounds.probe(sh, gb, k)
            assert rf._holds_grads(sp, sh, k), s
            modes = S.allowed_modes(sp.cons.modes, k.schedule, k.offload)
            x = rf._floor(sp, sh, k, modes)
            with monkeypatch.context() as m:
                m.setattr(rf, "_holds_grads", lambda *a: False)
                sharded = rf._floor(sp, sh, k, modes)
            st = Strategy(**s.model_dump()).resolve(cm.cluster.world)
            res = part.partition(cm, st, modes, part.INF, sp.priced(sh).costs)
            if res is None:   # nothing fits (the floor need not see it)
                continue
            assert x <= max(r.P for r in res.ranks) * (1 + 1e-12), (st.short(), x)
            checked, raised = checked + 1, raised + (x > sharded * (1 + 1e-3))
    assert checked > 40 and raised > 10, (checked, raised)   # 43 / 30 since d85f795 (torch checks 0.85 of memory)


def test_the_fsdp_copy_floor_stays_under_the_estimates_optimizer_term():
    # bounds.copy_floor: FSDP2's casts and copies of the mean rank at the fastest memory-bound rate; with the
    # optimizer floor, under the estimate's optimizer + fsdp_copy terms (its slowest rank's optimizer_time) of
    # every FSDP plan, and above 0 for them
    cm, _, _, _ = build_cost_model(Inputs(model="llama3-8b", nodes=1, seq_len=2048))
    gb = 64
    sp = bounds.Space(cm, S.Constraints(max_cp=2), gb)
    checked = 0
    for row in S.shardings(cm, sp.cons, gb):
        for sh in row[:1]:
            for k in S.knob_options(cm, sp.cons, sh, gb):
                pr = sp.priced(sh)
                floor = step_floors.copy_floor(sp, sh, k, pr)
                if floor == 0.0 and checked > 20:
                    continue
                cand = S._partitioned(sp, sh, k, part.INF)
                if cand is None:
                    continue
                e = cand.estimate or cm.estimate(cand.strategy, cand.stages, cand.layer_recompute)
                opt = S.step_optimizer_floor(sp, sh, k, pr)
                assert opt + floor <= (e.time["optimizer"] + e.time["fsdp_copy"]) * (1 + 1e-9), cand.strategy.short()
                checked += floor > 0
    assert checked > 20, checked


def test_llama3_8b_bounded_equals_exhaustive_with_fsdp():
    # ZeRO-2 and ZeRO-3 (FSDP2: its copies floored by bounds.copy_floor), every schedule they run under
    cm, _, _, _ = build_cost_model(Inputs(model="llama3-8b", nodes=1, seq_len=2048))
    for zero in (2, 3):
        cons = dict(fixed={"zero_stage": zero, "offload_optimizer": False, "micro_batch": 1}, max_cp=2)
        bounded = S.search(cm, 64, S.Constraints(**cons))
        every = S.search(cm, 64, S.Constraints(**cons), exhaustive=True)
        plans = [[(c.strategy.short(), c.stages, c.layer_recompute, c.estimate.step_time_s) for c in r.candidates]
                 for r in (bounded, every)]
        assert plans[0] and plans[0] == plans[1]
        assert bounded.stats.priced < every.stats.priced


def test_a_row_bound_scaled_from_a_larger_micro_batch_keeps_the_host_floor():
    # bounds.scaled_no_cp: a row's time at its micro-batch from the pricing at the largest one, scaled down, with
    # each layer's eager host launches (host_bound.layer_floor) as its floor: under the row's own pricing, and above
    # the plain scaled sum where the layers are host-bound (a tiny model on the H100 profile)
    cm = tiny_cost_model(0, layers=8, nodes=2, gpus_per_node=4, usable_mib=3000, kinds=2)
    gb = 16
    sp, rows = filled(cm, gb)
    checked = raised = 0
    for sh, _ in rows:
        pr, b, _ = sp.memo["probe", sh]
        if b == sh.mbs:
            continue
        total, block = step_floors.scaled_no_cp(sp, sh, pr, sh.mbs / b)
        own = sp.priced(sh)
        assert total <= own.total_no_cp * (1 + 1e-9) and block <= own.min_block_no_cp * (1 + 1e-9), sh
        checked, raised = checked + 1, raised + (total > pr.total_no_cp * sh.mbs / b * (1 + 1e-6))
    assert checked > 20 and raised > 10, (checked, raised)
