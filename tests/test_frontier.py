"""planner.frontier: the incremental recompute frontier equals the enumerated one, point for point."""

from __future__ import annotations

import random

import numpy as np
import pytest

from autopar.planner import frontier as fr


def _fresh(n, acts, dts):
    """The incremental path with no cached levels (the by-value caches are module-wide)."""
    assert fr._incremental_ok(n, acts, dts)
    return fr._Levels(acts, dts).frontier(n).as_list()


def _cases(seed: int, count: int):
    """Mode values with the ties that decide the tie rule: identical modes, several t = 0 modes,
    equal seconds with other bytes, commensurate seconds (t3 = 2 t2) and equal bytes."""
    rng = random.Random(seed)
    for _ in range(count):
        k = rng.randint(1, 4)
        acts = [float(rng.choice([rng.randrange(1, 40) * 2 ** 20, 3 * 2 ** 20, 6 * 2 ** 20])) for _ in range(k)]
        dts = [rng.choice([0.0, rng.uniform(1e-4, 0.1), 0.0125, 0.025]) for _ in range(k)]
        if k > 1 and rng.random() < 0.4:           # an identical pair of modes
            i, j = rng.sample(range(k), 2)
            acts[j], dts[j] = acts[i], dts[i]
        yield rng.randint(0, 28), tuple(acts), tuple(dts)


@pytest.mark.parametrize("seed", range(4))
def test_incremental_equals_enumerated(seed):
    for n, acts, dts in _cases(seed, 60):
        assert _fresh(n, acts, dts) == fr.enumerated(n, acts, dts), (n, acts, dts)


@pytest.mark.parametrize("seed", range(2))
def test_grown_levels_equal_every_split(seed, monkeypatch):
    # frontier() takes every split of the classes up to fr.DIRECT of them, else (first ask) two halves,
    # else grows S(n): each path gives the enumerated frontier (at these sizes the default takes the first;
    # here, after a first ask, the last)
    monkeypatch.setattr(fr, "DIRECT", 0)
    for n, acts, dts in _cases(seed + 10, 40):
        levels = fr._Levels(acts, dts)
        levels.frontier(1)
        assert levels.frontier(n).as_list() == fr.enumerated(n, acts, dts), (n, acts, dts)
        assert len(levels.levels) > n or n <= 1


def test_both_paths_at_80_layers():
    # three classes at 80 layers (3,321 splits: taken whole); the same levels grown one by one
    acts, dts = (1427144704.0, 1427144704.0, 839909376.0, 83886080.0), (0.0, 0.0, 0.04630859294634476,
                                                                         0.09307864491193396)
    levels = fr._Levels(acts, dts)
    whole = [levels.frontier(n).as_list() for n in (80, 41)]
    grown = fr._Levels(acts, dts)
    for _ in range(80):   # frontier(n) then reads the grown levels
        grown.levels.append(grown._grow(grown.levels[-1]))
    assert whole == [grown.frontier(n).as_list() for n in (80, 41)]


@pytest.mark.parametrize("seed", range(2))
def test_halves_equal_every_split(seed):
    # the first large n of a build comes from two halves (frontier._Levels._halves), later ones from grown levels
    for n, acts, dts in _cases(seed + 20, 30):
        n += 30   # past fr.DIRECT splits for three and four classes
        if not fr._incremental_ok(n, acts, dts):
            continue
        levels = fr._Levels(acts, dts)
        assert levels.frontier(n).as_list() == fr.enumerated(n, acts, dts), (n, acts, dts)
        assert levels.frontier(n - 1).as_list() == fr.enumerated(n - 1, acts, dts), (n - 1, acts, dts)


def test_every_level_of_one_build_equals_enumerated():
    acts, dts = (1427144704.0, 1427144704.0, 839909376.0, 83886080.0), (0.0, 0.0, 0.04630859294634476,
                                                                         0.09307864491193396)
    levels = fr._Levels(acts, dts)
    for n in range(0, 41):
        assert levels.frontier(n).as_list() == fr.enumerated(n, acts, dts), n


def test_the_530b_modes_at_105_layers():
    """The awkward 530B's layer (none and selective identical; op and full add time) at its full depth."""
    acts, dts = (1762721792.0, 1762721792.0, 756023296.0, 167772160.0), (0.0, 0.0, 0.048683694829147584,
                                                                         0.09460888599473677)
    got = _fresh(105, acts, dts)
    assert got == fr.enumerated(105, acts, dts)
    assert all(c[0] == 0 for _, _, c in got)      # the tie rule gives the identical pair's layers to selective
    assert [p[1] for p in got] == sorted((p[1] for p in got), reverse=True)


def test_enumeration_order_is_the_sort_key():
    """``key_modes`` names the columns whose counts order ``enumerate_splits`` (the tie rule)."""
    for k in range(1, 5):
        for n in (0, 1, 5):
            x = fr.enumerate_splits(n, k)
            keys = [tuple(row[j] for j in fr.key_modes(k)) for row in x.tolist()]
            assert keys == sorted(keys) and len(set(keys)) == len(keys), (n, k)


def test_values_outside_the_incremental_path_are_enumerated():
    acts, dts = (1000.5, 10.25, 3.0), (0.0, 0.01, 0.02)       # fractional bytes: no exact-sum guarantee
    assert not fr._incremental_ok(12, acts, dts)
    assert fr.group_frontier(12, acts, dts) == fr.enumerated(12, acts, dts)
    assert not fr._incremental_ok(fr.CAP + 1, (1.0, 2.0), (0.0, 1.0))


def test_frontier_is_pareto_and_covers_every_split():
    """Independent of the code under test: every split is matched or beaten by a frontier point."""
    acts, dts = (50.0, 30.0, 20.0, 5.0), (0.0, 0.01, 0.015, 0.04)
    got = fr.group_frontier(9, acts, dts)
    pts = np.array([(a, t) for a, t, _ in got])
    for row in fr.enumerate_splits(9, 4).tolist():
        a = sum(c * v for c, v in zip(row, acts))
        t = sum(c * v for c, v in zip(row, dts))
        assert ((pts[:, 0] <= a) & (pts[:, 1] <= t + 1e-12)).any()
    assert all(sum(c) == 9 for _, _, c in got)
