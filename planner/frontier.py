"""Recompute frontier of ``n`` identical layers, built incrementally in ``n`` (exact, not approximate).

Problem (``recompute._group_frontier``). ``n`` identical layers, ``k`` allowed modes; mode ``j`` saves
``a[j]`` activation bytes and adds ``t[j]`` seconds per layer. A split is a count vector ``x``
(``x[j] >= 0``, ``sum x = n``) with bytes ``A(x)`` and seconds ``T(x)``. The frontier: every split,
in order of ``(A, T, rank)`` (``rank``: the split's position in ``enumerate_splits``, the tie rule),
kept when its ``T`` is strictly below that of every split before it. Enumerating all
``C(n + k - 1, k - 1)`` splits (``enumerated``) is O(n^3) points for four modes: up to 176,851 at
n = 100, sorted once per frontier (7.6 of 19.6 s of the awkward 530B plan under cProfile).

Values. Modes with identical ``(a, t)`` form one class (classes in order of their first mode) and
``y`` counts the layers of each class. ``A(x) = sum_c y[c] a[c]`` and ``T(x) = (y[0] t[0] + y[1] t[1])
+ ...``, each product rounded, summed left to right over classes. The bytes are whole numbers below
2^53 (checked; else ``enumerated`` runs), so ``A`` is exact in any order. (The former ``counts @ t``
went through BLAS, whose summation order depends on a row's position and the thread count; where at
most two classes add time, as in every frontier the built-in plans build, both formulas agree.)

Incremental superset ``S(n)`` (``_Levels``), with a constant margin ``tau`` = 2 E, ``E`` a bound on
``|T(x) - t(x)|`` (``t``: the exact real sum) for every ``n <= CAP``:

- ``R(n)``: the splits ``x`` for which no split ``y`` has ``A(y) <= A(x)`` and ``t(y) < t(x) - tau``.
  The frontier ``F(n)`` lies in ``R(n)``: such a ``y`` has ``T(y) < T(x)`` and comes before ``x``.
- ``R(n)`` lies in ``{y + e_c : y in R(n - 1)}``: if ``x - e_c`` (``x[c] > 0``) were beaten by ``z`` by
  the margin, ``z + e_c`` would beat ``x`` by it (``A`` and ``t`` are exactly additive).
- ``S(n)``: the extensions of ``S(n - 1)`` (deduplicated), less those some other extension ``y``
  beats with ``A(y) <= A(x)`` and ``T(y) < T(x) - 3 tau`` (which, with the rounding of that
  subtraction, still implies ``t(y) < t(x) - tau``, so nothing of ``R(n)`` is removed).
  By induction ``F(n) <= R(n) <= S(n)``.

Then ``F(n)`` is the frontier rule applied to ``S(n)`` alone: a split of ``S(n)`` outside ``F(n)``
has a split before it with ``T`` at most its own; the first such split in the order is in ``F(n)``,
hence in ``S(n)``. Within a class the layers go to its mode that comes last in the enumeration's
sort key (``_split_class``): of the splits with the same class counts (equal ``A`` and ``T``) that
one comes first. A class with ``t = 0`` and more bytes than another ``t = 0`` class never appears
(moving its layers there lowers ``A`` and leaves ``T``), so it is left out. ``S(n)`` is the frontier
plus the rare splits within ``3 tau`` (~1e-13 relative) of it: a few hundred points, not O(n^3).
The same argument holds for any set between ``F(n)`` and all splits, so where the classes' splits
number at most ``DIRECT`` (three classes up to n = 89) ``frontier`` takes them all, in one pass,
instead of growing ``n`` levels (the search's pp = 1 configurations built 80 levels per frontier); and
the first large ``n`` a build is asked takes the sum of two halves' supersets, pruned (``_halves``).
"""

from __future__ import annotations

from functools import lru_cache
from math import comb

import numpy as np

Frontier = list[tuple[float, float, tuple]]  # (act bytes, extra time, counts per mode), bytes ascending

CAP = 1024                # the incremental path serves n <= CAP (the margin is sized for it)
DIRECT = 4096             # up to this many splits of the classes, take them all instead of growing S(n)
_EXACT = float(2 ** 53)   # whole-number byte sums below this are exact in floating point
_BY_VALUE: dict[tuple, Points] = {}       # frontiers by (n, bytes, seconds): shared by every search
_LEVELS: dict[tuple, _Levels] = {}        # incremental supersets by (bytes, seconds)


def group_frontier(n: int, acts: tuple[float, ...], dts: tuple[float, ...]) -> Frontier:
    """The frontier of ``n`` layers whose modes save ``acts`` bytes and add ``dts`` seconds
    (module docstring) as a list of points, cached by value: a pure function of its arguments."""
    return points(n, acts, dts).as_list()


class Points:
    """A frontier as parallel columns (bytes ascending, for bisection); ``merged[i]`` is point ``i``
    as a one-group merged frontier lists it, ``(bytes, seconds, (counts,))``, built on demand."""

    __slots__ = ("acts", "dts", "counts", "listed", "merged")

    def __init__(self, acts: list[float], dts: list[float], counts: np.ndarray):
        self.acts, self.dts, self.counts = acts, dts, counts
        self.listed: Frontier | None = None
        self.merged = _OneGroup(self)

    def as_list(self) -> Frontier:
        if self.listed is None:
            self.listed = list(zip(self.acts, self.dts, map(tuple, self.counts.tolist())))
        return self.listed


class _OneGroup:
    __slots__ = ("pts",)

    def __init__(self, pts: Points):
        self.pts = pts

    def __getitem__(self, i: int) -> tuple[float, float, tuple]:
        # 0.0 + x: the sums a merge from the empty frontier adds (``recompute._merged_frontier``)
        return 0.0 + self.pts.acts[i], 0.0 + self.pts.dts[i], (tuple(self.pts.counts[i].tolist()),)

    def __len__(self) -> int:
        return len(self.pts.acts)


def points(n: int, acts: tuple[float, ...], dts: tuple[float, ...]) -> Points:
    """``group_frontier`` as columns, cached by value."""
    key = (n, acts, dts)
    hit = _BY_VALUE.get(key)
    if hit is None:
        if len(_BY_VALUE) >= 4096:
            _BY_VALUE.clear()
        if _incremental_ok(n, acts, dts):
            levels = _LEVELS.get((acts, dts))
            if levels is None:
                if len(_LEVELS) >= 256:
                    _LEVELS.clear()
                levels = _LEVELS[acts, dts] = _Levels(acts, dts)
            hit = levels.frontier(n)
        else:
            hit = _enumerated_points(n, acts, dts)
        _BY_VALUE[key] = hit
    return hit


def _incremental_ok(n: int, acts: tuple[float, ...], dts: tuple[float, ...]) -> bool:
    """Whole, finite, non-negative bytes whose sums stay exact; finite seconds; ``n`` within the cap."""
    return (n <= CAP and all(np.isfinite(dts)) and all(a >= 0 and float(a).is_integer() for a in acts)
            and max(acts) * CAP < _EXACT)


# ----- values and order, shared by both paths ----------------------------------------------------
def classes(acts: tuple[float, ...], dts: tuple[float, ...]) -> list[list[int]]:
    """Modes with identical ``(bytes, seconds)``, grouped, in order of their first mode."""
    out: dict[tuple[float, float], list[int]] = {}
    for j, value in enumerate(zip(acts, dts)):
        out.setdefault(value, []).append(j)
    return list(out.values())


def _values(y: np.ndarray, ca: np.ndarray, ct: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(A, T)`` of class counts ``y`` [points, classes]: each product rounded, summed left to right."""
    a, t = y[:, 0] * ca[0], y[:, 0] * ct[0]
    for c in range(1, y.shape[1]):
        a, t = a + y[:, c] * ca[c], t + y[:, c] * ct[c]
    return a, t


def key_modes(k: int) -> list[int]:
    """The modes whose counts order ``enumerate_splits(n, k)`` (most significant first)."""
    if k == 1:
        return []
    if k == 2:
        return [0]
    if k == 3:
        return [1, 2]
    return [0] + [j + 1 for j in key_modes(k - 1)]


def _keep_first(a: np.ndarray, t: np.ndarray, rank_cols: list[np.ndarray]) -> np.ndarray:
    """Indices, in order of ``(a, t, rank)``, of the points whose ``t`` is strictly below every
    point's before them."""
    order = np.lexsort(tuple(reversed(rank_cols)) + (t, a))
    ts = t[order]
    best_before = np.concatenate(([np.inf], np.minimum.accumulate(ts)[:-1]))
    return order[ts < best_before]


def _as_points(a: np.ndarray, t: np.ndarray, x: np.ndarray, idx: np.ndarray) -> Points:
    return Points(a[idx].tolist(), t[idx].tolist(), x[idx])   # Python floats, bisectable


# ----- the reference: every split -----------------------------------------------------------------
def enumerated(n: int, acts: tuple[float, ...], dts: tuple[float, ...]) -> Frontier:
    """The frontier by its definition, over every split (O(n^(k-1)) points): the path for byte
    values the incremental one does not take, and the reference the tests check it against."""
    return _enumerated_points(n, acts, dts).as_list()


def _enumerated_points(n: int, acts: tuple[float, ...], dts: tuple[float, ...]) -> Points:
    x = enumerate_splits(n, len(acts))
    groups = classes(acts, dts)
    y = np.column_stack([x[:, g].sum(axis=1) for g in groups])
    a, t = _values(y, np.array([acts[g[0]] for g in groups]), np.array([dts[g[0]] for g in groups]))
    rank = np.arange(len(x))       # the enumeration order itself
    return _as_points(a, t, x, _keep_first(a, t, [rank]))


@lru_cache(maxsize=512)  # read-only: callers index and multiply, never write
def enumerate_splits(n: int, k: int) -> np.ndarray:
    """Every way to split ``n`` layers among ``k`` modes, one row each, in the order that breaks
    ties (``key_modes``)."""
    if k == 1:
        return np.array([[n]])
    if k > 3:  # the count of the first mode, then every split of the rest
        return np.vstack([np.column_stack([np.full(len(rest), first), rest])
                          for first in range(n + 1) for rest in [enumerate_splits(n - first, k - 1)]])
    a, b = np.meshgrid(np.arange(n + 1), np.arange(n + 1), indexing="ij")
    a, b = a.ravel(), b.ravel()
    if k == 2:
        keep = a + b == n
        return np.column_stack([a[keep], b[keep]])
    keep = a + b <= n
    a, b = a[keep], b[keep]
    return np.column_stack([n - a - b, a, b])


# ----- the incremental path -----------------------------------------------------------------------
class _Levels:
    """``S(0), S(1), ...`` (module docstring) of one set of modes, as class counts, grown on demand."""

    def __init__(self, acts: tuple[float, ...], dts: tuple[float, ...]):
        self.k = len(acts)
        groups = classes(acts, dts)
        zero = [g for g in groups if dts[g[0]] == 0.0]
        least = min(zero, key=lambda g: acts[g[0]]) if zero else None
        self.groups = [g for g in groups if dts[g[0]] != 0.0 or g is least]   # dominated t = 0 classes out
        self.ca = np.array([acts[g[0]] for g in self.groups])
        self.ct = np.array([dts[g[0]] for g in self.groups])
        # |T - t| <= (classes) * 2^-53 * sum |y t| <= 4 * CAP * max|t| * 2^-53 for every n <= CAP
        err = len(self.groups) * CAP * float(np.abs(self.ct).max()) * 2.0 ** -53
        self.cut = 6 * err     # 3 tau (tau = 2 E): T(y) < fl(T(x) - cut) still implies t(y) < t(x) - tau
        self.radix = (CAP + 1) ** np.arange(len(self.groups), dtype=np.int64)
        self.levels = [np.zeros((1, len(self.groups)), dtype=np.int64)]
        self.halves: dict[int, np.ndarray] = {}   # supersets of R(n) built from two halves (_halves)
        self.last = self._split_class()

    def _split_class(self) -> list[int]:
        """Per class, the mode that takes its layers: the one latest in the enumeration's sort key
        (or outside it), which puts the split with these class counts first among its equals."""
        key = key_modes(self.k)
        late = {j: (key.index(j) if j in key else len(key)) for j in range(self.k)}
        return [max(g, key=lambda j: late[j]) for g in self.groups]

    def frontier(self, n: int) -> Points:
        if len(self.levels) > n:
            y = self.levels[n]
        elif comb(n + len(self.groups) - 1, len(self.groups) - 1) <= DIRECT:
            y = enumerate_splits(n, len(self.groups))   # every split of the classes: a superset of S(n)
        elif len(self.levels) == 1 and not self.halves:   # the first large n asked (a rank holding every layer)
            y = self._halves(n)
        else:
            while len(self.levels) <= n:
                self.levels.append(self._grow(self.levels[-1]))
            y = self.levels[n]
        a, t = _values(y, self.ca, self.ct)
        x = np.zeros((len(y), self.k), dtype=np.int64)
        for c, j in enumerate(self.last):
            x[:, j] = y[:, c]
        rank_cols = [x[:, j] for j in key_modes(self.k)]
        return _as_points(a, t, x, _keep_first(a, t, rank_cols))

    def _halves(self, n: int) -> np.ndarray:
        """A superset of ``R(n)`` from two halves: a split of ``n`` none beats by the margin splits into
        two such splits of any sizes ``h`` and ``n - h`` (were a part beaten, the whole would be, ``A``
        and ``t`` being additive), so ``R(n) <= R(h) + R(n - h)``; the sums are pruned as ``_grow``
        prunes. Each half is every split where they are few, else halves again (log n sums, not n levels);
        later asks grow the levels (one sum of two halves costs some dozen levels)."""
        if n not in self.halves:
            cls = len(self.groups)
            if n <= 1 or comb(n + cls - 1, cls - 1) <= DIRECT:
                self.halves[n] = self._pruned(enumerate_splits(n, cls))
            else:
                lo, hi = self._halves(n // 2), self._halves(n - n // 2)
                self.halves[n] = self._pruned((lo[:, None, :] + hi[None, :, :]).reshape(-1, cls))
        return self.halves[n]

    def _grow(self, prev: np.ndarray) -> np.ndarray:
        """``S(n)`` from ``S(n - 1)``: every extension by one layer, deduplicated, less the points
        another extension beats by the margin (``A`` at most, ``T`` below by more than ``cut``)."""
        cls = len(self.groups)
        return self._pruned(np.vstack([prev + np.eye(cls, dtype=np.int64)[c] for c in range(cls)]))

    def _pruned(self, y: np.ndarray) -> np.ndarray:
        """The candidate splits ``y``, deduplicated, less those another candidate beats by the margin."""
        _, first = np.unique(y @ self.radix, return_index=True)
        y = y[first]
        a, t = _values(y, self.ca, self.ct)
        order = np.argsort(a, kind="stable")
        a_s, t_s = a[order], t[order]
        reach = np.searchsorted(a_s, a_s, side="right") - 1     # last point with A at most this one's
        best = np.minimum.accumulate(t_s)[reach]
        return y[order[~(best < t_s - self.cut)]]
