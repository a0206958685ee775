"""The expert-placement problem and its objective (shared by ``experts``, ``experts_search`` and
``experts_ilp``, so the solvers do not import the module that calls them)."""

from __future__ import annotations

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
                 load_weight: float = 1.0, comm_weight: float | None = None,
                 copies: np.ndarray | None = None) -> Problem:
    """Validate sizes, pick replica counts (hot experts first, unless ``copies`` is given)
    and resolve the weights."""
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
    if a2a_cost < 0 or load_weight < 0:
        raise InputError(f"weights: a2a_cost={a2a_cost} and load_weight={load_weight} must be >= 0")
    load = trace.load_array.astype(np.float64)
    if copies is None:
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


def contiguous(p: Problem) -> np.ndarray | None:
    """The emitted program's default: rank r holds experts [r*E/G, (r+1)*E/G) in every layer.

    The same ranks the cost model prices a trace on (``cost_models.moe_load.contiguous``), so the
    baseline ``autopar experts`` reports is what runs without ``--placement``. ``None`` when the
    problem has replicas (only a placement file places copies).
    """
    from autopar.cost_models.moe_load import contiguous as contiguous_ranks

    if (p.copies != 1).any() or p.num_experts % p.ep:
        return None
    ranks = contiguous_ranks(p.num_layers, p.num_experts, p.ep)
    X = np.zeros((p.num_layers, p.num_experts, p.ep), dtype=bool)
    X[np.arange(p.num_layers)[:, None], np.arange(p.num_experts)[None, :], ranks] = True
    return X


def random_placement(p: Problem, seed: int = 0) -> np.ndarray:
    """Round-robin over a random expert order per layer (copies of one expert stay adjacent)."""
    # a stream apart from synthetic_trace's (same seed there draws the popularity orders)
    rng = np.random.default_rng([seed, 0x0BA5E])
    X = np.zeros((p.num_layers, p.num_experts, p.ep), dtype=bool)
    for l in range(p.num_layers):
        order = rng.permutation(p.num_experts)
        _deal(X[l], np.repeat(order, p.copies[l][order]))
    return X


def _deal(Xl: np.ndarray, ids: np.ndarray) -> None:
    """Slot s goes to rank s % G; adjacent copies of one expert land on distinct ranks (n <= G)."""
    Xl[ids, np.arange(len(ids)) % Xl.shape[1]] = True
