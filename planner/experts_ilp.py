"""Mathematical programs of expert placement: the exact ILP, the one-layer MILP, the bounds.

Exact ILP (pulp; CBC, or HiGHS when highspy is installed). Data: layers ``l = 0..L-1``,
experts ``e``, ranks ``r = 0..G-1``; ``n[l,e]`` copies of expert e (1 + replicas, fixed
beforehand), ``c[l,e] = load[l,e] / n[l,e]`` tokens per copy, ``f[l,i,j] = C[l,i,j] / n[l,i]``
transitions leaving one copy of i, ``m = sum_e n[l,e] / G`` copies per rank.

Variables
    x[l,e,r] in {0,1}     a copy of expert e of layer l sits on rank r
    z[l] >= 0             straggler load of layer l
    s[l,i,j,r] in [0,1]   i (layer l) and j (layer l+1) both on rank r; only where f[l,i,j] > 0

Objective
    min  a * sum_l z[l]  +  w * sum_l sum_ij f[l,i,j] * ( n[l,i] - sum_r s[l,i,j,r] )
    (the second sum counts the transitions that change rank)

Constraints
    copies      sum_r x[l,e,r] = n[l,e]                   each expert has its copies
    slots       sum_e x[l,e,r] = m                         the same count on every rank
    straggler   sum_e c[l,e] x[l,e,r] <= z[l]              z is the max rank load
    stay        s[l,i,j,r] <= x[l,i,r],  s[l,i,j,r] <= x[l+1,j,r]
    degree      sum_j s[l,i,j,r] <= m x[l,i,r],  sum_i s[l,i,j,r] <= m x[l+1,j,r]
                (a rank holds m copies: valid cuts that lift the LP relaxation to the
                b-matching bound of ``cross_bound``)
    symmetry    ranks are interchangeable: without replicas x[0,e,r] = 0 for r > position
                of e in layer 0's expert order (rank r's first expert is the r-th to open a
                rank); with replicas layer-0 rank loads are non-increasing in r

At integer ``x`` the objective pushes ``s`` up to ``min(x, x) = x AND x``, so the ILP is exact.
Without the degree cuts the LP relaxation keeps every transition local (uniform fractional
``x``); with them it is at least the combinatorial bound below. The model has ``E*E*G`` ``s``
variables per layer pair: it is for small instances (tests, checking the search).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from autopar.errors import InputError


@dataclass
class IlpResult:
    X: np.ndarray | None        # [L, E, G] placement, None when no solution was found
    objective: float
    bound: float                # proven lower bound (== objective when optimal)
    optimal: bool
    status: str
    solve_time_s: float


# ----- exact ILP (pulp) -----------------------------------------------------------------------
def solve_exact(p, time_limit_s: float = 60.0, solver: str = "highs", msg: bool = False) -> IlpResult:
    """Build and solve the exact ILP for problem ``p`` (``autopar.planner.experts.Problem``)."""
    import pulp

    t0 = time.perf_counter()
    prob = pulp.LpProblem("expert_placement", pulp.LpMinimize)
    x, z, s = add_variables(prob, p)
    prob += objective(p, x, z, s)
    add_copies_constraints(prob, p, x)
    add_slots_constraints(prob, p, x)
    add_straggler_constraints(prob, p, x, z)
    add_stay_constraints(prob, p, x, s)
    add_degree_constraints(prob, p, x, s)
    add_symmetry_constraints(prob, p, x)
    backend = _solver(solver, time_limit_s, msg)
    prob.solve(backend)
    dt = time.perf_counter() - t0
    status = pulp.LpStatus[prob.status]
    if prob.status == pulp.LpStatusInfeasible:
        raise InputError(f"experts: the placement ILP is infeasible ({_relax_hint(p)})")
    if prob.sol_status not in (pulp.LpSolutionOptimal, pulp.LpSolutionIntegerFeasible):
        return IlpResult(None, float("inf"), _solver_bound(prob, backend), False, status, dt)
    X = np.array([[[round(x[l, e, r].value() or 0) for r in range(p.ep)] for e in range(p.num_experts)]
                  for l in range(p.num_layers)], dtype=bool)
    opt = prob.sol_status == pulp.LpSolutionOptimal
    obj = float(pulp.value(prob.objective))
    return IlpResult(X, obj, obj if opt else _solver_bound(prob, backend), opt, status, dt)


def add_variables(prob, p):
    L, E, G = p.num_layers, p.num_experts, p.ep
    x = {(l, e, r): prob.add_variable(f"x_{l}_{e}_{r}", 0, 1, cat="Binary")
         for l in range(L) for e in range(E) for r in range(G)}
    z = {l: prob.add_variable(f"z_{l}", lowBound=0) for l in range(L)}
    s = {(l, int(i), int(j), r): prob.add_variable(f"s_{l}_{i}_{j}_{r}", 0, 1)
         for l in range(L - 1) for i, j in zip(*np.nonzero(p.flow[l])) for r in range(G)}
    return x, z, s


def objective(p, x, z, s):
    import pulp

    total = float(p.trans.sum())
    return (p.load_weight * pulp.lpSum(z.values())
            + p.comm_weight * (total - pulp.lpSum(float(p.flow[l, i, j]) * var for (l, i, j, _), var in s.items())))


def add_copies_constraints(prob, p, x) -> None:
    import pulp

    for l in range(p.num_layers):
        for e in range(p.num_experts):
            prob += pulp.lpSum(x[l, e, r] for r in range(p.ep)) == int(p.copies[l, e]), f"copies_{l}_{e}"


def add_slots_constraints(prob, p, x) -> None:
    import pulp

    for l in range(p.num_layers):
        for r in range(p.ep):
            prob += pulp.lpSum(x[l, e, r] for e in range(p.num_experts)) == p.slots, f"slots_{l}_{r}"


def add_straggler_constraints(prob, p, x, z) -> None:
    import pulp

    c = p.copy_load
    for l in range(p.num_layers):
        for r in range(p.ep):
            prob += (pulp.lpSum(float(c[l, e]) * x[l, e, r] for e in range(p.num_experts)) <= z[l],
                     f"straggler_{l}_{r}")


def add_stay_constraints(prob, p, x, s) -> None:
    for (l, i, j, r), var in s.items():
        prob += var <= x[l, i, r], f"stay_src_{l}_{i}_{j}_{r}"
        prob += var <= x[l + 1, j, r], f"stay_dst_{l}_{i}_{j}_{r}"


def add_degree_constraints(prob, p, x, s) -> None:
    import pulp

    src, dst = {}, {}
    for (l, i, j, r), var in s.items():
        src.setdefault((l, i, r), []).append(var)
        dst.setdefault((l + 1, j, r), []).append(var)
    for (l, i, r), vs in src.items():
        prob += pulp.lpSum(vs) <= p.slots * x[l, i, r], f"degree_src_{l}_{i}_{r}"
    for (l, j, r), vs in dst.items():
        prob += pulp.lpSum(vs) <= p.slots * x[l, j, r], f"degree_dst_{l}_{j}_{r}"


def add_symmetry_constraints(prob, p, x) -> None:
    """Ranks are interchangeable: label them by the first layer-0 expert they hold."""
    import pulp

    order = np.argsort(-p.load[0], kind="stable")
    if (p.copies[0] == 1).all():
        for pos, e in enumerate(order):
            for r in range(pos + 1, p.ep):
                prob += x[0, int(e), r] == 0, f"symmetry_{int(e)}_{r}"
    else:   # replicas: order the ranks by their layer-0 load instead
        c = p.copy_load[0]
        for r in range(p.ep - 1):
            prob += (pulp.lpSum(float(c[e]) * (x[0, e, r] - x[0, e, r + 1]) for e in range(p.num_experts)) >= 0,
                     f"symmetry_{r}")


def _solver(name: str, time_limit_s: float, msg: bool):
    import pulp

    if name == "highs":
        if not pulp.HiGHS().available():
            raise InputError("solver: HiGHS is not available; `pip install highspy` or pass --solver cbc")
        return pulp.HiGHS(msg=msg, timeLimit=time_limit_s, gapRel=1e-9, threads=1)
    if name == "cbc":
        return pulp.PULP_CBC_CMD(msg=msg, timeLimit=time_limit_s, gapRel=1e-9)
    raise InputError(f"solver: '{name}' is not one of cbc, highs")


def _solver_bound(prob, backend) -> float:
    """The MIP dual bound when the backend exposes it (HiGHS); -inf otherwise (CBC via pulp)."""
    model = getattr(prob, "solverModel", None)
    if model is not None and hasattr(model, "getInfo"):
        bound = model.getInfo().mip_dual_bound
        if np.isfinite(bound):
            return float(bound)
    return float("-inf")


def _relax_hint(p) -> str:
    return (f"{p.num_experts} experts + replicas on {p.ep} ranks, {p.slots} per rank; relax by "
            f"changing --ep or --replicas so that num_experts + replicas is a multiple of ep")


# ----- one-layer MILP (scipy's HiGHS binding: no model files, fast for E*G up to ~2k) --------------
def solve_layer_milp(p, l: int, gain: np.ndarray, time_limit_s: float = 5.0) -> np.ndarray | None:
    """Best placement of layer ``l`` alone: min a * max_r load(r) - w * sum gain[e,r] x[e,r]."""
    from scipy.optimize import Bounds, LinearConstraint, milp
    from scipy.sparse import eye, hstack, kron, vstack

    E, G = p.num_experts, p.ep
    N = E * G
    cost = np.concatenate([-p.comm_weight * gain.ravel(), [p.load_weight]])
    ones_g, ones_e = np.ones((1, G)), np.ones((1, E))
    A = vstack([hstack([kron(eye(E), ones_g), np.zeros((E, 1))]),                 # copies
                hstack([kron(ones_e, eye(G)), np.zeros((G, 1))]),                 # slots
                hstack([kron(p.copy_load[l][None, :], eye(G)), -np.ones((G, 1))])]).tocsr()   # straggler
    lo = np.concatenate([p.copies[l], np.full(G, p.slots), np.full(G, -np.inf)])
    hi = np.concatenate([p.copies[l], np.full(G, p.slots), np.zeros(G)])
    res = milp(cost, constraints=LinearConstraint(A, lo, hi), integrality=np.r_[np.ones(N), 0],
               bounds=Bounds(np.zeros(N + 1), np.r_[np.ones(N), np.inf]),
               options=dict(time_limit=time_limit_s, mip_rel_gap=1e-7))
    if res.x is None:
        return None
    return res.x[:N].reshape(E, G) > 0.5


# ----- bounds ---------------------------------------------------------------------------------
def load_bound(p) -> np.ndarray:
    """[L] lower bound of each layer's straggler load: the mean, and the rank that holds the
    heaviest copy together with ``m - 1`` other copies (at least the lightest ones)."""
    out = np.zeros(p.num_layers)
    for l in range(p.num_layers):
        c = np.sort(np.repeat(p.copy_load[l], p.copies[l]))
        out[l] = max(c.sum() / p.ep, c[-1] + c[: p.slots - 1].sum())
    return out


def cross_bound(p, l: int, rounds: int = 6) -> float:
    """Lower bound of the transitions ``l -> l+1`` that change rank, that layer pair alone.

    Co-location relaxes to a bipartite b-matching: ``s[i,j]`` = ranks holding both i and j,
    ``sum_j s[i,j] <= n_i m``, ``sum_i s[i,j] <= n_j m``, ``0 <= s[i,j] <= min(n_i, n_j)``. Every
    placement gives such an ``s`` (a union of G complete bipartite blocks), so the max-weight
    matching bounds the flow that stays. The bound is read from a *dual* solution: any
    ``y >= 0`` on the degree rows gives ``sum_i b_i y_i + sum_ij ub_ij max(0, f_ij - y_i - y_j)``
    >= the matching weight (weak duality). ``y`` comes from the LP over the heaviest edges,
    adding edges with positive reduced weight for a few rounds (column generation): the LP over
    all ``E*E`` edges is the slow part on 256 experts, and the bound stays valid at any round.
    The dual is feasible by construction (``t`` is computed, not read from the solver), so the
    bound does not depend on solver tolerances.
    """
    W = p.flow[l]
    rows, cols = np.nonzero(W)
    if len(rows) == 0:
        return 0.0
    w = W[rows, cols]
    E = p.num_experts
    b = np.r_[p.copies[l], p.copies[l + 1]].astype(np.float64) * p.slots
    ub = np.minimum(p.copies[l][rows], p.copies[l + 1][cols]).astype(np.float64)
    keep = _heaviest_edges(W, rows, cols, per_node=16 * p.slots)
    for _ in range(rounds):
        y = _matching_duals(rows[keep], E + cols[keep], w[keep], ub[keep], b)
        reduced = w - y[rows] - y[E + cols]
        add = ~keep & (reduced > 1e-9 * max(1.0, float(w.max())))
        if not add.any():
            break
        keep |= add
    stays = float(b @ y + ub @ np.maximum(reduced, 0.0))
    return max(0.0, float(W.sum()) - stays)


def _heaviest_edges(W: np.ndarray, rows: np.ndarray, cols: np.ndarray, per_node: int) -> np.ndarray:
    """Mask of the nonzero edges among the ``per_node`` heaviest of their row or column."""
    k = min(per_node, W.shape[0])
    row_cut = -np.partition(-W, k - 1, axis=1)[:, k - 1]
    col_cut = -np.partition(-W, k - 1, axis=0)[k - 1, :]
    return (W[rows, cols] >= row_cut[rows]) | (W[rows, cols] >= col_cut[cols])


def _matching_duals(u: np.ndarray, v: np.ndarray, w: np.ndarray, ub: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Degree-row duals of max w.s s.t. degree(s) <= b, 0 <= s <= ub (node ids u, v index b)."""
    from scipy.optimize import linprog
    from scipy.sparse import coo_matrix

    k = np.arange(len(w))
    A = coo_matrix((np.ones(2 * len(w)), (np.r_[u, v], np.r_[k, k])), shape=(len(b), len(w))).tocsr()
    res = linprog(-w, A_ub=A, b_ub=b, bounds=np.stack([np.zeros_like(ub), ub], 1), method="highs")
    if res.status != 0:
        raise RuntimeError(f"b-matching LP failed: {res.message}")
    return np.maximum(-res.ineqlin.marginals, 0.0)


def lower_bound(p) -> tuple[float, np.ndarray, np.ndarray]:
    """(bound on the objective, per-layer load bounds, per-pair cross bounds).

    Valid because the objective is a sum of per-layer and per-pair terms: the minimum of a sum
    is at least the sum of the separate minima.
    """
    lb_load = load_bound(p)
    lb_cross = np.array([cross_bound(p, l) for l in range(p.num_layers - 1)])
    return float(p.load_weight * lb_load.sum() + p.comm_weight * lb_cross.sum()), lb_load, lb_cross
