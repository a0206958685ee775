"""Scalable expert placement: iterated local search over one-layer solves and chain swaps.

Construction: layer 0 balanced (heaviest copy onto the lightest rank), then each layer placed
given the previous one (assignment + swaps). Descent alternates two moves
until neither improves the objective of ``autopar.planner.experts``:

- one-layer re-solve: with both neighbours fixed the objective restricted to layer ``l`` is
  ``a * max_r load(r) - w * sum gain[e,r] x[e,r]`` (``gain``: transitions kept on r), solved
  by a Hungarian assignment then best-improvement swaps, and polished by the exact one-layer
  MILP (time-capped) when ``E*G`` is small;
- chain swap: each rank's copies are linked into chains across layers (max-flow matching per
  layer pair); swapping two whole chains between ranks rebalances every layer's load without
  breaking the chains' own transitions, a move that one-layer steps cannot make.

Restarts kick the best placement with random swaps and descend again.
"""

from __future__ import annotations

import time

import numpy as np

from autopar.planner.experts_problem import Problem, evaluate


def layer_gain(p: Problem, X: np.ndarray, l: int) -> np.ndarray:
    """[E, G] transitions kept on rank r if layer l puts a copy of e there (neighbours fixed)."""
    g = np.zeros((p.num_experts, p.ep))
    if l > 0:
        g += p.flow[l - 1].T @ X[l - 1]
    if l < p.num_layers - 1:
        g += p.flow[l] @ X[l + 1]
    return g


def lpt_layer(p: Problem, l: int) -> np.ndarray:
    """Heaviest copy first onto the lightest rank with a free slot (no two copies on one rank)."""
    Xl = np.zeros((p.num_experts, p.ep), dtype=bool)
    fill, count = np.zeros(p.ep), np.zeros(p.ep, dtype=np.int64)
    for e in np.argsort(-p.copy_load[l], kind="stable"):
        for _ in range(p.copies[l, e]):
            r = int(np.argmin(np.where((count < p.slots) & ~Xl[e], fill, np.inf)))
            Xl[e, r] = True
            fill[r] += p.copy_load[l, e]
            count[r] += 1
    return Xl


def layer_objective(p: Problem, l: int, Xl: np.ndarray, gain: np.ndarray) -> float:
    return float(p.load_weight * (p.copy_load[l] @ Xl).max() - p.comm_weight * (gain * Xl).sum())


def solve_layer(p: Problem, l: int, gain: np.ndarray, milp_time_s: float = 0.0,
                milp_max_vars: int = 2048) -> np.ndarray:
    """Placement of layer l given its neighbours: Hungarian assignment + best-improvement swaps,
    then, when small and given time, the exact one-layer MILP if it does better."""
    from autopar.planner.experts_ilp import solve_layer_milp

    Xl = swap_descent(p, l, assign_layer(p, l, gain), gain)
    if milp_time_s > 0 and p.num_experts * p.ep <= milp_max_vars:
        Xm = solve_layer_milp(p, l, gain, time_limit_s=milp_time_s)
        if Xm is not None and layer_objective(p, l, Xm, gain) < layer_objective(p, l, Xl, gain) - 1e-9:
            return Xm
    return Xl


def assign_layer(p: Problem, l: int, gain: np.ndarray) -> np.ndarray:
    """Max-gain assignment of copies to slots (Hungarian), then split copies that share a rank."""
    from scipy.optimize import linear_sum_assignment

    items = np.repeat(np.arange(p.num_experts), p.copies[l])
    slot_rank = np.repeat(np.arange(p.ep), p.slots)
    rows, cols = linear_sum_assignment(-gain[items][:, slot_rank])
    count = np.zeros((p.num_experts, p.ep), dtype=np.int64)
    np.add.at(count, (items[rows], slot_rank[cols]), 1)
    for e, r in zip(*np.nonzero(count > 1)):
        while count[e, r] > 1:
            _split_duplicate(count, int(e), int(r), gain)
    return count > 0


def _split_duplicate(count: np.ndarray, e: int, r: int, gain: np.ndarray) -> None:
    """Swap one copy of e off rank r with an expert e2 from a rank r2 that lacks e.

    Such a swap always exists: r holds at most m-1 distinct experts and e has at most G-1
    ranks besides the duplicate, so some r2 lacks e and holds an e2 that r lacks.
    """
    best, move = -np.inf, None
    for r2 in np.nonzero(count[e] == 0)[0]:
        for e2 in np.nonzero((count[:, r2] > 0) & (count[:, r] == 0))[0]:
            delta = gain[e, r2] + gain[e2, r] - gain[e, r] - gain[e2, r2]
            if delta > best:
                best, move = delta, (int(r2), int(e2))
    r2, e2 = move
    count[e, r] -= 1
    count[e, r2] += 1
    count[e2, r2] -= 1
    count[e2, r] += 1


def swap_descent(p: Problem, l: int, Xl: np.ndarray, gain: np.ndarray, max_iter: int = 10_000) -> np.ndarray:
    """Best-improvement swaps of two copies on different ranks (one layer, neighbours fixed)."""
    c, a, w = p.copy_load[l], p.load_weight, p.comm_weight
    for _ in range(max_iter):
        e, r = np.nonzero(Xl)
        load = c @ Xl
        i, j = np.triu_indices(len(e), 1)
        i, j = i[r[i] != r[j]], j[r[i] != r[j]]
        ok = ~Xl[e[i], r[j]] & ~Xl[e[j], r[i]]
        i, j = i[ok], j[ok]
        d = c[e[j]] - c[e[i]]
        new_max = _max_after(load[None, :], r[i][:, None], r[j][:, None], d[:, None])[:, 0]
        delta = a * (new_max - load.max()) - w * (gain[e[i], r[j]] + gain[e[j], r[i]]
                                                    - gain[e[i], r[i]] - gain[e[j], r[j]])
        if len(delta) == 0 or delta.min() >= -1e-9:
            return Xl
        b = int(np.argmin(delta))
        Xl[e[i[b]], r[i[b]]] = Xl[e[j[b]], r[j[b]]] = False
        Xl[e[i[b]], r[j[b]]] = Xl[e[j[b]], r[i[b]]] = True
    return Xl


def _max_after(load: np.ndarray, r1: np.ndarray, r2: np.ndarray, d: np.ndarray) -> np.ndarray:
    """Max rank load per (swap, layer) when ``d`` moves onto r1 and off r2.

    ``load``: [L, G]; r1, r2: [P, 1] ranks; d: [P, L]. Uses the three largest loads per layer so
    the max over the untouched ranks costs O(1) per swap.
    """
    L, G = load.shape
    top = np.argsort(-load, axis=1)[:, : min(3, G)]
    vals = np.take_along_axis(load, top, axis=1)
    rest = np.full(np.broadcast_shapes(r1.shape, (1, L)), -np.inf)
    for k in range(top.shape[1] - 1, -1, -1):
        free = (top[None, :, k] != r1) & (top[None, :, k] != r2)
        rest = np.where(free, vals[None, :, k], rest)
    lr = np.arange(L)[None, :]
    return np.maximum(rest, np.maximum(load[lr, r1] + d, load[lr, r2] - d))


def trajectories(p: Problem, X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Split each rank's copies into ``m`` chains across layers (max-flow matching per layer
    pair inside the rank). Returns ``traj[t, l]`` expert ids and ``rank[t]``."""
    from scipy.optimize import linear_sum_assignment

    L, G, m = p.num_layers, p.ep, p.slots
    traj = np.zeros((G * m, L), dtype=np.int64)
    for r in range(G):
        cur = np.nonzero(X[0, :, r])[0]
        traj[r * m:(r + 1) * m, 0] = cur
        for l in range(L - 1):
            nxt = np.nonzero(X[l + 1, :, r])[0]
            _, cols = linear_sum_assignment(-p.flow[l][np.ix_(cur, nxt)])
            cur = nxt[cols]
            traj[r * m:(r + 1) * m, l + 1] = cur
    return traj, np.repeat(np.arange(G), m)


def trajectory_swaps(p: Problem, X: np.ndarray, deadline: float) -> np.ndarray:
    """Swap whole chains between ranks: balances every layer's load without breaking the
    chains' own transitions (the moves one-layer steps cannot make)."""
    traj, rank = trajectories(p, X)
    T, L = traj.shape
    Q = sum(p.flow[l][np.ix_(traj[:, l], traj[:, l + 1])] for l in range(L - 1)) if L > 1 else np.zeros((T, T))
    Qs = Q + Q.T
    cl = p.copy_load[np.arange(L)[None, :], traj]                     # [T, L]
    i, j = np.triu_indices(T, 1)
    while time.perf_counter() < deadline:
        move = _best_chain_swap(p, X, traj, rank, Qs, cl, i, j)
        if move is None:
            break
        t1, t2 = move
        rank[t1], rank[t2] = rank[t2], rank[t1]
        X = _chains_to_matrix(p, traj, rank)
    return X


def _best_chain_swap(p, X, traj, rank, Qs, cl, i, j):
    G, L = p.ep, p.num_layers
    onehot = np.eye(G)[rank]
    H = Qs @ onehot - np.diag(Qs)[:, None] * onehot                   # [T, G] links with rank r
    load = np.einsum("tl,tg->lg", cl, onehot)                           # [L, G]
    sel = rank[i] != rank[j]
    i, j = i[sel], j[sel]
    r1, r2 = rank[i], rank[j]
    lr = np.arange(L)[None, :]
    ok = ~((X[lr, traj[i], r2[:, None]] & (traj[i] != traj[j])).any(1)
           | (X[lr, traj[j], r1[:, None]] & (traj[i] != traj[j])).any(1))
    i, j, r1, r2 = i[ok], j[ok], r1[ok], r2[ok]
    if len(i) == 0:
        return None
    d = cl[j] - cl[i]
    dmax = (_max_after(load, r1[:, None], r2[:, None], d) - load.max(axis=1)[None, :]).sum(1)
    dcoloc = H[i, r2] + H[j, r1] - H[i, r1] - H[j, r2] - 2 * Qs[i, j]
    delta = p.load_weight * dmax - p.comm_weight * dcoloc
    b = int(np.argmin(delta))
    return (int(i[b]), int(j[b])) if delta[b] < -1e-9 else None


def _chains_to_matrix(p: Problem, traj: np.ndarray, rank: np.ndarray) -> np.ndarray:
    X = np.zeros((p.num_layers, p.num_experts, p.ep), dtype=bool)
    for l in range(p.num_layers):
        X[l, traj[:, l], rank] = True
    return X


def search(p: Problem, time_limit_s: float = 60.0, restarts: int = 20, seed: int = 0,
           stop_at: float = -np.inf) -> tuple[np.ndarray, dict]:
    """Iterated local search. Start: chain construction (layer 0 balanced, each next layer
    solved given the previous). Descent: one-layer re-solves and chain swaps until neither
    improves. Then ``restarts`` times: kick the best placement with random swaps and descend
    again. Stops early at the time limit or once the objective reaches ``stop_at`` (a bound)."""
    deadline = time.perf_counter() + time_limit_s
    rng = np.random.default_rng(seed)
    X, best = _descend(p, construct(p), deadline)
    log = {"construct+descent": best}
    stall = 0
    for it in range(restarts):
        if time.perf_counter() >= deadline or best <= stop_at + 1e-9 * max(1.0, abs(best)):
            break
        Y, f = _descend(p, kick(p, X, rng), deadline)
        if f < best - 1e-9 * max(1.0, abs(best)):
            X, best, stall = Y, f, 0
            log[f"restart{it}"] = best
        else:
            stall += 1
    log["restarts_run"] = it + 1 if restarts else 0
    return X, log


def construct(p: Problem) -> np.ndarray:
    X = np.zeros((p.num_layers, p.num_experts, p.ep), dtype=bool)
    X[0] = lpt_layer(p, 0)
    for l in range(1, p.num_layers):
        X[l] = solve_layer(p, l, p.flow[l - 1].T @ X[l - 1])
    return X


def kick(p: Problem, X: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Random valid swaps of two copies in random layers (about one per 8 experts)."""
    X = X.copy()
    for _ in range(max(2, p.num_experts // 8)):
        l = int(rng.integers(p.num_layers))
        e, r = np.nonzero(X[l])
        a, b = rng.choice(len(e), size=2, replace=False)
        if r[a] != r[b] and not X[l, e[a], r[b]] and not X[l, e[b], r[a]]:
            X[l, e[a], r[a]] = X[l, e[b], r[b]] = False
            X[l, e[a], r[b]] = X[l, e[b], r[a]] = True
    return X


def _descend(p: Problem, X: np.ndarray, deadline: float, max_rounds: int = 50) -> tuple[np.ndarray, float]:
    best = evaluate(p, X).objective
    for rnd in range(max_rounds):
        start = best
        X, best = _layer_sweep(p, X, best, reverse=rnd % 2 == 1, deadline=deadline)
        if time.perf_counter() < deadline:
            X2 = trajectory_swaps(p, X, deadline)
            f2 = evaluate(p, X2).objective
            if f2 < best - 1e-9 * max(1.0, abs(best)):
                X, best = X2, f2
        if best > start - 1e-9 * max(1.0, abs(start)) or time.perf_counter() >= deadline:
            break
    return X, best


def _layer_sweep(p: Problem, X: np.ndarray, best: float, reverse: bool, deadline: float):
    order = range(p.num_layers - 1, -1, -1) if reverse else range(p.num_layers)
    for l in order:
        if time.perf_counter() >= deadline:
            break
        gain = layer_gain(p, X, l)
        # the MILP polish is capped: with one-sided or tied gains HiGHS can take seconds
        Xl = solve_layer(p, l, gain, milp_time_s=min(0.5, max(0.0, deadline - time.perf_counter())))
        if layer_objective(p, l, Xl, gain) < layer_objective(p, l, X[l], gain) - 1e-9:
            old, X[l] = X[l], Xl
            f = evaluate(p, X).objective
            if f < best:
                best = f
            else:
                X[l] = old
    return X, best
