"""PNG figures of a plan (matplotlib, Agg backend: no display needed).

- ``timeline``: the chosen plan's pipeline schedule replayed op by op
  (``pipeline.simulate``), one row per pipeline rank: forward, backward split into
  compute / recompute / communication in the rank's proportions, idle time (bubble) shaded.
- ``memory_bars``: the per-GPU memory breakdown of the most loaded rank of each top plan,
  against the usable memory.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from autopar.cost_models.estimate import Estimate  # noqa: E402
from autopar.cost_models.pipeline import simulate  # noqa: E402
from autopar.planner.search import Candidate  # noqa: E402

MAX_OPS = 1500     # a longer schedule is drawn with fewer micro-batches (same pattern, readable)
COLORS = {"forward": "#4C72B0", "backward": "#55A868", "recompute": "#C44E52", "communication": "#8172B2",
          "bubble": "#DDDDDD"}
GiB = 2**30


def timeline(c: Candidate, p2p_s: float, path: Path) -> Path:
    """Draw the winner's schedule; returns the file written."""
    e = c.estimate
    s = e.strategy
    m = s.num_micro_batches
    shown = m
    if 2 * m * s.vpp * s.pp > MAX_OPS:
        shown = max(s.pp, (MAX_OPS // (2 * s.vpp * s.pp)) // s.pp * s.pp)
    f = [r.fwd_s for r in e.ranks]
    b = [r.bwd_s for r in e.ranks]
    sim = simulate(f, b, shown, s.schedule, s.vpp, p2p_s)
    fig, ax = plt.subplots(figsize=(12, 1.8 + 0.45 * s.pp))  # room for one row (pp=1) plus title and legend
    for rank in range(s.pp):
        ax.barh(rank, sim.step_time_s, left=0, height=0.8, color=COLORS["bubble"])
    for rank, kind, _, _, start, end in sim.events:
        _draw_op(ax, e, rank, kind, start, end)
    ax.set_yticks(range(s.pp), [f"stage {r}" for r in range(s.pp)])
    ax.set_xlabel("time (s)")
    title = f"{s.short()}: pipeline schedule"
    if shown < m:
        title += f" (first {shown} of {m} micro-batches drawn)"
    ax.set_title(title)
    ax.set_ylim(s.pp - 0.5, -0.5)
    handles = [plt.Rectangle((0, 0), 1, 1, color=v) for v in COLORS.values()]
    # outside the axes, right of them: never over a bar, whatever the number of stages
    ax.legend(handles, list(COLORS), loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)
    return _save(fig, path)


def _draw_op(ax, e: Estimate, rank: int, kind: str, start: float, end: float) -> None:
    r = e.ranks[rank]
    if kind == "F":
        ax.barh(rank, end - start, left=start, height=0.8, color=COLORS["forward"])
        return
    total = max(r.bwd_s, 1e-30)
    comm = sum(r.comm_s.values()) / total
    redo = r.recompute_s / total
    width = end - start
    left = start
    for name, share in (("recompute", redo), ("backward", 1 - redo - comm), ("communication", comm)):
        w = width * max(share, 0.0)
        ax.barh(rank, w, left=left, height=0.8, color=COLORS[name])
        left += w


def memory_bars(cands: list[Candidate], path: Path) -> Path:
    """Stacked per-component bars of the most loaded GPU of each candidate."""
    rows = [c for c in cands if c.estimate is not None]
    comps: list[str] = []
    for c in rows:
        comps += [k for k in c.estimate.worst_rank.memory if k not in comps]
    fig, ax = plt.subplots(figsize=(10, 1.2 + 0.6 * len(rows)))
    cmap = plt.get_cmap("tab10")
    for i, c in enumerate(rows):
        left = 0.0
        for j, k in enumerate(comps):
            v = c.estimate.worst_rank.memory.get(k, 0.0) / GiB
            ax.barh(i, v, left=left, color=cmap(j % 10), label=k.replace("_", " ") if i == 0 else None)
            left += v
    if rows:
        e = rows[0].estimate
        ax.axvline((e.usable_bytes + e.memory_overhead) / GiB, color="black", linestyle="--", label="usable")
        ax.axvline(e.capacity_bytes / GiB, color="black", linestyle=":", label="capacity")
    ax.set_yticks(range(len(rows)), [f"#{i + 1} {c.strategy.short()}" for i, c in enumerate(rows)], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("GiB per GPU (most loaded pipeline stage)")
    ax.set_title("memory breakdown of the top plans")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)  # beside the bars
    return _save(fig, path)


def _save(fig, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    # bbox_inches="tight" grows the canvas to the legends outside the axes instead of shrinking the axes
    fig.savefig(tmp, dpi=110, bbox_inches="tight")   # write then rename: no half-written PNG on disk
    plt.close(fig)
    tmp.replace(path)
    return path
