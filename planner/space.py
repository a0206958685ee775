"""The search space: what the user fixes (``Constraints``) and the configurations the planner
enumerates, read from the techniques' declarations (``autopar.techniques``): their searched
values, filtered by their rules *and* their emit rules, so every configuration is one that
``emit`` writes a program for.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from functools import lru_cache
from typing import NamedTuple

from autopar import techniques
from autopar.core.model_spec import ModelSpec
from autopar.core.strategy import FIELDS, Strategy
from autopar.cost_models.estimate import CostModel, Estimate
from autopar.cost_models.layer_cost import RECOMPUTE_MODES
from autopar.errors import InputError
from autopar.techniques import context_parallel, data_parallel, expert_parallel, offload, pipeline, tensor_parallel
from autopar.techniques.base import Technique

STRATEGY_FIELDS = FIELDS
CAPS = {"tp": "max_tp", "pp": "max_pp", "cp": "max_cp", "ep": "max_ep", "micro_batch": "max_mbs"}


@dataclass
class Constraints:
    """What the user fixes (Strategy field -> value) and the caps that narrow the space."""

    fixed: dict = field(default_factory=dict)
    max_tp: int | None = None
    max_pp: int | None = None
    max_cp: int | None = None
    max_ep: int | None = None
    max_mbs: int | None = None
    cross_node: bool = False     # lift "tp and ep*etp stay inside a node"
    schedules: tuple[str, ...] | None = None   # pipeline schedules allowed (None: every one)
    recompute_modes: tuple[str, ...] | None = None  # per-layer modes the stack runs (None: every priced one)

    def __post_init__(self):
        bad = set(self.fixed) - set(STRATEGY_FIELDS)
        if bad:
            raise InputError(f"constraints: unknown field(s) {', '.join(sorted(bad))}")
        Strategy.build(**self.fixed)   # types and ranges, as one-line InputErrors
        self.fixed = {k: v for k, v in self.fixed.items() if not (k == "dp" and v == -1)}

    def ok(self, name: str, value) -> bool:
        if name in self.fixed and self.fixed[name] != value:
            return False
        cap = getattr(self, CAPS[name]) if name in CAPS else None
        return cap is None or value <= cap

    @property
    def modes(self) -> tuple[str, ...]:
        return (self.fixed["recompute"],) if "recompute" in self.fixed else self.recompute_modes or RECOMPUTE_MODES


def for_stack(cm: CostModel, cons: Constraints) -> Constraints:
    """``cons`` narrowed to what the cost model's software stack runs (``techniques``' ``stacks``
    declarations): a fixed value the stack does not run is a one-line InputError; the per-layer
    recompute modes are the stack's (the other fields are narrowed by ``allowed``)."""
    for msg in techniques.stack_refusals(cm.stack_name, cons.fixed):
        raise InputError(f"strategy: {msg}")
    modes = techniques.stack_values(cm.stack_name, "recompute", RECOMPUTE_MODES)
    return cons if modes == RECOMPUTE_MODES else replace(cons, recompute_modes=modes)


@dataclass
class Candidate:
    strategy: Strategy
    stages: list[tuple[int, int]]
    layer_recompute: list[str]
    step_time_s: float
    estimate: Estimate | None = None


@dataclass
class SearchStats:
    space: int = 0            # configurations satisfying the rules and constraints
    pruned_memory: int = 0    # ruled out by the memory floor before pricing
    enumerated: int = 0       # configurations given their own time bound (their schedule group left the queue)
    pruned_time: int = 0      # bound no better than the k-th best: never partitioned
    priced: int = 0           # ran the stage-partition DP
    infeasible: int = 0       # partitioned, but no layout fits in memory or beats the k-th best
    layer_pricings: int = 0   # distinct intra-stage shardings priced (CostModel.layer_costs)
    search_time_s: float = 0.0
    from_cache: str | None = None  # when the search that made this result ran (planner/search_cache.py); None: now

    def as_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass
class SearchResult:
    candidates: list[Candidate]
    stats: SearchStats
    global_batch: int
    rule_error: str | None = None     # a model rule that rejected configurations (none expected)


class Sharding(NamedTuple):
    """The intra-stage sharding and pipeline depth: what ``layer_costs`` and the floors need."""

    tp: int
    cp: int
    pp: int
    dp: int
    ep: int
    etp: int
    sp: bool
    mbs: int

    @property
    def edp(self) -> int:
        return self.dp * self.tp * self.cp // (self.ep * self.etp)


class Knobs(NamedTuple):
    """The rest of a configuration: they reuse the sharding's pricing."""

    zero: int
    offload: bool
    schedule: str
    vpp: int


# ----- enumeration ------------------------------------------------------------------------------
def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


@lru_cache(maxsize=8)
def rule_spec(cm: CostModel) -> ModelSpec:
    """The model as the rules see it (custom modules carry layers=0: count the blocks)."""
    return cm.spec.model_copy(update={"layers": cm.spec.layers or cm.num_layers})


def allowed(cm: CostModel, tech: Technique, s: Strategy) -> bool:
    """``s`` passes the technique's rules and what the cost model's stack runs: under ``--runtime torch`` the emit
    rules (autopar's program), under another stack its own rules (``Runs.rules``: torchtitan's include what torch's
    schedules and checkpointing refuse, the torch rules it shares), not autopar's emit rules."""
    return not tech.violations(s, rule_spec(cm), cm.cluster.world, cm.seq_len, emitted=emits(cm), stack=cm.stack_name)


def emits(cm: CostModel) -> bool:
    """The plan is autopar's emitted program (``--runtime torch``): the search keeps to the emit rules."""
    return cm.stack_name == "torch"


def allowed_shape(cm: CostModel, tech: Technique, **degrees) -> bool:
    """``allowed(cm, tech, shape(**degrees))``, memoized: rules are pure functions of the strategy,
    the model, the world size and the sequence (``techniques.base``), and the enumeration asks the
    same question for every micro-batch and every row (a pydantic construction each time)."""
    return _allowed(cm, tech.name, tuple(sorted(degrees.items())))


@lru_cache(maxsize=1 << 16)
def _allowed(cm: CostModel, name: str, degrees: tuple) -> bool:
    return allowed(cm, _TECHS[name], shape(**dict(degrees)))


_TECHS = {t.name: t for t in (context_parallel.TECHNIQUE, data_parallel.TECHNIQUE, expert_parallel.TECHNIQUE,
                              offload.TECHNIQUE, pipeline.TECHNIQUE, tensor_parallel.TECHNIQUE)}


@lru_cache(maxsize=1)
def strategy_defaults() -> dict:
    """The default Strategy as a dict (read-only: callers copy it)."""
    return Strategy().model_dump()


def shape(**degrees) -> Strategy:
    """An unvalidated strategy with these fields (the rest default) for the rules to read."""
    return strategy_with(_default_shape(), degrees)


def strategy_with(base: Strategy, update: dict) -> Strategy:
    """``base.model_copy(update=update)``, unvalidated, without pydantic's generic copy (``copy.copy`` of
    three attributes: 8.5 us against 3.9 us; the search builds thousands of probes and rule shapes): the
    same fields and fields-set, no extra fields (Strategy forbids them) and no private attributes (it has
    none). ``tests/test_search_best_only.py`` checks it against ``model_copy``."""
    out = Strategy.__new__(Strategy)
    object.__setattr__(out, "__dict__", {**base.__dict__, **update})
    object.__setattr__(out, "__pydantic_extra__", None)
    object.__setattr__(out, "__pydantic_fields_set__", base.__pydantic_fields_set__ | update.keys())
    object.__setattr__(out, "__pydantic_private__", None)
    return out


@lru_cache(maxsize=1)
def _default_shape() -> Strategy:
    """The default Strategy, unvalidated (read-only: ``shape`` copies it)."""
    return Strategy.model_construct(**strategy_defaults())


def tp_ok(cm: CostModel, tp: int) -> bool:
    """Some sequence-parallel setting runs ``tp`` (torchtitan runs tp with sp only)."""
    return any(allowed_shape(cm, tensor_parallel.TECHNIQUE, tp=tp, dp=1, sequence_parallel=x)
               for x in tensor_parallel.SP_VALUES)


def meshes(cm: CostModel, cons: Constraints, gb: int):
    """(tp, cp, pp, dp) of the dense mapping."""
    world, gpn = cm.cluster.world, cm.cluster.gpus_per_node
    for tp in divisors(world):
        if not cons.ok("tp", tp) or not tp_ok(cm, tp) or (not cons.cross_node and gpn % tp):
            continue
        for cp in divisors(world // tp):
            if not cons.ok("cp", cp) or not allowed_shape(cm, context_parallel.TECHNIQUE, cp=cp, dp=1):
                continue
            for pp in divisors(world // (tp * cp)):
                dp = world // (tp * cp * pp)
                if cons.ok("pp", pp) and cons.ok("dp", dp) and gb % dp == 0 and \
                        allowed_shape(cm, pipeline.TECHNIQUE, pp=pp, dp=dp):
                    yield tp, cp, pp, dp


def expert_maps(cm: CostModel, cons: Constraints, tp: int, cp: int, pp: int, dp: int):
    spec, gpn = cm.spec, cm.cluster.gpus_per_node
    eps = divisors(spec.num_experts) if spec.is_moe else [1]
    etps = divisors(spec.moe_ffn_hidden) if spec.is_moe else [1]
    for ep in eps:
        for etp in etps:
            if not (cons.ok("ep", ep) and cons.ok("etp", etp)):
                continue
            if not allowed_shape(cm, expert_parallel.TECHNIQUE, tp=tp, cp=cp, pp=pp, dp=dp, ep=ep, etp=etp):
                continue
            if cons.cross_node or gpn % (ep * etp) == 0:
                yield ep, etp


def shardings(cm: CostModel, cons: Constraints, gb: int):
    """Rows of shardings that differ only in the micro-batch, mbs ascending."""
    for tp, cp, pp, dp in meshes(cm, cons, gb):
        sps = [x for x in tensor_parallel.SP_VALUES if cons.ok("sequence_parallel", x)
               and allowed_shape(cm, tensor_parallel.TECHNIQUE, tp=tp, cp=cp, dp=dp, sequence_parallel=x)
               and not (cm.ctx.tp_comm_overlap and tp > 1 and not x)]  # Megatron-Core's overlap needs sp
        mbs = [b for b in divisors(gb // dp) if cons.ok("micro_batch", b)]
        for ep, etp in expert_maps(cm, cons, tp, cp, pp, dp):
            for sp in sps:
                yield [Sharding(tp, cp, pp, dp, ep, etp, sp, b) for b in mbs]


def schedule_options(cm: CostModel, cons: Constraints, pp: int, m: int) -> list[tuple[str, int]]:
    """(schedule, vpp) pairs for a pipeline of ``pp`` ranks and ``m`` micro-batches: the pipeline
    technique's searched schedules (and the named-only ones when the user names a schedule or
    vpp; GPipe also when ``m < pp``), each with the vpp values it runs, kept when the pipeline
    rules and emit rules pass.
    Looped schedules need ``v | layers`` and, unless named, ``(p - 1) m >= v p`` (the condition
    under which per-rank recompute is exact, see ``partition``)."""
    L = cm.num_layers
    named = "schedule" in cons.fixed or "vpp" in cons.fixed
    # GPipe stands in for 1F1B when m < pp (torch's 1F1B refuses it; both price and hold the same)
    fallback = ("gpipe",) if pp > 1 and m < pp and not named else ()
    out = []
    for sched in pipeline.SEARCHED + (pipeline.NAMED_ONLY if named else fallback):
        if cons.schedules is not None and sched not in cons.schedules:
            continue
        if sched in pipeline.LOOPED:
            vs = [v for v in range(2, L // pp + 1) if L % v == 0 and ((pp - 1) * m >= v * pp or named)]
        else:
            vs = [2] if sched in pipeline.V_SHAPED else [1]
        out += [(sched, v) for v in vs]
    ok = [(sc, v) for sc, v in out if cons.ok("schedule", sc) and cons.ok("vpp", v)
          and allowed_shape(cm, pipeline.TECHNIQUE, pp=pp, vpp=v, schedule=sc, dp=1, global_batch=m)]
    return ok


def knob_options(cm: CostModel, cons: Constraints, sh: Sharding, gb: int, cache: dict | None = None) -> list[Knobs]:
    reduced = sh.dp * sh.cp > 1 or sh.edp > 1
    m = gb // (sh.dp * sh.mbs)
    # what the rules read of the sharding (beside pp): a reduced gradient, and data parallel beside another
    # parallelism (torchtitan's DDP runs alone: data_parallel.torchtitan_ddp_rule)
    key = (reduced, sh.pp, m, sh.dp * sh.cp > 1 and max(sh.tp, sh.cp, sh.ep) > 1)
    if cache is not None and key in cache:
        return cache[key]
    # without a reduced gradient every ZeRO stage is the same configuration: keep one
    stages = data_parallel.ZERO_STAGES if reduced else (cons.fixed.get("zero_stage", 0),)
    zeros = [z for z in stages if cons.ok("zero_stage", z)   # a fixed stage the stack refuses: none
             and allowed_shape(cm, data_parallel.TECHNIQUE, zero_stage=z, pp=sh.pp, dp=sh.dp, tp=sh.tp, cp=sh.cp,
                               ep=sh.ep)]
    offs = [x for x in (offload.VALUES if offload.priced_on(cm.gpu) else (False,)) if cons.ok("offload_optimizer", x)]
    scheds = schedule_options(cm, cons, sh.pp, m)   # once, not once per (zero, offload) pair
    # offload below ZeRO-3 runs ZeRO-2's program: offered once, as zero=2 (techniques.offload.stage_rule)
    pairs = [(z, o) for z in zeros for o in offs if not o or allowed_shape(
        cm, offload.TECHNIQUE, dp=sh.dp, cp=sh.cp, tp=sh.tp, ep=sh.ep, etp=sh.etp, zero_stage=z, offload_optimizer=o)]
    # the schedules whose rules read the ZeRO stage or offload (torch_rule), checked with them
    out = [Knobs(z, o, s, v) for z, o in pairs for s, v in scheds
           if s not in pipeline.ZERO_BUBBLE + pipeline.LOOPED or allowed_shape(
               cm, pipeline.TECHNIQUE, pp=sh.pp, dp=sh.dp, micro_batch=sh.mbs, global_batch=gb, zero_stage=z,
               offload_optimizer=o, schedule=s, vpp=v)]
    if cache is not None:
        cache[key] = out
    return out


@dataclass(frozen=True)
class KnobSet:
    """What the row bounds read of a row's ``knob_options`` list, worked out once per list (rows of
    one pipeline depth and micro-batch count share it)."""

    knobs: list          # the list itself (keeps its id valid while the summary lives)
    zero: int            # the highest ZeRO stage
    offload: bool        # offload among the options
    schedules: tuple     # one Knobs per (schedule, vpp), in first-seen order
    pairs: tuple         # the distinct (schedule, vpp)
    states: tuple        # one Knobs per (zero, offload), in first-seen order
    groups: tuple        # the knobs of each (schedule, vpp), in first-seen order
    least: tuple         # each group's (highest ZeRO stage, offload among them): no state of the group is smaller


def knob_set(knobs: list) -> KnobSet:
    groups: dict[tuple, list[Knobs]] = {}
    for k in knobs:
        groups.setdefault((k.schedule, k.vpp), []).append(k)
    return KnobSet(knobs, max(k.zero for k in knobs), any(k.offload for k in knobs),
                   tuple({(k.schedule, k.vpp): k for k in knobs}.values()),
                   tuple({(k.schedule, k.vpp) for k in knobs}),
                   tuple({(k.zero, k.offload): k for k in knobs}.values()), tuple(groups.values()),
                   tuple((max(k.zero for k in g), any(k.offload for k in g)) for g in groups.values()))
