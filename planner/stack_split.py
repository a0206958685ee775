"""The pipeline stage splits a stack's config expresses (``techniques.pipeline.SPLITS``): the layers per rank the
search may price for the stack (``split_counts``), the fastest of them (``partition``), and the setting that makes
the stack run a plan's stages (``split_setting``). autopar's own program and torchtitan run any split: the
partition DP searches those; the others list their few families and price each."""

from __future__ import annotations

from autopar.core.strategy import Strategy
from autopar.cost_models.estimate import (
    MEGATRON_ACCOUNT,
    CostModel,
    megatron_accounted_sizes,
    megatron_accounted_stages,
)
from autopar.cost_models.runtime_memory import torchtitan_stages
from autopar.planner import partition as part
from autopar.techniques.pipeline import SPLITS, V_SHAPED

MEGATRON_FIRST = "--decoder-first-pipeline-num-layers"
MEGATRON_LAST = "--decoder-last-pipeline-num-layers"
DEEPSPEED_TYPE = 'PipelineModule(partition_method="type:<decoder block class>")'


def split_counts(split: str, C: int, p: int, v: int) -> list[list[int]]:
    """Layers per period on each rank (``partition.PartitionResult.counts``) of every split of family ``split``
    (``techniques.pipeline.Split``; ``any`` is the DP's, not listed) for ``C`` layers per period, ``p`` ranks,
    ``v`` chunks per rank. ``ends`` (Megatron): the first and the last stage any count, the middle ones one
    count, each at least one layer; equal chunks only where ``v > 1``. ``even``: equal stages."""
    if p == 1:
        return [[C]]
    if split == "even" or v > 1:
        return [[C // p] * p] if C % p == 0 else []
    if p == 2:
        return [[f, C - f] for f in range(1, C)]
    out = []
    for m in range(1, (C - 2) // (p - 2) + 1):
        rest = C - (p - 2) * m
        out += [[f] + [m] * (p - 2) + [rest - f] for f in range(1, rest)]
    return out


def no_split(stack: str, layers: int, s: Strategy) -> str | None:
    """Why ``stack`` runs none of the splits the search prices for ``s`` (one line naming the fix), None where it
    runs one: the search skips such a configuration and ``plan`` says why where nothing else is listed."""
    split = SPLITS[stack]
    if split == "any" or s.pp == 1 or s.schedule in V_SHAPED:
        return None
    C, p = layers // s.vpp, s.pp
    if layers % s.vpp == 0 and C >= p and (C % p == 0 or (split == "ends" and s.vpp == 1)):
        return None
    if stack == "megatron" and megatron_accounted_stages(layers, p * s.vpp):
        return (f"pp*vpp = {p * s.vpp}: plan searches Megatron's interleaved chunks only where they divide the "
                f"{layers} layers; `autopar estimate` prices this one (--account-for-*-pipeline-split)")
    if stack == "megatron":
        return (f"pp*vpp = {p * s.vpp}: --runtime megatron runs interleaved chunks of equal size (or one layer short "
                f"at the ends: --account-for-*-pipeline-split) and {layers} layers fit neither; pick another pp*vpp")
    return (f"pp={p}: --runtime {stack} is priced with equal stages ({DEEPSPEED_TYPE}) and {layers} layers do not "
            f"divide into them; pick pp dividing the layers")


def partition(cm: CostModel, s: Strategy, modes: tuple[str, ...], upper: float, costs: dict | None = None,
              shared: dict | None = None, tight: bool = True) -> part.PartitionResult | None:
    """``partition.partition`` over the splits the stack's config expresses: the DP where it runs any, else the
    fastest of ``split_counts`` that beats ``upper``, each priced (``evaluate_counts``) in the order of its
    floor (``_floor``) until the floor reaches the best found."""
    split = SPLITS[cm.stack_name]
    if split == "any" or s.pp == 1:
        return part.partition(cm, s, modes, upper, costs, shared, tight)
    pr = part.RankPricer(cm, s, modes, costs, shared)
    if pr.L % pr.v or pr.C < pr.p or (tight and not part.can_hold(pr)):
        return None
    A, B, K = pr.coefficients()
    best = None
    for floor, counts in sorted((_floor(pr, c, A, B, K), c) for c in split_counts(split, pr.C, pr.p, pr.v)):
        if floor >= upper:
            break
        t, evs = part.evaluate_counts(pr, counts)
        if t < upper:
            best, upper = (counts, t, evs), t
    return None if best is None else part.result(pr, *best)


def _floor(pr: part.RankPricer, counts: list[int], A: float, B: float, K: float) -> float:
    """A floor of ``evaluate_counts``: each rank's layers at their fastest allowed recompute, no data-parallel
    or optimizer time (``T = A max P + B sum P + K + max D + max O``, every term non-negative)."""
    P, o = [], 0
    for r, c in enumerate(counts):
        P.append(pr.base_time(o, c) + pr.edge_time(r))
        o += c
    return A * max(P) + B * sum(P) + K


def split_setting(stack: str, stages: list[tuple[int, int]], pp: int) -> str | None:
    """The configuration that makes ``stack`` run ``stages`` (virtual stages in model order): "" where it runs
    them without one, None where no setting of it does (``techniques.pipeline.SPLITS``)."""
    if pp == 1 or stack == "torch" or not stages:
        return ""
    stages = [tuple(x) for x in stages]
    layers, sizes = stages[-1][1], [b - a for a, b in stages]
    if stack == "torchtitan":
        return "" if stages == torchtitan_stages(layers, len(stages)) else \
            "parallelism.module_fqns_per_model_part = " + _fqns(stages)
    if stack == "deepspeed":
        return DEEPSPEED_TYPE if len(set(sizes)) == 1 else None
    if stack == "megatron" and len(stages) > pp and len(set(sizes)) > 1:
        return _accounted(layers, stages)
    if stack != "megatron":
        return None
    if len(set(sizes)) == 1:
        return ""
    if pp == 2:
        return f"{MEGATRON_FIRST} {sizes[0]}"
    m = sizes[1]
    if len(set(sizes[1:-1])) > 1:
        return None
    return " ".join(f"{flag} {n}" for flag, n in ((MEGATRON_FIRST, sizes[0]), (MEGATRON_LAST, sizes[-1])) if n != m)


def _accounted(layers: int, stages: list[tuple[int, int]]) -> str | None:
    """Megatron's account-for flags where they build ``stages`` (interleaved chunks one layer short at the ends:
    ``estimate.megatron_accounted_stages``), else None (no setting of this release runs them)."""
    sizes = [b - a for a, b in stages]
    return next((flags for (e, l), flags in MEGATRON_ACCOUNT.items()
                 if megatron_accounted_sizes(layers, len(stages), e, l) == sizes), None)


def _fqns(stages: list[tuple[int, int]]) -> str:
    """torchtitan's module names of each stage (``tok_embeddings``, ``layers.<i>``, ``norm``, ``output``), TOML."""
    parts = []
    for j, (a, b) in enumerate(stages):
        names = ["tok_embeddings"] * (j == 0) + [f"layers.{i}" for i in range(a, b)] + \
                ["norm", "output"] * (j == len(stages) - 1)
        parts.append("[" + ", ".join(f'"{n}"' for n in names) + "]")
    return "[" + ", ".join(parts) + "]"
