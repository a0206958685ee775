"""Refit one software stack's own constants over its published rows, every hardware level and every other
stack held at the shipped values (``profiles/hardware/*.yaml``): what a pricing change inside one stack
refits without moving the constants other stacks' rows were fitted with.

    python benchmarks/calibrate_stack.py --stack llm-foundry --cache PICKLE [--write]

The same descent as ``calibrate_modern.fit`` (its grids, bounds, objective and ``--fine`` / ``--over-weight``
defaults) restricted to the stack's entries: per sweep each GPU type's entry descends its choices
(``fields_for``) and the hardware-level fields it already overrides, then tries overriding the others
(``_overrides``: kept only where its rows gain ``OVERRIDE_GAIN``). ``--write`` replaces only that stack's
line in each profile of the GPU types it ran on.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import get_args

sys.path.insert(0, str(Path(__file__).resolve().parent))
import calibrate_modern as cal  # noqa: E402
import published_rows as pr  # noqa: E402

from autopar.core.gpu import Runtime, StackConstants  # noqa: E402
from autopar.fileio import write_atomic  # noqa: E402
from autopar.profiles.hw import load_gpu_profile  # noqa: E402

PROFILE_DIR = Path(__file__).resolve().parents[1] / "profiles" / "hardware"


def shipped(built: list[cal.Built]) -> cal.Fitted:
    """The constants the profiles ship, as a ``Fitted``: each GPU type's hardware level and stack entries
    (read from its first profile; ``calibrate_modern.write_profiles`` writes the same block to each)."""
    out = cal.Fitted()
    for gtype in sorted({b.group[0] for b in built}):
        gpu = load_gpu_profile(cal.PROFILES[gtype][0])
        out.gpu[gtype] = gpu.gpu_constants
        out.stacks.update({(gtype, rt): c for rt, c in gpu.stacks.items()})
    return out


def fit_stack(built: list[cal.Built], stack: str) -> cal.Fitted:
    """``shipped`` with ``stack``'s entries refitted on their own rows (module docstring)."""
    fitted = shipped(built)
    groups: dict[tuple[str, str], list[cal.Built]] = {}
    for b in built:
        if b.group[1] == stack:
            groups.setdefault(b.group, []).append(b)
    for _ in range(cal.SWEEPS):
        for key, rows in sorted(groups.items()):
            if len(rows) < cal.MIN_STACK_ROWS:
                continue
            fitted.stacks.setdefault(key, StackConstants())
            cal.descend_stack(rows, fitted, key)
            cal._overrides(rows, fitted, key)
    return fitted


def write_stack(fitted: cal.Fitted, stack: str, command: str) -> list[Path]:
    """Replace ``stack``'s line under ``stacks:`` in each profile of the GPU types it was fitted on."""
    written = []
    for (gtype, rt), c in sorted(fitted.stacks.items()):
        if rt != stack:
            continue
        line = f"  {rt}: {cal.constants_yaml(c, command)}"
        for name in cal.PROFILES[gtype]:
            path = PROFILE_DIR / f"{name}.yaml"
            lines = path.read_text().split("\n")
            at = [i for i, s in enumerate(lines) if s.startswith(f"  {rt}: ")]
            if at:
                lines[at[-1]] = line
            else:
                lines.insert(lines.index("stacks:") + 1, line)
            write_atomic(path, "\n".join(lines))
            written.append(path)
    return written


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--stack", required=True, choices=get_args(Runtime),
                    help="the software stack (--runtime) whose own constants are refitted")
    ap.add_argument("--write", action="store_true", help="store its constants in profiles/hardware/*.yaml")
    ap.add_argument("--cache", type=Path, help="pickle of the built rows (reused when present)")
    cal.fit_flags(ap)
    args = ap.parse_args(argv)
    options = cal.set_fit_options(args.objective, **cal.fit_options(args))
    built, _skipped = cal.load_or_build([pr.MODERN_YAML, pr.CALIBRATION_YAML], args.cache)
    fitted = fit_stack(built, args.stack)
    cal.report(built, fitted)
    if args.write:
        for path in write_stack(fitted, args.stack, f"python benchmarks/calibrate_stack.py --stack {args.stack} "
                                                     f"--write{options}"):
            print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    import calibrate_stack  # the importable module, as calibrate_modern (its pickle names calibrate_modern.Built)

    sys.exit(calibrate_stack.main())
