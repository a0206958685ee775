"""Expert placement for expert parallelism: which rank holds which expert of each MoE layer.

Model (see docs/experts.md). ``G`` expert-parallel ranks each hold ``m = (E + R) / G`` expert
copies per layer (``R`` replicas of hot experts; a replicated expert's tokens split evenly over
its copies). A token's hidden state stays on the rank of its layer-``l`` expert until its
layer-``l+1`` expert runs: a transition ``i -> j`` (one of a token's ``k*k`` expert pairs) *changes
rank* when no copy of ``j`` sits on the rank of the copy of ``i`` that served it.

Objective, in token-expert compute units::

    F = a * sum_l max_r load_l(r)  +  w * sum_l cross_l

``load_l(r)``: token copies computed by rank ``r`` in layer ``l`` (the straggler sets the layer
time); ``cross_l``: transitions ``l -> l+1`` that change rank. ``a = load_weight`` (1),
``w = comm_weight`` (default ``a2a_cost / (G * k)``: ``k*k`` pairs carry ``k`` token copies and
the all-to-all spreads them over ``G`` ranks; ``a2a_cost`` = time to move one token copy over
the time to compute it on one expert).

Lower bound (valid for the chosen replica counts): ``a * sum_l LB_load_l + w * sum_l LB_cross_l``
where each term is minimised alone, see ``experts_bound``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from autopar.errors import InputError
from autopar.profiles.routing import RoutingTrace


@dataclass
class Problem:
    """A placement instance: counts as floats, copy counts fixed, weights resolved."""

    load: np.ndarray            # [L, E] token copies per expert
    trans: np.ndarray           # [L-1, E, E] transition counts
    copies: np.ndarray          # [L, E] copies of each expert (1 + its replicas)
    ep: int
    topk: int
    load_weight: float = 1.0
    comm_weight: float = 0.0
    _flow: np.ndarray | None = field(default=None, repr=False)

    @property
    def num_layers(self) -> int:
        return self.load.shape[0]

    @property
    def num_experts(self) -> int:
        return self.load.shape[1]

    @property
    def slots(self) -> int:
        return int(self.copies[0].sum()) // self.ep

    @property
    def copy_load(self) -> np.ndarray:
        """[L, E] load one copy carries (replicas share evenly)."""
        return self.load / self.copies

    @property
    def flow(self) -> np.ndarray:
        """[L-1, E, E] transitions leaving one copy of i (``C[l][i][j] / n_l[i]``)."""
        if self._flow is None:
            self._flow = self.trans / self.copies[:-1, :, None]
        return self._flow


def make_problem(trace: RoutingTrace, ep: int, replicas: int = 0, a2a_cost: float = 1.0,
                 load_weight: float = 1.0, comm_weight: float | None = None) -> Problem:
    """Validate sizes, pick replica counts (hot experts first) and resolve the weights."""
    E = trace.num_experts
    if ep < 1:
        raise InputError(f"ep: {ep} must be >= 1")
    if replicas < 0:
        raise InputError(f"replicas: {replicas} must be >= 0")
    if ep > E + replicas:
        raise InputError(f"ep: {ep} ranks exceed num_experts={E} + replicas={replicas}; "
                         f"lower --ep or pass --replicas {ep - E} or more")
    if (E + replicas) % ep:
        raise InputError(f"ep: num_experts={E} + replicas={replicas} is not divisible by ep={ep}; "
                         f"every rank holds the same number of experts, so choose --replicas so that it is")
    if replicas > E * (ep - 1):
        raise InputError(f"replicas: {replicas} is more than every expert on every rank; use at most {E * (ep - 1)}")
    load = trace.load_array.astype(np.float64)
    copies = np.stack([replica_counts(row, replicas, ep) for row in load])
    w = a2a_cost / (ep * trace.topk) if comm_weight is None else comm_weight
    return Problem(load=load, trans=trace.transitions_array.astype(np.float64), copies=copies, ep=ep,
                   topk=trace.topk, load_weight=load_weight, comm_weight=w)


def replica_counts(load: np.ndarray, replicas: int, ep: int) -> np.ndarray:
    """Give each replica to the expert whose copies carry the most load (at most ``ep`` copies)."""
    n = np.ones(len(load), dtype=np.int64)
    for _ in range(replicas):
        per = np.where(n < ep, load / n, -1.0)
        n[int(np.argmax(per))] += 1
    return n


# ----- evaluation ---------------------------------------------------------------------
@dataclass
class Evaluation:
    rank_load: np.ndarray       # [L, G]
    cross: np.ndarray           # [L-1] transitions that change rank
    sent: np.ndarray            # [L-1, G] transitions leaving each rank
    objective: float

    @property
    def max_load(self) -> np.ndarray:
        return self.rank_load.max(axis=1)


def evaluate(p: Problem, X: np.ndarray) -> Evaluation:
    """Objective parts of placement ``X[l, e, r]`` (1 = a copy of e on rank r)."""
    Xf = X.astype(np.float64)
    rank_load = np.einsum("le,ler->lr", p.copy_load, Xf)
    L, G = p.num_layers, p.ep
    cross, sent = np.zeros(L - 1), np.zeros((L - 1, G))
    for l in range(L - 1):
        S = Xf[l].T @ p.flow[l]                            # [G, E]: from rank r to expert j
        sent[l] = S.sum(axis=1) - (S * Xf[l + 1].T).sum(axis=1)
        cross[l] = sent[l].sum()
    obj = p.load_weight * rank_load.max(axis=1).sum() + p.comm_weight * cross.sum()
    return Evaluation(rank_load=rank_load, cross=cross, sent=sent, objective=float(obj))


def to_matrix(assignment: list[list[list[int]]], num_experts: int) -> np.ndarray:
    """``assignment[l][r] -> expert ids`` -> ``X[l, e, r]``."""
    L, G = len(assignment), len(assignment[0])
    X = np.zeros((L, num_experts, G), dtype=bool)
    for l, ranks in enumerate(assignment):
        for r, experts in enumerate(ranks):
            X[l, experts, r] = True
    return X


def to_assignment(X: np.ndarray) -> list[list[list[int]]]:
    return [[np.nonzero(X[l, :, r])[0].tolist() for r in range(X.shape[2])] for l in range(X.shape[0])]


# ----- baselines ----------------------------------------------------------------------
def round_robin(p: Problem) -> np.ndarray:
    """Expert copies dealt to ranks in id order (copy c of expert e after all earlier copies)."""
    X = np.zeros((p.num_layers, p.num_experts, p.ep), dtype=bool)
    for l in range(p.num_layers):
        ids = np.repeat(np.arange(p.num_experts), p.copies[l])
        _deal(X[l], ids)
    return X


def random_placement(p: Problem, seed: int = 0) -> np.ndarray:
    """Round-robin over a random expert order per layer (copies of one expert stay adjacent)."""
    rng = np.random.default_rng(seed)
    X = np.zeros((p.num_layers, p.num_experts, p.ep), dtype=bool)
    for l in range(p.num_layers):
        order = rng.permutation(p.num_experts)
        _deal(X[l], np.repeat(order, p.copies[l][order]))
    return X


def _deal(Xl: np.ndarray, ids: np.ndarray) -> None:
    """Slot s goes to rank s % G; adjacent copies of one expert land on distinct ranks (n <= G)."""
    Xl[ids, np.arange(len(ids)) % Xl.shape[1]] = True


# ----- lower bound ----------------------------------------------------------------------
def load_bound(p: Problem) -> np.ndarray:
    """[L] lower bound of each layer's straggler load: the mean, and the rank holding the
    heaviest copy, which also holds ``m - 1`` other copies (at least the lightest ones)."""
    out = np.zeros(p.num_layers)
    m = p.slots
    for l in range(p.num_layers):
        c = np.sort(np.repeat(p.copy_load[l], p.copies[l]))
        out[l] = max(c.sum() / p.ep, c[-1] + c[: m - 1].sum())
    return out


def cross_bound(p: Problem, l: int) -> float:
    """Lower bound of the transitions ``l -> l+1`` that change rank, that pair alone.

    Co-location is relaxed to a bipartite b-matching: ``s_ij`` = ranks holding both i and j,
    ``sum_j s_ij = n_i m`` and ``sum_i s_ij = n_j m`` (every rank holds m copies of each layer),
    ``0 <= s_ij <= min(n_i, n_j)``. A real placement is such a matching (a union of ``G``
    complete bipartite blocks), so the max-weight matching bounds the co-located flow; the
    constraint matrix is an incidence matrix (totally unimodular), so the LP is exact.
    """
    from scipy.optimize import linprog
    from scipy.sparse import coo_matrix

    W = p.flow[l]
    rows, cols = np.nonzero(W)
    if len(rows) == 0:
        return 0.0
    n0, n1, m, E = p.copies[l], p.copies[l + 1], p.slots, p.num_experts
    k = np.arange(len(rows))
    A = coo_matrix((np.ones(2 * len(rows)), (np.concatenate([rows, E + cols]), np.concatenate([k, k]))),
                   shape=(2 * E, len(rows))).tocsr()
    b = np.concatenate([n0 * m, n1 * m]).astype(np.float64)
    ub = np.minimum(n0[rows], n1[cols]).astype(np.float64)
    res = linprog(-W[rows, cols], A_ub=A, b_ub=b, bounds=np.stack([np.zeros_like(ub), ub], 1), method="highs")
    if res.status != 0:
        raise RuntimeError(f"b-matching LP failed: {res.message}")
    return max(0.0, float(W.sum() + res.fun))


def lower_bound(p: Problem) -> tuple[float, np.ndarray, np.ndarray]:
    """(bound on F, per-layer load bounds, per-pair cross bounds)."""
    lb_load = load_bound(p)
    lb_cross = np.array([cross_bound(p, l) for l in range(p.num_layers - 1)])
    return float(p.load_weight * lb_load.sum() + p.comm_weight * lb_cross.sum()), lb_load, lb_cross
