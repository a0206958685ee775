"""The search's probes: unvalidated ``Strategy`` objects of a sharding (and knobs) that the bounds and the pricing
read, and the sharding a pricing depends on (``pricing_key``). Split out of ``bounds`` (which re-exports them)."""

from __future__ import annotations

from functools import lru_cache

from autopar.core.strategy import Strategy
from autopar.planner.space import Knobs, Sharding, strategy_defaults, strategy_with


def probe(sh: Sharding, gb: int, k: Knobs | None = None, **kw) -> Strategy:
    """A Strategy with this sharding, unvalidated (for bounds and pricing); read-only: without ``kw`` the same
    object comes back for the same arguments (``_shared_probe``)."""
    return _new_probe(sh, gb, k, kw) if kw else _shared_probe(sh, gb, k)


@lru_cache(maxsize=1 << 14)
def _shared_probe(sh: Sharding, gb: int, k: Knobs | None) -> Strategy:
    """``probe`` without extra fields, built once: the search's floors ask for the same configuration's probe
    from several terms (copies, gradient sync, recompute room, held gradients), 12 us a build against 1 us a hit."""
    return _new_probe(sh, gb, k, {})


def _new_probe(sh: Sharding, gb: int, k: Knobs | None, kw: dict) -> Strategy:
    if kw:
        vals = dict(dp=sh.dp, tp=sh.tp, pp=sh.pp, cp=sh.cp, ep=sh.ep, etp=sh.etp, micro_batch=sh.mbs,
                    global_batch=gb, sequence_parallel=sh.sp)
        if k is not None:
            vals.update(zero_stage=k.zero, offload_optimizer=k.offload, schedule=k.schedule, vpp=k.vpp)
        vals.update(kw)
        return strategy_with(_default_probe(), vals)   # a copy of the defaults: cheaper than model_construct
    # ``strategy_with`` spelled out for the fields every probe sets (4.8 -> 3.1 us): the same dict, in the same order
    d = _default_probe().__dict__.copy()
    d["dp"], d["tp"], d["pp"], d["cp"], d["ep"], d["etp"] = sh.dp, sh.tp, sh.pp, sh.cp, sh.ep, sh.etp
    d["micro_batch"], d["global_batch"], d["sequence_parallel"] = sh.mbs, gb, sh.sp
    if k is not None:
        d["zero_stage"], d["offload_optimizer"], d["schedule"], d["vpp"] = k.zero, k.offload, k.schedule, k.vpp
    out = Strategy.__new__(Strategy)
    object.__setattr__(out, "__dict__", d)
    object.__setattr__(out, "__pydantic_extra__", None)
    object.__setattr__(out, "__pydantic_fields_set__", set(_probe_fields(k is not None)))
    object.__setattr__(out, "__pydantic_private__", None)
    return out


@lru_cache(maxsize=2)
def _probe_fields(knobs: bool) -> frozenset:
    """The fields a probe sets (``strategy_with``'s fields-set): the defaults' and the sharding's (and the knobs')."""
    keys = {"dp", "tp", "pp", "cp", "ep", "etp", "micro_batch", "global_batch", "sequence_parallel"}
    return frozenset(_default_probe().__pydantic_fields_set__ | keys | (
        {"zero_stage", "offload_optimizer", "schedule", "vpp"} if knobs else set()))


@lru_cache(maxsize=1)
def _default_probe() -> Strategy:
    """The default Strategy, unvalidated (read-only: ``probe`` copies it)."""
    return Strategy.model_construct(**strategy_defaults())


def pricing_key(sh: Sharding) -> Sharding:
    """The sharding ``layer_costs`` depends on: per-layer prices do not depend on pp, and on dp
    only through ``dp / edp = ep*etp / (tp*cp)``, so dp = ep*etp prices every dp alike
    (tests/test_planner.py checks the claim)."""
    return Sharding(sh.tp, sh.cp, 1, sh.ep * sh.etp, sh.ep, sh.etp, sh.sp, sh.mbs)
