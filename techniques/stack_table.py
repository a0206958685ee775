"""The stack x technique table of docs/planner.md, written from the declarations (``Technique.stacks``,
``precision.FP8``), never by hand: ``python -m autopar.techniques.stack_table`` prints it and
tests/test_stack_space.py checks that the doc holds exactly this text."""

from __future__ import annotations

from typing import get_args

from autopar import techniques
from autopar.core.gpu import Runtime
from autopar.techniques.base import RELEASES, cli_key, cli_value
from autopar.techniques.precision import FP8
from autopar.techniques.recompute import LAYOUTS

STACKS: tuple[str, ...] = get_args(Runtime)
# the fields shown: every field some stack narrows (``Runs.values``), in the techniques' order; the others (dp, mbs,
# gbs) every stack runs at any value
SHOWN: tuple[str, ...] = tuple(f for t in techniques.ALL for f in t.fields
                               if any(f in t.stacks[s].values for s in STACKS))


def cell(stack: str, name: str) -> str:
    runs = next(t.stacks[stack] for t in techniques.ALL if name in t.fields)
    vals = runs.values.get(name)
    return "any" if vals is None else " \\| ".join(cli_value(v) for v in vals)


def rows() -> list[str]:
    head = ["| field | " + " | ".join(STACKS) + " |", "|---" * (len(STACKS) + 1) + "|"]
    body = [f"| {cli_key(n)} | " + " | ".join(cell(s, n) for s in STACKS) + " |" for n in SHOWN]
    fp8 = "| dtype fp8 (plan) | " + " | ".join("yes" if FP8[s] else "no" for s in STACKS) + " |"
    return head + body + [layout_row(), fp8]


def layout_row() -> str:
    """How each stack places its recompute modes on the layers (``recompute.LAYOUTS``)."""
    bar = " \\| "
    cells = ["; ".join(f"{bar.join(x.modes)}: {MIX_SHORT[x.mix]}{MODELS_SHORT[x.models]}" for x in LAYOUTS[s])
             for s in STACKS]
    return "| recompute layers | " + " | ".join(cells) + " |"


MIX_SHORT = {"per_layer": "per layer", "uniform": "every layer", "first_n": "first N of each stage",
             "every_nth": "every N-th of each rank"}
MODELS_SHORT = {"any": "", "mpt": " (MPT models)", "not_mpt": " (other models)"}   # recompute.is_mpt


def rules() -> list[str]:
    """One line per extra rule a stack declares: the stack, the technique and the rule's first sentence."""
    out = []
    for t in techniques.ALL:
        for stack in STACKS:
            for rule in t.stacks[stack].rules:
                doc = " ".join((rule.__doc__ or rule.__qualname__).replace("``", "`").split())
                out.append(f"- {stack}, {t.name}: {doc.split('. ')[0].rstrip('.')}.")
    return out


def sources() -> list[str]:
    return [f"- {stack}, {t.name}: {t.stacks[stack].source}" for stack in STACKS if stack != "torch"
            for t in techniques.ALL] + [f"- {s}, fp8: {how}" for s, how in FP8.items() if how]


def markdown() -> str:
    pinned = ", ".join(f"{s} {v}" for s, v in RELEASES.items())
    return "\n".join(rows() + ["", "Rules beyond the values:", "", *rules(), "", "Where each stack says so:", "",
                               *sources(), "", f"Releases read: {pinned}."]) + "\n"


if __name__ == "__main__":
    print(markdown(), end="")
