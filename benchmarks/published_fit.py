"""Do the published runs fit? Every row of a published file ran, so its peak fit in its GPU's memory:
a free check of autopar's memory model on every configuration the file holds.

    python benchmarks/published_fit.py [FILE] [--cache PICKLE] [--source SRC] [--all] [--bound]

FILE defaults to shared/validation/published_calibration.yaml; the modern set is
shared/validation/published_modern.yaml. Rows are mapped and priced through the path
``validate_published.py`` takes (``published_rows.case_for``, ``calibrate_modern.load_or_build`` and
its pickle cache, the constants the profiles ship): the same ``CostModel.estimate`` ``autopar estimate``
and ``autopar memory`` run. Per row: the worst rank's predicted peak by component (``autopar
memory``'s kinds, in GiB: parameters, gradients, optimizer states, activations, recompute workspace,
logits and temporaries, communication and pipeline buffers, framework overhead), the live peak
without the framework overhead against the GPU's usable bytes (``Estimate.feasible``, what the
planner checks), the capacity, and whether it fits. Then per source the rows that do not fit, and the rows
*over capacity*: whose reserved peak (``Estimate.reserved_peak_bytes``: live x (1 + the profile's
``allocator_reserve_fraction``), what ``max_memory_reserved`` reports) plus the framework overhead exceeds the
capacity, with the largest reserved / capacity. torchtitan rows are priced as ``validate_memory.py`` prices
them (their compile and vocabulary-parallel loss). ``--all`` prints the rows that fit too (default: only those
that do not). ``--bound``: per GPU profile and stack (``--runtime``), the largest allocator reserve fraction at
which every row of theirs still fits (min over rows of (capacity - framework overhead) / live peak - 1), beside the
stack's reserve on that profile (``GpuProfile.reserve_fraction``): an upper bound the runs imply, not a fit; the
same over the rows the planner passes now, and the largest reserve the usable-memory rule turns into a limit they
all still pass.
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import calibrate_modern as cal  # noqa: E402
import published_rows as pr  # noqa: E402
import validate_published as vp  # noqa: E402

GiB = 1024**3
KINDS = (("parameters", "param"), ("gradients", "grad"), ("optimizer_states", "optim"), ("activations", "act"),
         ("recompute_workspace", "rcws"), ("logits_and_temporaries", "logit"), ("comm_buffers", "comm"),
         ("pipeline_buffers", "pipe"), ("framework_overhead", "ovh"))


@dataclass(frozen=True)
class Fit:
    """One row's predicted worst-rank memory (bytes by kind), the usable and physical capacity."""

    id: str
    source: str
    strategy: str
    memory: dict[str, float]
    usable_bytes: float
    capacity_bytes: float
    fits: bool
    stack: str = ""
    gpu: str = ""
    reserve: float = 0.0     # the stack's allocator reserve on this GPU (GpuProfile.reserve_fraction)
    reserved_bytes: float = 0.0   # the reserved peak: ``Estimate.reserved_peak_bytes`` (live x (1 + reserve))

    @property
    def peak_bytes(self) -> float:
        return sum(self.memory.values())

    @property
    def live_bytes(self) -> float:
        """What ``Estimate.feasible`` compares with the usable bytes (peak without framework overhead)."""
        return self.peak_bytes - self.memory.get("framework_overhead", 0.0)

    @property
    def reserved_ratio(self) -> float:
        """The reserved peak over the capacity."""
        return self.reserved_bytes / self.capacity_bytes

    @property
    def over(self) -> bool:
        """Reserved peak and framework overhead above the capacity."""
        return self.reserved_bytes + self.memory.get("framework_overhead", 0.0) > self.capacity_bytes

    @property
    def room(self) -> float:
        """The largest allocator reserve fraction under which the row still fits its GPU."""
        return (self.capacity_bytes - self.memory.get("framework_overhead", 0.0)) / self.live_bytes - 1.0


def fit_of(p: pr.Priced) -> Fit:
    e = p.estimate
    return Fit(p.case.id, p.case.source, p.case.strategy, dict(e.worst_rank.memory), e.usable_bytes,
               e.capacity_bytes, e.peak_bytes - e.memory_overhead <= e.usable_bytes, p.case.runtime, p.case.gpu,
               e.allocator_reserve_fraction, e.reserved_peak_bytes)


def fits(path: Path, cache: Path | None) -> tuple[list[Fit], list[tuple[str, str]]]:
    """Every priced row of ``path`` as ``Fit`` (the shipped constants; memory does not depend on them)."""
    built, skipped = cal.load_or_build([path], cache)
    return [fit_of(_as_run(p)) for p in vp._shipped(built)], skipped


def _as_run(p: pr.Priced) -> pr.Priced:
    """A torchtitan row priced as it ran (``published_rows.as_run``)."""
    if p.case.stack != "torchtitan":
        return p
    with tempfile.TemporaryDirectory() as tmp:
        cm, s = pr.build(p.case, Path(tmp))
    pr.as_run(p.case, cm, s)
    e = pr.estimate(p.case, cm, s)
    return pr.Priced(p.case, e.step_time_s, p.pub_step_s, e)


def print_rows(rows: list[Fit], show_all: bool) -> None:
    print(f"{'row':56s} " + " ".join(f"{short:>6s}" for _, short in KINDS) + "   peak   live usable   cap  fits")
    for f in rows:
        if f.fits and not show_all:
            continue
        comps = " ".join(f"{f.memory.get(k, 0.0) / GiB:6.1f}" for k, _ in KINDS)
        print(f"{f.id[:56]:56s} {comps} {f.peak_bytes / GiB:6.1f} {f.live_bytes / GiB:6.1f} "
              f"{f.usable_bytes / GiB:6.1f} {f.capacity_bytes / GiB:5.0f}  {'yes' if f.fits else 'NO'}")


def print_summary(rows: list[Fit], skipped: list[tuple[str, str]], title: str) -> None:
    print(f"\n{title}")
    print(f"{'source':22s} {'rows':>4s} {'not fit':>7s} {'worst live/usable':>17s} {'over cap':>8s} "
          f"{'max resv/cap':>12s}")
    by: dict[str, list[Fit]] = {}
    for f in rows:
        by.setdefault(f.source, []).append(f)
    for src, fs in sorted(by.items()):
        worst = max(f.live_bytes / f.usable_bytes for f in fs)
        print(f"{src:22s} {len(fs):4d} {sum(not f.fits for f in fs):7d} {worst:16.2f}x {sum(f.over for f in fs):8d} "
              f"{max(f.reserved_ratio for f in fs):12.2f}")
    print(f"{'all':22s} {len(rows):4d} {sum(not f.fits for f in rows):7d} {'':17s} {sum(f.over for f in rows):8d}"
          f"   not priced: {len(skipped)}")


def rule_max(bound: float) -> float:
    """The largest reserve whose usable fraction (``core.gpu.usable_fraction``, rounded down) still lets a live
    peak of 1 / (1 + ``bound``) of the memory fit: below ``bound`` by the rounding."""
    return 100 / math.ceil(100 / (1 + bound) - 1e-9) - 1


def print_bound(rows: list[Fit]) -> None:
    """Per (GPU profile, stack as --runtime): the largest allocator reserve all their rows fit under and the row
    setting it; then over the rows the planner passes at the stack's reserve now (``Fit.fits``), that bound and
    ``rule_max`` of it: a reserve above it would turn one of them away."""
    groups: dict[tuple[str, str], list[Fit]] = {}
    for f in rows:
        groups.setdefault((f.gpu, f.stack), []).append(f)
    print(f"\n{'gpu':<10} {'stack':<12} {'rows':>4} {'profile':>7} {'bound':>6}  {'passing':>7} {'bound':>6} "
          f"{'rule max':>8}  set by")
    for (gpu, stack), fs in sorted(groups.items()):
        tight = min(fs, key=lambda f: f.room)
        ok = [f for f in fs if f.fits]
        fit_tight = min(ok, key=lambda f: f.room) if ok else None
        within = (f"{len(ok):>7} {fit_tight.room:>6.3f} {rule_max(fit_tight.room):>8.3f}" if fit_tight
                  else f"{0:>7} {'-':>6} {'-':>8}")
        print(f"{gpu:<10} {stack:<12} {len(fs):>4} {tight.reserve:>7.3f} {tight.room:>6.3f}  {within}  "
              f"{tight.id}" + (f" / {fit_tight.id}" if fit_tight and fit_tight is not tight else ""))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("file", nargs="?", type=Path, default=vp.DEFAULT_YAML)
    ap.add_argument("--cache", type=Path, help="pickle of the built rows (validate_published.py's)")
    ap.add_argument("--source", help="only the rows of this source")
    ap.add_argument("--all", action="store_true", help="print the rows that fit too")
    ap.add_argument("--bound", action="store_true", help="the largest allocator reserve each GPU and stack's rows fit")
    args = ap.parse_args(argv)
    rows, skipped = fits(args.file, args.cache)
    if args.source:
        rows = [f for f in rows if f.source == args.source]
    print_rows(rows, args.all)
    print_summary(rows, skipped, f"{args.file.name}: do the published runs fit? (worst rank, GiB)")
    if args.bound:
        print_bound(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
