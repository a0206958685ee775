"""The search's probes: unvalidated ``Strategy`` objects of a sharding (and knobs) that the bounds and the pricing
read, and the sharding a pricing depends on (``pricing_key``). Split out of ``bounds`` (which re-exports them)."""

from __future__ import annotations

from functools import lru_cache

from autopar.core.strategy import Strategy
from autopar.planner.space import Knobs, Sharding, strategy_defaults, strategy_with

# The Strategy fields a probe sets from its sharding (and global batch), and from its knobs: the one list of them.
SHARDING_FIELDS = ("dp", "tp", "pp", "cp", "ep", "etp", "micro_batch", "global_batch", "sequence_parallel")
KNOB_FIELDS = ("zero_stage", "offload_optimizer", "schedule", "vpp")


def probe(sh: Sharding, gb: int, k: Knobs | None = None, **kw) -> Strategy:
    """A Strategy with this sharding, unvalidated (for bounds and pricing); read-only: without ``kw`` the same
    object comes back for the same arguments (``_shared_probe``), with ``kw`` a copy of it that sets them."""
    shared = _shared_probe(sh, gb, k)
    return strategy_with(shared, kw) if kw else shared


@lru_cache(maxsize=1 << 14)
def _shared_probe(sh: Sharding, gb: int, k: Knobs | None) -> Strategy:
    """``probe`` without extra fields, built once: the search's floors ask for the same configuration's probe
    from several terms (copies, gradient sync, recompute room, held gradients), 12 us a build against 1 us a hit.
    ``strategy_with`` of the defaults spelled out (its fields-set once per knobs or not, ``_probe_fields``)."""
    if k is None:
        d = _default_probe().__dict__.copy()   # every field, in order: the updates keep it
        d.update(zip(SHARDING_FIELDS, (sh.dp, sh.tp, sh.pp, sh.cp, sh.ep, sh.etp, sh.mbs, gb, sh.sp)))
    else:   # the sharding's own probe (most knobs of a sharding are asked for) with the knobs' fields
        d = _shared_probe(sh, gb, None).__dict__.copy()
        d.update(zip(KNOB_FIELDS, (k.zero, k.offload, k.schedule, k.vpp)))
    out = _new(Strategy)   # BaseModel defines no __new__: object's, bound once (the class lookup costs more)
    _set(out, "__dict__", d)
    _set(out, "__pydantic_extra__", None)
    _set(out, "__pydantic_fields_set__", set(_probe_fields(k is not None)))
    _set(out, "__pydantic_private__", None)
    return out


_new, _set = object.__new__, object.__setattr__


@lru_cache(maxsize=2)
def _probe_fields(knobs: bool) -> frozenset:
    """The fields a probe sets (``strategy_with``'s fields-set): the defaults' and the sharding's (and the knobs')."""
    return frozenset(_default_probe().__pydantic_fields_set__.union(SHARDING_FIELDS, KNOB_FIELDS if knobs else ()))


@lru_cache(maxsize=1)
def _default_probe() -> Strategy:
    """The default Strategy, unvalidated (read-only: ``probe`` copies it)."""
    return Strategy.model_construct(**strategy_defaults())


def pricing_key(sh: Sharding) -> Sharding:
    """The sharding ``layer_costs`` depends on: per-layer prices do not depend on pp, and on dp
    only through ``dp / edp = ep*etp / (tp*cp)``, so dp = ep*etp prices every dp alike
    (tests/test_planner.py checks the claim)."""
    return Sharding(sh.tp, sh.cp, 1, sh.ep * sh.etp, sh.ep, sh.etp, sh.sp, sh.mbs)
