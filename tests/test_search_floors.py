"""Floors the search reads before it partitions a configuration (planner/rank_floor.py, planner/bounds.py) that
count what a GPU plan pays beyond its layers' prices: each stays under the price it bounds, and each binds
somewhere (the search prunes with it)."""

from __future__ import annotations

from autopar.core.strategy import Strategy
from autopar.cost_models.session import Inputs, build_cost_model
from autopar.planner import bounds
from autopar.planner import partition as part
from autopar.planner import rank_floor as rf
from autopar.planner import search as S


def test_the_slowest_rank_floor_counts_the_gradients_a_zero_bubble_stage_holds(monkeypatch):
    # zero-bubble FSDP2 (ZeRO-2 or offload) accumulates every stage parameter's unsharded gradient to the stage's
    # last backward (runtime_memory.deferred_fsdp_memory): the rank floor counts them whole, less the block the
    # estimate takes off the communication buffers; still under the partition's slowest rank, above the floor with
    # sharded gradients where memory binds (a 70B model: its gradients weigh against the activations)
    cm = build_cost_model(Inputs(model="llama3-70b", nodes=4, seq_len=4096))[0]
    gb = 64
    sp = bounds.Space(cm, S.Constraints(fixed={"schedule": "zb_interleaved", "zero_stage": 2, "micro_batch": 1}), gb)
    rows = []
    sp.push = lambda lb, kind, *payload: rows.append(payload)
    S._fill(sp)
    checked = raised = 0
    for sh, knobs in rows:
        for k in knobs:
            s = bounds.probe(sh, gb, k)
            assert rf._holds_grads(cm, s, k), s
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
    assert checked > 50 and raised > 10, (checked, raised)
