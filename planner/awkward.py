"""Awkward GPU counts: plans on fewer GPUs or at a nearby global batch, priced beside the request.

A cluster of 641 nodes x 8 A100 (5,128 GPUs, a count from a public sweep) cannot run a 530B GPT
at global batch 2520 on all of its GPUs: every mesh has ``dp * tp * cp * pp = 5128 = 8 * 641``,
641 is prime and larger than the layer count, so 641 must divide ``dp`` and then the batch. A
practitioner leaves a node idle or moves the batch to a multiple of 641; this module prices both
with the ordinary search (``planner.search.search``) and says which it recommends:

- ``all``: every GPU at the requested batch (when a plan exists);
- ``fewer_gpus``: the most GPUs (whole nodes; GPUs of one node on a single-node cluster) whose
  count factors into a valid mesh with the requested batch ("smooth": no prime factor above
  ``SMOOTH``, so the degrees have room), at the requested batch;
- ``other_batch``: every GPU at the nearest global batch for which a valid mesh exists.

Recommendation: the lowest time per sequence (step time / global batch); an option that changes
the batch must beat the best option at the requested batch by ``BATCH_CHANGE_MARGIN`` (a batch
change alters the training run itself, so it has to pay for itself). ``exact_gpus`` /
``exact_batch`` forbid the alternatives.

The alternatives are searched only when the count is awkward (``is_awkward``): no plan on all
GPUs, or a GPU count with a prime factor above ``SMOOTH`` (the only way a subset can be faster
at the same batch is a mesh that the large prime forces into a poor shape).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from autopar.core.cluster import ClusterSpec
from autopar.cost_models.estimate import CostModel
from autopar.cost_models.session import same_job
from autopar.planner.search import Constraints, SearchResult, search, shardings

SMOOTH = 7                   # largest prime factor of a "smooth" GPU count
BATCH_CHANGE_MARGIN = 0.02   # a changed batch must be 2% faster per sequence to be recommended
MAX_BATCH_SHIFT = 0.25       # look for another batch within 25% of the request
MAX_FEWER_TRIES = 64         # node counts examined (cheaply, without pricing) below the request

Kind = Literal["all", "fewer_gpus", "other_batch"]


@dataclass
class Option:
    """One priced way to run the job."""

    kind: Kind
    gpus: int
    idle_gpus: int
    global_batch: int
    result: SearchResult
    cm: CostModel
    note: str

    @property
    def best(self):
        return self.result.candidates[0] if self.result.candidates else None

    @property
    def time_per_sequence_s(self) -> float:
        return self.best.step_time_s / self.global_batch if self.best else float("inf")


@dataclass
class Alternatives:
    options: list[Option]        # the ones with a plan, in the order all, fewer_gpus, other_batch
    recommended: Option | None
    reason: str
    search_time_s: float         # wall time of the search on every GPU and of the alternatives'
    search_cpu_s: float = 0.0    # CPU time of the alternatives' searches (set by the caller)


def largest_prime_factor(n: int) -> int:
    best, p = 1, 2
    while p * p <= n:
        while n % p == 0:
            best, n = p, n // p
        p += 1
    return max(best, n) if n > 1 else best


def is_awkward(world: int, found_all: bool) -> bool:
    return not found_all or largest_prime_factor(world) > SMOOTH


def with_cluster(cm: CostModel, cluster: ClusterSpec) -> CostModel:
    """The same job on another cluster (``session.same_job``)."""
    return same_job(cm, cluster=cluster)


def sub_cluster(cl: ClusterSpec, gpus: int) -> ClusterSpec:
    """``gpus`` GPUs of the cluster: whole nodes (the first ones), or part of a single node."""
    if cl.nodes == 1:
        return cl.model_copy(update={"gpus_per_node": gpus})
    nodes = gpus // cl.gpus_per_node
    m = cl.node_pair_bw_gbps
    return cl.model_copy(update={"nodes": nodes, "node_pair_bw_gbps": [r[:nodes] for r in m[:nodes]] if m else None})


def _meshable(cm: CostModel, cons: Constraints, gb: int) -> bool:
    """Whether any sharding satisfies the rules (no pricing: a fraction of a millisecond)."""
    return next(iter(shardings(cm, cons, gb)), None) is not None


def fewer_gpu_counts(cl: ClusterSpec) -> list[int]:
    """GPU counts below the cluster's, most GPUs first: whole nodes, or one node's GPUs."""
    if cl.nodes == 1:
        return list(range(cl.gpus_per_node - 1, 0, -1))
    return [n * cl.gpus_per_node for n in range(cl.nodes - 1, max(cl.nodes - 1 - MAX_FEWER_TRIES, 0), -1)]


def rough_part(n: int) -> int:
    """The product of the prime factors of ``n`` above ``SMOOTH`` (with multiplicity)."""
    out, p, m = 1, 2, n
    while p * p <= m:
        while m % p == 0:
            out, m = out * (p if p > SMOOTH else 1), m // p
        p += 1
    return out * (m if m > SMOOTH else 1)


def nearest_batches(world: int, gb: int, limit: int = 64) -> list[int]:
    """Candidate batches near ``gb``, nearest first (the larger first on a tie), at most ``limit``:
    multiples of the world's rough part. A large prime factor of the world rarely fits tp (inside
    a node) or cp (divides the sequence); pp takes it only when the layers allow, and then a plan
    on every GPU usually exists at the requested batch anyway, so dp holds it and the batch must
    be its multiple. The caller checks each candidate for a valid mesh."""
    q = rough_part(world)
    span = int(gb * MAX_BATCH_SHIFT)
    out = {b for k in range(max(1, (gb - span) // q), (gb + span) // q + 2) if 0 < (b := k * q) != gb
           and abs(b - gb) <= max(span, q)}
    return sorted(out, key=lambda b: (abs(b - gb), -b))[:limit]


def _fewer(cm: CostModel, cons: Constraints, gb: int, top_k: int, why_all: str) -> Option | None:
    for gpus in fewer_gpu_counts(cm.cluster):
        if largest_prime_factor(gpus) > SMOOTH:
            continue
        sub = with_cluster(cm, sub_cluster(cm.cluster, gpus))
        if not _meshable(sub, cons, gb):
            continue
        res = search(sub, gb, cons, top_k=top_k)
        if res.candidates:
            idle = cm.cluster.world - gpus
            return Option("fewer_gpus", gpus, idle, gb, res, sub, f"{idle} idle ({why_all})")
    return None


def _other_batch(cm: CostModel, cons: Constraints, gb: int, top_k: int) -> Option | None:
    """The nearest batch with a plan, searched for its best plan only (``search(best_only=True)``): the
    table shows an option by its best plan, and ``alternatives`` searches again in full if it is recommended."""
    for b in nearest_batches(cm.cluster.world, gb):
        if not _meshable(cm, cons, b):
            continue
        res = search(cm, b, cons, top_k=top_k, best_only=True)
        if res.candidates:
            sign = "+" if b > gb else "-"
            return Option("other_batch", cm.cluster.world, 0, b, res, cm,
                          f"batch {sign}{abs(b - gb)} ({sign}{100 * abs(b - gb) / gb:.1f}%)")
    return None


def _why_all(cm: CostModel, res: SearchResult) -> str:
    """Why the full count is awkward, in one clause."""
    w, p = cm.cluster.world, largest_prime_factor(cm.cluster.world)
    if res.stats.space == 0:
        return (f"{w} GPUs = {w // p} x {p}: no mesh takes the prime {p} at batch {res.global_batch}" if p > SMOOTH
                else f"no mesh of {w} GPUs at batch {res.global_batch}")
    if not res.candidates:
        return f"nothing fits on {w} GPUs"
    return f"{w} GPUs = {w // p} x {p} forces few mesh shapes"


def recommend(options: list[Option], gb: int) -> tuple[Option | None, str]:
    exact = [o for o in options if o.global_batch == gb]
    best_exact = min(exact, key=lambda o: o.time_per_sequence_s, default=None)
    moved = [o for o in options if o.global_batch != gb]
    best_moved = min(moved, key=lambda o: o.time_per_sequence_s, default=None)
    if best_exact is None:
        return best_moved, "no plan at the requested global batch" if best_moved else "nothing fits"
    if best_moved and best_moved.time_per_sequence_s < best_exact.time_per_sequence_s * (1 - BATCH_CHANGE_MARGIN):
        gain = 1 - best_moved.time_per_sequence_s / best_exact.time_per_sequence_s
        return best_moved, f"{100 * gain:.1f}% less time per sequence than the best plan at the requested batch"
    if best_exact.kind == "all" or len(exact) == 1:
        return best_exact, "the fastest per sequence at the requested batch"
    allg = next(o for o in exact if o.kind == "all")
    if best_exact is allg:
        return allg, "using every GPU is the fastest per sequence"
    gain = 1 - best_exact.time_per_sequence_s / allg.time_per_sequence_s
    return best_exact, f"{100 * gain:.1f}% less time per sequence than using every GPU"


def alternatives(cm: CostModel, gb: int, cons: Constraints, res_all: SearchResult, top_k: int = 5,
                 exact_gpus: bool = False, exact_batch: bool = False) -> Alternatives | None:
    """The priced alternatives to ``res_all`` (the search on every GPU at ``gb``), or None when
    the GPU count is not awkward or the flags forbid every alternative."""
    if not is_awkward(cm.cluster.world, bool(res_all.candidates)) or (exact_gpus and exact_batch):
        return None
    why_all = _why_all(cm, res_all)
    options = []
    if res_all.candidates:
        options.append(Option("all", cm.cluster.world, 0, gb, res_all, cm, "as requested"))
    if not exact_gpus:
        options.append(_fewer(cm, cons, gb, top_k, why_all))
    if not exact_batch:
        options.append(_other_batch(cm, cons, gb, top_k))
    options = [o for o in options if o is not None]
    chosen, reason = recommend(options, gb)
    spent = sum(o.result.stats.search_time_s for o in options if o.kind != "all")
    if chosen is not None and chosen.kind == "other_batch":   # the plan command lists its top_k: search in full
        chosen.result = search(chosen.cm, chosen.global_batch, cons, top_k=top_k)
        spent += chosen.result.stats.search_time_s
    return Alternatives(options, chosen, reason, res_all.stats.search_time_s + spent)
