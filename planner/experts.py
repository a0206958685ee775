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
with each term minimised alone (``experts_ilp.lower_bound``). Methods: the exact ILP
(``experts_ilp.solve_exact``) for small instances, the iterated local search of
``experts_search`` for large ones; ``solve_placement`` picks and reports bound and gap.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from autopar.errors import InputError, first_error
from autopar.fileio import write_atomic
from autopar.planner.experts_problem import (  # noqa: F401  (re-exported)
    Evaluation,
    Problem,
    contiguous,
    evaluate,
    make_problem,
    random_placement,
    replica_counts,
    round_robin,
    to_assignment,
    to_matrix,
)
from autopar.profiles.routing import RoutingTrace


# ----- placement file --------------------------------------------------------------------
class ExpertPlacement(BaseModel):
    """Which expert copies each EP rank holds, per MoE layer, and how good that is.

    ``assignment[l][r]`` lists the expert ids on rank ``r`` in MoE layer ``l`` (the layout of
    ``Plan.expert_placement``); every rank holds ``(num_experts + replicas) / ep`` ids.
    """

    model_config = ConfigDict(extra="forbid")

    format_version: Literal[1] = 1
    ep: int = Field(..., ge=1)
    num_experts: int = Field(..., ge=1)
    num_layers: int = Field(..., ge=1)
    replicas: int = Field(0, ge=0, description="extra copies per layer")
    assignment: list[list[list[int]]]
    objective: float = Field(0.0, description="load_term + comm_term")
    load_term: float = Field(0.0, description="load_weight * sum_l max-rank load (tokens)")
    comm_term: float = Field(0.0, description="comm_weight * cross_rank_tokens")
    cross_rank_tokens: float = 0.0
    load_weight: float = 1.0
    comm_weight: float = 0.0
    lower_bound: float = 0.0
    gap: float = Field(0.0, description="(objective - lower_bound) / objective")
    method: Literal["exact", "search", "given"] = "given"
    solver: str = ""
    solve_time_s: float = 0.0
    meta: dict = Field(default_factory=dict)

    @model_validator(mode="after")
    def _check(self) -> "ExpertPlacement":
        check_assignment(self.assignment, self.num_layers, self.ep, self.num_experts, self.replicas)
        return self

    def matrix(self) -> np.ndarray:
        return to_matrix(self.assignment, self.num_experts)

    def check_fits(self, moe_layers: int, num_experts: int, ep: int) -> None:
        """One-line InputError unless this placement is for that model and EP degree."""
        if (self.num_layers, self.num_experts, self.ep) != (moe_layers, num_experts, ep):
            raise InputError(f"placement: made for {self.num_layers} MoE layers x {self.num_experts} experts on "
                             f"ep={self.ep}, but the plan has {moe_layers} x {num_experts} on ep={ep}; "
                             f"run `autopar experts TRACE --ep {ep}` with a trace of this model")

    def save(self, path: str | os.PathLike) -> None:
        write_atomic(Path(path), self.model_dump_json(indent=1))

    @classmethod
    def load_file(cls, path: str | os.PathLike) -> "ExpertPlacement":
        p = Path(path)
        if not p.is_file():
            raise InputError(f"placement: {p} does not exist; "
                             f"write one with `autopar experts TRACE --ep G --out {p.name}`")
        try:
            return cls.model_validate(json.loads(p.read_text()))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise InputError(f"placement: {p} is not valid JSON ({exc})") from None
        except ValidationError as exc:
            raise InputError(f"placement: {p}: {first_error(exc)}") from None


def check_assignment(assignment, num_layers: int, ep: int, num_experts: int, replicas: int) -> None:
    """Shape, id range, one copy per rank, every expert present, equal counts (ValueError)."""
    per_rank = (num_experts + replicas) // ep
    if (num_experts + replicas) % ep:
        raise ValueError(f"num_experts + replicas = {num_experts + replicas} is not divisible by ep={ep}")
    if len(assignment) != num_layers:
        raise ValueError(f"assignment has {len(assignment)} layers, expected num_layers={num_layers}")
    for l, ranks in enumerate(assignment):
        if len(ranks) != ep:
            raise ValueError(f"assignment[{l}] has {len(ranks)} ranks, expected ep={ep}")
        for r, ids in enumerate(ranks):
            if len(ids) != per_rank or len(set(ids)) != len(ids):
                raise ValueError(f"assignment[{l}][{r}] must hold {per_rank} distinct expert ids, got {ids}")
            if any(not 0 <= e < num_experts for e in ids):
                raise ValueError(f"assignment[{l}][{r}] has an id outside 0..{num_experts - 1}: {ids}")
        missing = set(range(num_experts)) - {e for ids in ranks for e in ids}
        if missing:
            raise ValueError(f"assignment[{l}] places no copy of experts {sorted(missing)[:8]}")


# ----- solving ---------------------------------------------------------------------------
EXACT_MAX_BINARIES = 128     # x variables; the exact ILP proves optimality in seconds below this


def solve_placement(trace: RoutingTrace, ep: int, replicas: int = 0, method: str = "auto",
                    time_limit_s: float = 60.0, solver: str | None = None, a2a_cost: float = 1.0,
                    seed: int = 0, restarts: int = 20, target_gap: float = 0.0) -> ExpertPlacement:
    """Place every layer's experts on ``ep`` ranks; report objective, lower bound and gap.

    ``method``: ``exact`` (pulp ILP), ``search`` (iterated local search + combinatorial bound)
    or ``auto`` (exact when at most EXACT_MAX_BINARIES placement variables, else search).
    ``time_limit_s`` bounds the whole call (bound + search, or the ILP); the search stops early
    once its gap to the bound is at most ``target_gap``.
    """
    from autopar.planner import experts_ilp

    t0 = time.perf_counter()
    p = make_problem(trace, ep, replicas, a2a_cost=a2a_cost)
    solver = solver or _default_solver()
    if method not in ("auto", "exact", "search"):
        raise InputError(f"method: '{method}' is not one of auto, exact, search")
    small = p.num_layers * p.num_experts * p.ep <= EXACT_MAX_BINARIES
    lb = experts_ilp.lower_bound(p)[0]
    X, used = None, "local-search"
    if method == "exact" or (method == "auto" and small):
        # auto gives the ILP half the time and lets the search finish if it is not proven optimal
        share = 1.0 if method == "exact" else 0.5
        res = experts_ilp.solve_exact(p, max(1.0, share * time_limit_s - (time.perf_counter() - t0)), solver)
        if res.X is None and method == "exact":
            raise InputError(f"experts: the ILP found no placement in {time_limit_s:.0f} s ({res.status}); "
                             f"raise --time-limit or use --method search")
        X, lb, used = res.X, max(lb, res.bound), f"pulp-{solver}"
        if res.optimal or method == "exact":
            return _placement(p, X, lb, "exact", used, time.perf_counter() - t0, replicas, trace, a2a_cost)
    # leave a margin: a move in flight finishes after the deadline, then the result is scored
    X = _search(p, X, lb, t0 + time_limit_s - min(0.05 * time_limit_s, 5.0), seed, restarts, target_gap)
    return _placement(p, X, lb, "search", used if X is None else "local-search", time.perf_counter() - t0,
                      replicas, trace, a2a_cost)


def _search(p: Problem, incumbent: np.ndarray | None, lb: float, deadline: float, seed: int, restarts: int,
            target_gap: float) -> np.ndarray:
    from autopar.planner import experts_search

    stop = lb / (1.0 - target_gap) if target_gap < 1 else np.inf
    X, _log = experts_search.search(p, max(0.0, deadline - time.perf_counter()), restarts=restarts, seed=seed,
                                    stop_at=stop)
    if incumbent is not None and evaluate(p, incumbent).objective < evaluate(p, X).objective:
        return incumbent
    return X


def _default_solver() -> str:
    try:
        import highspy  # noqa: F401
        return "highs"
    except ImportError:
        return "cbc"


def _placement(p: Problem, X: np.ndarray, lb: float, method: str, solver: str, dt: float,
               replicas: int, trace: RoutingTrace, a2a_cost: float) -> ExpertPlacement:
    ev = evaluate(p, X)
    load_term = p.load_weight * float(ev.max_load.sum())
    comm_term = p.comm_weight * float(ev.cross.sum())
    lb = min(lb, ev.objective)                  # guards float noise: a bound never exceeds a solution
    return ExpertPlacement(
        ep=p.ep, num_experts=p.num_experts, num_layers=p.num_layers, replicas=replicas,
        assignment=to_assignment(X), objective=ev.objective, load_term=load_term, comm_term=comm_term,
        cross_rank_tokens=float(ev.cross.sum()), load_weight=p.load_weight, comm_weight=p.comm_weight,
        lower_bound=lb, gap=(ev.objective - lb) / ev.objective if ev.objective > 0 else 0.0,
        method=method, solver=solver, solve_time_s=dt,
        meta=dict(a2a_cost=a2a_cost, topk=trace.topk, tokens=trace.tokens, trace=trace.meta))


# ----- statistics (report and cost model) --------------------------------------------------
def placement_stats(trace: RoutingTrace, placement: ExpertPlacement | np.ndarray,
                    bytes_per_token: float, a2a_cost: float = 1.0) -> dict:
    """Traffic and balance of a placement on a trace (what the report and cost model read).

    ``cross_rank_tokens``: transitions l -> l+1 that change rank (k*k pairs per token);
    ``a2a_bytes_per_rank_max/mean``: bytes each rank sends over all layer transitions, one token
    copy (``bytes_per_token``) per ``k`` pairs; ``max_load_ratio``: sum over layers of the
    busiest rank's load over the sum of mean loads (1 = perfectly balanced, the factor by which
    expert compute stretches); ``cross_fraction``: cross_rank_tokens over all transitions.
    """
    X = placement.matrix() if isinstance(placement, ExpertPlacement) else placement
    if X.shape[:2] != (trace.num_layers, trace.num_experts):
        raise InputError(f"placement: {X.shape[0]} layers x {X.shape[1]} experts does not match the trace "
                         f"({trace.num_layers} x {trace.num_experts})")
    p = make_problem(trace, X.shape[2], int(X.sum(axis=(1, 2))[0]) - trace.num_experts,
                     a2a_cost=a2a_cost, copies=X.sum(axis=2))
    ev = evaluate(p, X)
    sent_bytes = ev.sent.sum(axis=0) / trace.topk * bytes_per_token
    mean_load = p.load.sum(axis=1) / p.ep
    total = float(p.trans.sum())
    return dict(
        cross_rank_tokens=float(ev.cross.sum()),
        cross_fraction=float(ev.cross.sum() / total) if total else 0.0,
        a2a_bytes_per_rank_max=float(sent_bytes.max()) if len(sent_bytes) else 0.0,
        a2a_bytes_per_rank_mean=float(sent_bytes.mean()) if len(sent_bytes) else 0.0,
        max_load_ratio=float(ev.max_load.sum() / mean_load.sum()) if mean_load.sum() else 1.0,
        worst_layer_load_ratio=float((ev.max_load / np.maximum(mean_load, 1e-12)).max()),
        objective=ev.objective,
        rank_load=ev.rank_load.tolist(),
    )


def routing_cost_factors(trace: RoutingTrace, ep: int, placement: ExpertPlacement | None = None) -> dict:
    """Factors against uniform routing for the cost model (``estimate``/``plan --trace/--placement``).

    ``load_imbalance``: busiest-rank expert compute over the mean (uniform routing = 1).
    ``a2a_volume_factor``: token copies that change rank over the ``(G-1)/G`` share that uniform
    routing sends off-rank. ``a2a_rank_imbalance``: busiest rank's sent bytes over the mean.
    Without a placement the trace is priced on the emitted program's default placement
    (contiguous blocks of experts per rank), as ``estimate --trace`` prices it.
    """
    if placement is not None:
        placement.check_fits(trace.num_layers, trace.num_experts, ep)
        X = placement.matrix()
    else:
        X = contiguous(make_problem(trace, ep))   # no replicas, E % ep == 0 (make_problem checks)
    s = placement_stats(trace, X, bytes_per_token=1.0)
    uniform = (ep - 1) / ep
    return dict(load_imbalance=s["max_load_ratio"],
                a2a_volume_factor=s["cross_fraction"] / uniform if uniform else 0.0,
                a2a_rank_imbalance=s["a2a_bytes_per_rank_max"] / s["a2a_bytes_per_rank_mean"]
                if s["a2a_bytes_per_rank_mean"] else 1.0)
