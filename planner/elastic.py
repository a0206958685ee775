"""Elastic re-plan: the same model on fewer (or more) GPUs, keeping the global batch.

``replan`` searches the new cluster with the planner's public ``search``, prices the old plan
again with today's cost model (so old and new step times compare), and for each of the top
candidates counts the training state every new rank must fetch: the weights and optimizer
states of its shards that the GPU it runs on did not already hold. State some surviving GPU
still holds comes from that peer; state only the lost GPUs held comes from the checkpoint.
Among the candidates within ``tolerance`` (2%) of the best step time it picks the one that
moves the least state (ElasWave, Sec. 4: reconfiguration cost is part of the choice).

The state model (an approximation, stated in docs/elastic.md): each layer's state is three
lines of length 1 — tensor-parallel weights (split in ``tp`` consecutive pieces, then each
piece in ``dp*cp`` pieces by ZeRO), tp-replicated weights (norms: split by ZeRO only) and
expert weights (split in ``ep*etp`` pieces, then by ZeRO over the expert-data-parallel
group). Weights are split by ZeRO-3 only, Adam states from ZeRO-1 on (memory.model_state_bytes).
Ranks are numbered pp, dp, cp, tp (tp innermost) like the emitted program's mesh; the new
rank ``i`` runs on the ``i``-th surviving GPU in the old rank order. Gradients are not state:
the first step after the restart recomputes them.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from autopar.core.strategy import Strategy
from autopar.cost_models.estimate import CostModel, even_stages
from autopar.cost_models.memory import bytes_per_param
from autopar.errors import InputError

CLASSES = ("tp", "rep", "exp")   # tensor-parallel, tp-replicated, expert weights
KINDS = ("w", "opt")             # weights, Adam states (fp32 master + moments)
TOLERANCE = 0.02                 # "within 2% of the best step time"


@dataclass(frozen=True)
class Layout:
    """Where a plan keeps its state: the strategy and its virtual pipeline stages."""

    strategy: Strategy
    stages: list[tuple[int, int]]
    world: int


@dataclass
class RankFetch:
    rank: int            # new rank
    gpu: int             # old rank index of the GPU it runs on (-1: a new GPU)
    from_peers_bytes: float
    from_checkpoint_bytes: float


@dataclass
class StateMove:
    """The state the new layout must fetch, per new rank and in total."""

    per_rank: list[RankFetch]
    total_state_bytes: float            # weights + Adam states of the whole model
    lost_gpus: list[int]                # old ranks that are gone

    @property
    def from_peers_bytes(self) -> float:
        return sum(r.from_peers_bytes for r in self.per_rank)

    @property
    def from_checkpoint_bytes(self) -> float:
        return sum(r.from_checkpoint_bytes for r in self.per_rank)

    @property
    def max_rank_bytes(self) -> float:
        return max((r.from_peers_bytes + r.from_checkpoint_bytes for r in self.per_rank), default=0.0)

    def as_dict(self) -> dict:
        return {"from_peers_bytes": self.from_peers_bytes, "from_checkpoint_bytes": self.from_checkpoint_bytes,
                "max_rank_bytes": self.max_rank_bytes, "total_state_bytes": self.total_state_bytes,
                "lost_gpus": self.lost_gpus, "per_rank": [asdict(r) for r in self.per_rank]}


@dataclass
class ElasticOption:
    candidate: object                  # planner.space.Candidate
    move: StateMove


@dataclass
class ElasticResult:
    old_step_time_s: float
    options: list[ElasticOption]       # the searched candidates, fastest first
    chosen: int                        # index into options
    global_batch: int
    notes: list[str] = field(default_factory=list)

    @property
    def best(self) -> ElasticOption:
        return self.options[self.chosen]


# ----- the state each rank holds ------------------------------------------------------------
def layer_params(cm: CostModel) -> dict:
    """Layer key (block index, ``embedding``, ``output``) -> parameters per class, whole model."""
    out = {}
    for t in cm.templates:
        per = {"tp": t.params_tp + t.params_vocab, "rep": t.params_rep, "exp": t.params_expert}
        keys = t.indices if t.kind == "block" else [t.kind]
        for k in keys:
            out[k] = per
    return out


def _owner_stage(layout: Layout, num_layers: int) -> dict:
    """Layer key -> the pipeline rank holding it (virtual stage ``i`` runs on pp rank ``i % pp``)."""
    pp = layout.strategy.pp
    own = {"embedding": 0, "output": (len(layout.stages) - 1) % pp}
    for i, (a, b) in enumerate(layout.stages):
        for layer in range(a, b):
            own[layer] = i % pp
    return own


def _piece(lo: float, width: float, n: int, i: int) -> tuple[float, float]:
    return lo + i * width / n, lo + (i + 1) * width / n


def rank_intervals(s: Strategy, rank: int) -> tuple[int, dict]:
    """(pp rank, {(class, kind): interval}) of one rank: the part of each layer line it holds."""
    tp_i = rank % s.tp
    c_i = rank // s.tp % s.cp
    d_i = rank // (s.tp * s.cp) % s.dp
    pp_i = rank // (s.tp * s.cp * s.dp)
    dc, n_dc = d_i * s.cp + c_i, s.dp * s.cp
    g = dc * s.tp + tp_i                  # index among the dp*cp*tp ranks of the stage
    n_e = s.ep * s.etp
    e_i, edp_i, n_edp = g % n_e, g // n_e, max(s.dp * s.cp * s.tp // n_e, 1)
    base = {"tp": ((tp_i / s.tp, (tp_i + 1) / s.tp), dc, n_dc), "rep": ((0.0, 1.0), dc, n_dc),
            "exp": ((e_i / n_e, (e_i + 1) / n_e), edp_i, n_edp)}
    out = {}
    for cls, ((lo, hi), j, n) in base.items():
        shard = _piece(lo, hi - lo, n, j)
        out[(cls, "w")] = shard if s.zero_stage >= 3 else (lo, hi)
        out[(cls, "opt")] = shard if s.zero_stage >= 1 else (lo, hi)
    return pp_i, out


def _overlap(a: tuple[float, float], b: tuple[float, float]) -> float:
    return max(0.0, min(a[1], b[1]) - max(a[0], b[0]))


def _merge(intervals: list[tuple[float, float]]) -> list[tuple[float, float]]:
    out: list[list[float]] = []
    for lo, hi in sorted(intervals):
        if out and lo <= out[-1][1] + 1e-12:
            out[-1][1] = max(out[-1][1], hi)
        else:
            out.append([lo, hi])
    return [(a, b) for a, b in out]


# ----- the state each new rank fetches -----------------------------------------------------
def _groups(cm: CostModel, old: Layout, new: Layout) -> dict:
    """New pp rank -> old pp rank -> parameters per class of the layers both hold (layers with
    the same two owners are fetched alike, so they are summed once)."""
    params = layer_params(cm)
    old_own, new_own = _owner_stage(old, cm.num_layers), _owner_stage(new, cm.num_layers)
    out: dict = {}
    for layer, per in params.items():
        acc = out.setdefault(new_own[layer], {}).setdefault(old_own[layer], dict.fromkeys(CLASSES, 0.0))
        for cls in CLASSES:
            acc[cls] += per[cls]
    return out


def _unions(old: Layout, survivors: list[int]) -> tuple[dict, dict]:
    """Each survivor's holdings, and per (old pp rank, class, kind) the union over survivors."""
    held = {r: rank_intervals(old.strategy, r) for r in survivors}
    raw: dict = {}
    for p, iv in held.values():
        for key, itv in iv.items():
            raw.setdefault((p, *key), []).append(itv)
    return held, {k: _merge(v) for k, v in raw.items()}


def state_move(cm: CostModel, old: Layout, new: Layout, lost: list[int]) -> StateMove:
    """Bytes each new rank must fetch: from surviving peers where one holds them, else from the checkpoint."""
    p_bytes, _, o_bytes = bytes_per_param(cm.dtype)
    per_kind = {"w": p_bytes, "opt": o_bytes}
    gone = set(lost)
    survivors = [r for r in range(old.world) if r not in gone]
    held, unions = _unions(old, survivors)
    groups = _groups(cm, old, new)
    ranks = []
    for i in range(new.world):
        p_new, need = rank_intervals(new.strategy, i)
        gpu = survivors[i] if i < len(survivors) else -1
        p_held, have = held.get(gpu, (None, {}))
        peers = ckpt = 0.0
        for p_old, per_cls in groups.get(p_new, {}).items():
            for cls, n in per_cls.items():
                for kind in KINDS if n else ():
                    itv, nbytes = need[(cls, kind)], n * per_kind[kind]
                    local = _overlap(itv, have[(cls, kind)]) if p_held == p_old else 0.0
                    alive = sum(_overlap(itv, u) for u in unions.get((p_old, cls, kind), []))
                    peers += (alive - local) * nbytes
                    ckpt += (itv[1] - itv[0] - alive) * nbytes
        ranks.append(RankFetch(i, gpu, peers, ckpt))
    total = sum(sum(per.values()) for per in layer_params(cm).values()) * (p_bytes + o_bytes)
    return StateMove(ranks, total, sorted(gone))


# ----- the re-plan ------------------------------------------------------------------------
def plan_layout(plan, num_layers: int) -> Layout:
    """A Plan's layout; stages from the plan, else the even split the cost model prices."""
    s = plan.strategy
    stages = [(st.layer_start, st.layer_end) for st in plan.stages] or even_stages(num_layers, s.pp * s.vpp)
    return Layout(s, stages, plan.cluster.world)


def lost_ranks(old_world: int, gpus_per_node: int, new_world: int, lost_nodes: list[int] | None) -> list[int]:
    """Old ranks that are gone: those of ``lost_nodes``, else the last ``old - new`` ranks."""
    if lost_nodes:
        nodes = old_world // gpus_per_node
        bad = [n for n in lost_nodes if not 0 <= n < nodes]
        if bad:
            raise InputError(f"--lost-nodes: node {bad[0]} is not in 0..{nodes - 1}; fix: name nodes of the old plan")
        return sorted(r for n in lost_nodes for r in range(n * gpus_per_node, (n + 1) * gpus_per_node))
    return list(range(new_world, old_world)) if new_world < old_world else []


def old_step_time(cm_old: CostModel, plan, layout: Layout) -> tuple[float, str | None]:
    """The old plan priced again by today's cost model (comparable with the new), or its recorded
    prediction when today's model cannot price it."""
    try:
        est = cm_old.estimate(plan.strategy, layout.stages, list(plan.layer_recompute) or None)
        return est.step_time_s, None
    except (InputError, ValueError, KeyError) as exc:
        recorded = plan.predictions.get("step_time_s")
        if not isinstance(recorded, (int, float)):
            raise InputError(f"--from: the old plan cannot be priced ({exc}) and records no step_time_s; "
                             "fix: re-run `autopar plan` for it") from None
        return float(recorded), f"old step time: the plan's recorded prediction ({exc})"


def replan(cm_old: CostModel, cm_new: CostModel, plan, global_batch: int, cons=None, lost: list[int] | None = None,
           top_k: int = 8, tolerance: float = TOLERANCE) -> ElasticResult:
    """Search the new cluster, count the state each candidate moves, choose the least-moving
    candidate within ``tolerance`` of the fastest."""
    from autopar.planner.search import search

    old = plan_layout(plan, cm_old.num_layers)
    old_t, note = old_step_time(cm_old, plan, old)
    res = search(cm_new, global_batch, cons, top_k=top_k)
    if not res.candidates:
        return ElasticResult(old_t, [], -1, global_batch, [note] if note else [])
    lost = lost if lost is not None else lost_ranks(old.world, plan.cluster.gpus_per_node, cm_new.cluster.world, None)
    options = [ElasticOption(c, state_move(cm_new, old, Layout(c.strategy, c.stages, cm_new.cluster.world), lost))
               for c in res.candidates]
    return ElasticResult(old_t, options, choose(options, tolerance), res.global_batch, [note] if note else [])


def choose(options: list[ElasticOption], tolerance: float = TOLERANCE) -> int:
    """Index of the option moving the least state among those within ``tolerance`` of the fastest."""
    best = min(o.candidate.step_time_s for o in options)
    near = [i for i, o in enumerate(options) if o.candidate.step_time_s <= best * (1 + tolerance)]
    return min(near, key=lambda i: (options[i].move.from_peers_bytes + options[i].move.from_checkpoint_bytes,
                                    options[i].candidate.step_time_s))
