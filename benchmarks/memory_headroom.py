"""Priced memory of every published run against its GPU's capacity: a run that ran is evidence its
configuration fitted, so a row priced over capacity is a memory-model error (or a mapping error).

    python benchmarks/memory_headroom.py [FILE] --cache PICKLE [--rows] [--over] [--bound]

For each priced row of FILE (default ``published_modern.yaml``), priced as ``validate_published.py``
prices it (``published_rows``, the shipped constants; torchtitan rows with ``loss_parallel`` under TP, as
``validate_memory.price_memory`` maps them): the worst rank's predicted live-tensor peak
(``max_memory_allocated``: ``Estimate.peak_bytes`` without ``framework_overhead``) and reserved peak
(``Estimate.reserved_peak_bytes``: times ``1 + allocator_reserve_fraction``), each over the GPU's
``mem_capacity_bytes``. A row is *over* when its reserved peak plus the framework overhead (CUDA
context, NCCL: outside the allocator) exceeds the capacity, and *rejected* when the planner would
refuse it (``Estimate.feasible``: live peak above the usable bytes). Per source and stack: rows,
the largest reserved ratio, how many are over and rejected. ``--rows`` prints every row, ``--over``
only the rows over capacity or rejected. ``--bound``: per GPU profile and stack, the largest caching-allocator
reserve fraction at which every row of theirs still fits (min over rows of (capacity - framework overhead) /
live peak - 1) beside the profile's ``allocator_reserve_fraction``: an upper bound the runs imply, not a fit.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import calibrate_modern as cal  # noqa: E402
import published_rows as pr  # noqa: E402

from autopar.profiles.hw import load_gpu_profile  # noqa: E402

GiB = 1024**3


@dataclass(frozen=True)
class Headroom:
    id: str
    source: str
    stack: str
    gpu: str
    strategy: str
    allocated_ratio: float   # live-tensor peak / capacity
    reserved_ratio: float    # reserved peak / capacity
    over_bytes: float        # reserved + framework overhead - capacity (> 0: over)
    rejected: bool           # the planner refuses it (not Estimate.feasible)
    room: float              # (capacity - framework overhead) / live peak - 1: the largest reserve that still fits
    reserve: float           # the profile's allocator_reserve_fraction
    published_gib: float | None

    @property
    def over(self) -> bool:
        return self.over_bytes > 0


def headroom(p: pr.Priced) -> Headroom:
    """One priced row's memory against its GPU's capacity (module docstring)."""
    e = p.estimate
    live, cap = e.peak_bytes - e.memory_overhead, e.capacity_bytes
    pub = (p.case.run.get("measured") or {}).get("memory_gib")
    return Headroom(p.case.id, p.case.source, p.case.stack, p.case.gpu, e.strategy.short(), live / cap,
                    e.reserved_peak_bytes / cap, e.reserved_peak_bytes + e.memory_overhead - cap, not e.feasible,
                    (cap - e.memory_overhead) / live - 1.0, e.allocator_reserve_fraction,
                    None if pub is None else float(pub))


def price(b: cal.Built) -> pr.Priced:
    """One built row priced with its profile's shipped constants; a torchtitan row computes its loss on
    vocabulary-sharded logits under TP (``loss_parallel``, as ``validate_memory.price_memory`` sets it)."""
    if b.case.stack == "torchtitan":
        b.cm.ctx.loss_parallel = b.strategy.tp > 1
    return cal.price(b, load_gpu_profile(b.case.gpu).stack(b.case.runtime))


def group_lines(rows: list[Headroom]) -> list[str]:
    """Per (source, stack): rows, the largest reserved / capacity, rows over capacity and rejected."""
    groups: dict[tuple[str, str], list[Headroom]] = {}
    for r in rows:
        groups.setdefault((r.source, r.stack), []).append(r)
    out = [f"{'source':<22} {'stack':<12} {'rows':>4} {'max alloc':>9} {'max resv':>9} {'over':>4} {'rejected':>8}"]
    for (src, stack), rs in sorted(groups.items()):
        out.append(f"{src:<22} {stack:<12} {len(rs):>4} {max(r.allocated_ratio for r in rs):>9.2f} "
                   f"{max(r.reserved_ratio for r in rs):>9.2f} {sum(r.over for r in rs):>4} "
                   f"{sum(r.rejected for r in rs):>8}")
    return out


def bound_lines(rows: list[Headroom]) -> list[str]:
    """Per (GPU profile, stack): the largest allocator reserve all their rows fit under, and the row that sets it."""
    groups: dict[tuple[str, str], list[Headroom]] = {}
    for r in rows:
        groups.setdefault((r.gpu, r.stack), []).append(r)
    out = [f"{'gpu':<10} {'stack':<12} {'rows':>4} {'profile':>7} {'bound':>6}  set by"]
    for (gpu, stack), rs in sorted(groups.items()):
        tight = min(rs, key=lambda r: r.room)
        out.append(f"{gpu:<10} {stack:<12} {len(rs):>4} {tight.reserve:>7.3f} {tight.room:>6.3f}  {tight.id}")
    return out


def row_line(r: Headroom) -> str:
    pub = f"pub {r.published_gib:5.1f} GiB" if r.published_gib is not None else ""
    flag = ("OVER " if r.over else "") + ("REJECTED" if r.rejected else "")
    return (f"{r.id[:56]:<56} {r.stack:<11} {r.gpu:<9} alloc {r.allocated_ratio:5.2f} resv {r.reserved_ratio:5.2f}"
            f" over {r.over_bytes / GiB:+6.1f} GiB {pub} {flag}".rstrip())


def totals_line(rows: list[Headroom]) -> str:
    over = [r for r in rows if r.over]
    worst = max((r.over_bytes for r in over), default=0.0)
    return (f"rows {len(rows)}: over capacity {len(over)} (by up to {worst / GiB:.1f} GiB), rejected by the planner "
            f"{sum(r.rejected for r in rows)}, max reserved / capacity "
            f"{max((r.reserved_ratio for r in rows), default=0.0):.2f}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("file", nargs="?", type=Path, default=pr.MODERN_YAML)
    ap.add_argument("--cache", type=Path, help="pickle of the built rows (validate_published.py --cache)")
    ap.add_argument("--rows", action="store_true", help="print every row")
    ap.add_argument("--over", action="store_true", help="print the rows over capacity or rejected")
    ap.add_argument("--bound", action="store_true", help="the largest allocator reserve each GPU and stack's rows fit")
    args = ap.parse_args(argv)
    built, _skipped = cal.load_or_build([args.file], args.cache)
    rows = []
    for b in built:
        try:
            rows.append(headroom(price(b)))
        except pr.RowSkip:
            continue
    for r in rows:
        if args.rows or (args.over and (r.over or r.rejected)):
            print(row_line(r))
    print("\n".join(group_lines(rows)))
    print(totals_line(rows))
    if args.bound:
        print("\n".join(bound_lines(rows)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
