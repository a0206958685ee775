"""``Technique``: one parallelism or memory technique, declared in one place.

A technique names the ``Strategy`` fields it owns, its validity rules, the values the
search tries for each field, the public cost-model terms that price it and the codegen
function that applies it. Every consumer reads the declaration: ``Strategy`` resolution
and ``CostModel.check`` (``violations``), the planner's enumeration (``search`` values,
filtered by the same rules), and ``emit`` (the same rules again, before writing a program).

``rules`` say what is a strategy at all (``estimate`` prices any strategy that passes them, e.g.
a published run's); ``emit_rules`` add what the generated program runs today. The search tries
only strategies that pass both, so every plan it prints is one ``emit`` writes.

``stacks`` say what each software stack (``core.gpu.Runtime``) runs of the technique (``Runs``: the values
of its fields the stack takes, extra rules, and the stack's documentation that says so). ``estimate
--runtime S`` refuses what S does not run; ``plan --runtime S`` searches only what S runs
(``planner.space.allowed``: autopar's emit rules bind ``--runtime torch`` alone; a stack that shares one,
e.g. torchtitan running torch's schedules, lists it among its own rules). ``torch`` (PyTorch
itself) declares nothing beyond the rules: its search is autopar's program, the emit rules.
``RELEASES``: the release of a stack the declarations read, where they pin one.

A rule is a pure function ``(strategy, model spec or None, world size, seq_len or None) ->
[one-line violation, ...]``; rules that need the model return nothing when it is None.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from autopar.core.model_spec import ModelSpec
from autopar.core.strategy import COMPACT_KEYS, Strategy

Rule = Callable[[Strategy, "ModelSpec | None", int, "int | None"], list[str]]
# stack -> the release whose config keys and code the declarations cite (a stack not named: no one release)
RELEASES: dict[str, str] = {"torchtitan": "0.2.2", "llm-foundry": "0.22.0"}


@dataclass(frozen=True)
class Runs:
    """What one software stack runs of a technique: for each field named in ``values``, the values it
    takes (a field not named: every value the technique's rules allow); ``rules``: what else it refuses
    (same signature as a technique rule); ``source``: the stack's documentation or config keys."""

    source: str
    values: dict[str, tuple] = field(default_factory=dict)
    rules: tuple[Rule, ...] = ()

    def refusals(self, stack: str, fields: dict) -> list[str]:
        """The one-line refusal of each value in ``fields`` (field -> value, a partial strategy) the stack
        does not take, naming the field, the stack and what it runs instead."""
        return [f"{cli_key(f)}={cli_value(v)}: --runtime {stack} does not run it; it runs {cli_key(f)} "
                f"{' | '.join(cli_value(x) for x in self.values[f])} ({self.source})"
                for f, v in fields.items() if f in self.values and v not in self.values[f]]

    def violations(self, stack: str, s: Strategy, spec: ModelSpec | None, world: int,
                   seq_len: int | None) -> list[str]:
        return self.refusals(stack, {f: getattr(s, f) for f in self.values}) + \
            [msg for rule in self.rules for msg in rule(s, spec, world, seq_len)]


def cli_key(name: str) -> str:
    """A Strategy field as ``--strategy`` spells it."""
    return COMPACT_KEYS.get(name, name)


def cli_value(value) -> str:
    """A field value as ``--strategy`` spells it (booleans 0 / 1)."""
    return str(int(value)) if isinstance(value, bool) else str(value)


@dataclass(frozen=True)
class Technique:
    name: str
    fields: tuple[str, ...]                      # Strategy fields this technique owns
    rules: tuple[Rule, ...]                      # validity rules (see module docstring)
    search: dict[str, tuple | str]               # field -> values searched (a tuple) or how they are derived
    cost_terms: tuple[str, ...]                  # "module:qualname" of public terms in autopar.cost_models
    apply: str                                   # dotted name of its apply_* in autopar.codegen
    named_only: dict[str, tuple] = field(default_factory=dict)  # values searched only when the user names them
    emit_rules: tuple[Rule, ...] = ()            # what codegen cannot run yet (or torch refuses): not searched
    stacks: dict[str, Runs] = field(default_factory=dict)  # core.gpu.Runtime -> what that stack runs (every one)

    def violations(self, s: Strategy, spec: ModelSpec | None, world: int, seq_len: int | None,
                   emitted: bool = False, stack: str | None = None) -> list[str]:
        """The messages of every rule ``s`` breaks; ``emitted``: also the emit rules; ``stack``: also
        what that stack does not run (``stacks``)."""
        rules = self.rules + (self.emit_rules if emitted else ())
        out = [msg for rule in rules for msg in rule(s, spec, world, seq_len)]
        return out + (self.stacks[stack].violations(stack, s, spec, world, seq_len) if stack else [])


def builtin(spec: ModelSpec | None) -> bool:
    """A built-in architecture (known head / width structure), not a user module."""
    return spec is not None and spec.family != "custom"


def custom(spec: ModelSpec | None) -> bool:
    return spec is not None and spec.family == "custom"


def custom_refusal(knob: str, value: int, spec: ModelSpec | None = None) -> str:
    """A user module supports dp / zero / recompute=full; a transformers module also what
    ``spec.hf_parallel`` lists (its own tp plan, its decoder layer list), else ``hf_why_not`` says why."""
    if spec is not None and spec.hf_config is not None:
        why = spec.hf_why_not.get(knob, "not emitted for transformers modules")
        can = ", ".join(["dp", "zero stages", "recompute=full", *spec.hf_parallel])
        return f"{knob}={value}: {why}; this transformers module supports {can}"
    return (f"{knob}={value} needs the built-in architectures' module names; a custom module supports dp, "
            "zero stages and recompute=full only")
