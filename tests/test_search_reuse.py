"""What the search works out once and reads again gives what working it out again gives (issue 15, the same
answers): ``groups.holds_grads`` against ``fsdp.plan_holds_stage_grads`` of the probe, and a group's gradient-sync
floors (``groups.expand_row``), which ``expand_group`` reads instead of asking ``grad_sync_floor`` again."""

from __future__ import annotations

import pytest

from autopar.cost_models.fsdp import plan_holds_stage_grads
from autopar.cost_models.session import Inputs, build_cost_model
from autopar.planner import bounds, groups
from autopar.planner.search import Constraints, knob_options, shardings
from autopar.planner.space import Knobs, Sharding


@pytest.fixture(scope="module")
def cm():
    return build_cost_model(Inputs(model="llama-tiny", gpu="h100-sxm", nodes=2))[0]


def test_holds_grads_is_the_probes_rule(cm):
    seen = set()
    for pp in (1, 2, 4):
        for dp, cp in ((1, 1), (2, 1), (1, 2), (4, 2)):
            sh = Sharding(1, cp, pp, dp, 1, 1, False, 1)
            for zero in range(4):
                for offload in (False, True):
                    for schedule, vpp in (("1f1b", 1), ("interleaved", 2), ("zbv", 2), ("zb_interleaved", 2)):
                        k = Knobs(zero, offload, schedule, vpp)
                        want = plan_holds_stage_grads(cm, bounds.probe(sh, 64, k))
                        assert groups.holds_grads(cm, sh, k) == want, (sh, k)
                        seen.add(want)
    assert seen == {True, False}


def test_a_group_carries_its_configurations_sync_floors(cm):
    gb, checked = 64, 0
    sp = bounds.Space(cm, Constraints(), gb)
    for row in shardings(cm, sp.cons, gb):
        for sh in row[:2]:
            knobs = knob_options(cm, sp.cons, sh, gb)
            pushed = []
            sp.push = lambda lb, kind, *payload: pushed.append((lb, kind, payload))   # noqa: B023
            groups.expand_row(sp, sh, knobs)
            fresh = bounds.Space(cm, Constraints(), gb)
            for _, _, (_, group) in list(pushed):
                for k, _, _, last_bucket, sync in group[0]:
                    assert (last_bucket, sync) == bounds.grad_sync_floor(fresh, sh, k, fresh.priced(sh))
                    checked += 1
                groups.expand_group(sp, sh, group)   # each configuration's own bound reads them
    assert checked > 50


def test_ranks_room_is_the_rank_by_rank_sum(cm):
    """``groups.ranks_room`` sums the ranks' room by class (first, last, the others: buffers linear in the in-flight
    count) where ``recompute_floor`` summed rank by rank: the same count in flight, a room at least the rank-by-rank
    sum (its margin) and within 1e-9 of it, over every pipelined row and schedule of a search."""
    from autopar.cost_models.pipeline import in_flight_microbatches
    from autopar.planner.bounds import probe
    from autopar.techniques import pipeline

    gb, checked = 64, 0
    sp = bounds.Space(cm, Constraints(), gb)
    for row in shardings(cm, sp.cons, gb):
        for sh in row:
            if sh.pp == 1:
                continue
            for k in sp.knobs(knob_options(cm, sp.cons, sh, gb)).schedules:
                m = gb // (sh.dp * sh.mbs)
                f = [in_flight_microbatches(r, sh.pp, m, k.schedule, k.vpp) for r in range(sh.pp)]
                last = pipeline.stage_rank(sh.pp * k.vpp - 1, sh.pp, k.schedule)
                bufs = [cm._pipeline_buffer_bytes(probe(sh, gb, k), r == 0, r == last, x) for r, x in enumerate(f)]
                want = max(f) * sum((sp.usable - b) / x for b, x in zip(bufs, f)) / sh.pp
                f_max, got = groups.ranks_room(sp, sh, k)
                assert f_max == max(f) and want <= got <= want + abs(want) * 1e-9 * 1.01, (sh, k, got, want)
                checked += 1
    assert checked > 50


def test_recompute_floor_is_the_larger_of_its_two_floors(cm):
    """``groups.recompute_floor`` works out ``Floor.recompute_time`` once, at the smaller of its two rooms: the same
    float as the larger of both (the fewest in flight with the mean room, the most in flight with each rank's),
    over every pipelined configuration of a search where memory binds somewhere."""
    gb, checked, binding = 64, 0, 0
    for usable in (1e6, 2e6, 4e6):   # tight (llama-tiny holds a few MB a rank): the floors are not all 0
        sp = bounds.Space(cm, Constraints(), gb)
        sp.usable = usable
        checked, binding = _both_floors(cm, sp, gb, checked, binding)
    assert checked > 100 and binding > 20, (checked, binding)


def _both_floors(cm, sp, gb: int, checked: int, binding: int) -> tuple[int, int]:
    for row in shardings(cm, sp.cons, gb):
        for sh in row:
            pr, m = sp.priced(sh), gb // (sh.dp * sh.mbs)
            for k in knob_options(cm, sp.cons, sh, gb):
                floor = groups.floor_for(sp, sh, groups.allowed_modes(sp.cons.modes, k.schedule, k.offload))
                in_flight, warm = bounds.min_in_flight(sh.pp, m, k.schedule, k.vpp), bounds.grads_freed(
                    sp, sh, k.schedule, k.vpp)
                f_max, usable = groups.ranks_room(sp, sh, k)
                want = max(floor.recompute_time(cm, sh, k, in_flight, sp.usable, pr.rc, warm),
                           floor.recompute_time(cm, sh, k, f_max, usable, pr.rc, warm))
                assert groups.recompute_floor(sp, sh, k, floor, in_flight, warm, pr.rc) == want, (sh, k)
                checked, binding = checked + 1, binding + (want > 0)
    return checked, binding
