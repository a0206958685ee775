"""One module per technique; ``ALL`` is the registry every consumer reads (see ``base``).

To add a technique: declare its ``Technique`` in a new module here (fields, rules, searched
values, cost terms, apply_*), add it to ``ALL``, give the planner its searched values, and
``tests/test_techniques.py`` checks the rest (every field owned once, every apply_* and cost
term resolves, every searched value passes emit's checks).
"""

from __future__ import annotations

from autopar.core.model_spec import ModelSpec
from autopar.core.strategy import Strategy
from autopar.errors import InputError
from autopar.techniques import (
    context_parallel,
    data_parallel,
    expert_parallel,
    offload,
    pipeline,
    recompute,
    tensor_parallel,
)
from autopar.techniques.base import Technique

ALL: tuple[Technique, ...] = tuple(m.TECHNIQUE for m in (
    data_parallel, tensor_parallel, context_parallel, pipeline, expert_parallel, recompute, offload))


def violations(s: Strategy, spec: ModelSpec | None, world: int, seq_len: int | None = None,
               emitted: bool = False, stack: str | None = None) -> list[str]:
    """Every rule of every technique the strategy breaks (model rules only when ``spec`` is given;
    ``emitted``: also what the code generator cannot run; ``stack``: also what that software stack,
    a ``core.gpu.Runtime``, does not run)."""
    return [msg for t in ALL for msg in t.violations(s, spec, world, seq_len, emitted, stack)]


def check(s: Strategy, spec: ModelSpec | None = None, seq_len: int | None = None, emitted: bool = False,
          stack: str | None = None) -> Strategy:
    """Raise the first violation as a one-line InputError; return the strategy."""
    for msg in violations(s, spec, s.world, seq_len, emitted, stack):
        raise InputError(f"strategy: {msg}")
    return s


def stack_refusals(stack: str, fields: dict) -> list[str]:
    """What ``stack`` does not run of a partial strategy (field -> value, e.g. the knobs ``plan`` fixes),
    by the techniques' value tables (``base.Runs.values``)."""
    return [msg for t in ALL for msg in t.stacks[stack].refusals(stack, fields)]


def stack_violations(stack: str, fields: dict, world: int, seq_len: int | None = None,
                     spec: ModelSpec | None = None) -> list[str]:
    """What ``stack`` does not run of a partial strategy (field -> value, e.g. the knobs ``plan`` fixes): its values
    (``stack_refusals``) and its own rules (``base.Runs.rules``; their model rules, e.g. torchtitan's tied
    embeddings under pp, only when ``spec`` is given), the unfixed fields at their defaults (degree 1, no ZeRO:
    where the stacks' rules are the least restrictive); none where ``fields`` do not build a strategy."""
    try:
        s = Strategy.build(**fields)
    except InputError:
        return []
    return [msg for t in ALL for msg in t.stacks[stack].violations(stack, s, spec, world, seq_len)]


def stack_values(stack: str, name: str, default: tuple) -> tuple:
    """The values of Strategy field ``name`` that ``stack`` runs, in ``default``'s order (``default``: every
    value the search would try; a field the stack does not narrow keeps it)."""
    allowed = next(t.stacks[stack].values.get(name) for t in ALL if name in t.fields)
    return default if allowed is None else tuple(v for v in default if v in allowed)


def resolve(s: Strategy, world: int, global_batch: int | None = None, spec: ModelSpec | None = None,
            seq_len: int | None = None) -> Strategy:
    """``Strategy.resolve`` (degrees) and then every technique rule."""
    return check(s.resolve(world, global_batch), spec, seq_len)
