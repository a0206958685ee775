"""`autopar plan` on an awkward GPU count: the priced alternatives (``planner.awkward``), as a table
or JSON, and the option the plan command continues with (the recommended one)."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from autopar.cli import common as c

if TYPE_CHECKING:
    from autopar.planner.awkward import Alternatives, Option
    from autopar.planner.search import Constraints, SearchResult

LABEL = {"all": "all GPUs", "fewer_gpus": "fewer GPUs", "other_batch": "nearest batch"}


def alternatives(cm, gb: int, cons: Constraints, res: SearchResult, top: int, exact_gpus: bool,
                 exact_batch: bool) -> Alternatives | None:
    from autopar.planner import awkward

    t0, c0 = time.perf_counter(), time.process_time()
    alts = awkward.alternatives(cm, gb, cons, res, top, exact_gpus, exact_batch)
    if alts is not None:  # the search on every GPU plus the alternatives' searches (CPU: steadier on a busy host)
        alts.search_time_s = res.stats.search_time_s + time.perf_counter() - t0
        alts.search_cpu_s = time.process_time() - c0
    return alts


def print_table(alts: Alternatives, gb: int) -> None:
    from rich.table import Table

    console = c.console()
    t = Table(title=f"awkward GPU count: all searches {alts.search_time_s:.2f} s wall "
              f"(the alternatives {alts.search_cpu_s:.2f} s CPU){_cached(alts)}", show_edge=False)
    for col in ("", "option", "GPUs", "batch", "best strategy", "step", "s/sequence", "MFU", "note"):
        t.add_column(col, justify="left" if col in ("option", "best strategy", "note") else "right")
    for o in alts.options:
        e = o.best.estimate
        mark = "*" if o is alts.recommended else ""
        t.add_row(mark, LABEL[o.kind], f"{o.gpus:,}", str(o.global_batch), o.best.strategy.short(),
                  c.seconds(e.step_time_s), f"{1e3 * o.time_per_sequence_s:.2f} ms", f"{100 * e.mfu:.1f}%", o.note)
    console.print(t)
    if alts.recommended is not None:
        console.print(f"recommended (*): {LABEL[alts.recommended.kind]}, {alts.reason}; "
                      f"--exact-gpus / --exact-batch forbid the alternatives")


def as_json(alts: Alternatives) -> dict:
    def one(o: Option) -> dict:
        e = o.best.estimate
        return {"kind": o.kind, "gpus": o.gpus, "idle_gpus": o.idle_gpus, "global_batch": o.global_batch,
                "strategy": o.best.strategy.compact(), "step_time_s": e.step_time_s,
                "time_per_sequence_s": o.time_per_sequence_s, "mfu": e.mfu, "note": o.note,
                "recommended": o is alts.recommended}

    return {"options": [one(o) for o in alts.options], "reason": alts.reason, "search_time_s": alts.search_time_s,
            "from_search_cache": bool(_cached(alts))}


def _cached(alts: Alternatives) -> str:
    """Says that options' searches were read from the search cache (``planner.search_cache``): their
    search times are then those of the searches that made them, the wall time mostly reading."""
    hits = [o for o in alts.options if o.result.stats.from_cache is not None]
    return f", {len(hits)} of {len(alts.options)} options from the search cache" if hits else ""
