"""The fit's options (benchmarks/calibrate_modern.py --hinge-at, --hinge-weight, --over-weight, --fine): each
changes the objective or the grids as its help says, and the defaults are the flags the shipped profiles were fitted
with (--over-weight 0.5 --fine 2), so a profile fitted with them names the plain command."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture
def cal(monkeypatch):
    sys.path.insert(0, str(BENCH))
    import calibrate_modern

    for name in ("OBJECTIVE", "HINGE_AT", "HINGE_WEIGHT", "OVER_WEIGHT"):  # set_fit_options writes these globals
        monkeypatch.setattr(calibrate_modern, name, getattr(calibrate_modern, name))
    monkeypatch.setattr(calibrate_modern, "GRIDS", {k: list(v) for k, v in calibrate_modern.GRIDS.items()})
    return calibrate_modern


def test_default_objective_is_mean_plus_excess_over_15_plus_half_the_share_over(cal):
    assert cal.set_fit_options("hinge") == ""
    errs = [(0.10, False), (-0.20, False), (0.152, False), (0.02, True)]
    a = [0.10, 0.20, 0.152, 0.02]
    assert cal.objective(errs) == pytest.approx(sum(a) / 4 + (0.05 + 0.002) / 4 + 0.5 * 2 / 4)
    assert cal.set_fit_options("hinge", over_weight=0.0) == " --over-weight 0"  # the count term off, named
    assert cal.objective(errs) == pytest.approx(sum(a) / 4 + (0.05 + 0.002) / 4)
    # a calibration row just outside its 10% band costs more than any other row could gain (the acceptance's band)
    out = [*errs[:3], (0.1002, True)]
    assert cal.objective(out) - cal.objective(errs) > 0.0002 / 4 + 100 * 0.0002 - 1e-9


def test_hinge_knee_weight_and_count_of_rows_over_15(cal):
    errs = [(0.10, False), (-0.20, False), (0.14, False), (0.02, True)]
    mean = (0.10 + 0.20 + 0.14 + 0.02) / 4
    flags = cal.set_fit_options("hinge", hinge_at=0.13, hinge_weight=2.0, over_weight=1.0)
    assert flags == " --hinge-at 0.13 --hinge-weight 2 --over-weight 1"  # what a written profile names
    assert cal.objective(errs) == pytest.approx(mean + 2.0 * (0.07 + 0.01) / 4 + 1.0 * 1 / 4)
    cal.set_fit_options("hinge")  # a row at 14% is under the bound: it is not counted
    assert cal.objective(errs) == pytest.approx(mean + 0.05 / 4 + 0.5 * 1 / 4)


def test_fine_grids_add_values_between_neighbours_only(cal):
    before = {k: list(v) for k, v in cal.GRIDS.items()}
    assert cal.set_fit_options("hinge", fine=1) == " --fine 1"  # the coarse grids, as defined
    assert cal.GRIDS == before
    assert cal.set_fit_options("hinge") == ""  # the default refines once (--fine 2), however often it is set
    assert cal.set_fit_options("hinge") == ""
    for name, grid in cal.GRIDS.items():
        old = before[name]
        if isinstance(old[0], bool):
            assert grid == old
            continue
        assert set(old) <= set(grid) and min(grid) == min(old) and max(grid) == max(old)  # no wider range
        assert len(grid) == 2 * len(old) - 1 and grid == sorted(grid)
    assert 0.15 in cal.GRIDS["tp_overlap"] and 0.45 in cal.GRIDS["tp_overlap"]
