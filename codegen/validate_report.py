"""Reports of a closed-loop validation (``codegen.validate``): markdown, JSON and a
predicted-vs-measured scatter (step time and memory)."""

from __future__ import annotations

import json
from pathlib import Path

from autopar.errors import InputError
from autopar.fileio import write_atomic

MiB = 2**20
MEMORY_NOTE = ("memory = peak live tensor bytes (measured: CPU tracker of tensor storages or CUDA "
               "max_memory_allocated, max over ranks; predicted: the worst rank's peak without the "
               "framework overhead, which is not a tensor)")


def fmt(x: float | None, scale: float = 1.0, digits: int = 3) -> str:
    return "-" if x is None else f"{x / scale:.{digits}g}"


def pct(x: float | None) -> str:
    return "-" if x is None else f"{x:+.1f}%"


def headline(s: dict) -> list[tuple[str, str]]:
    """(label, value) pairs of the summary, in the order a reader checks them."""
    best = s.get("predicted_best_is_measured_best")
    return [
        ("strategies run / failed", f"{s['ran']} / {s['failed']}"),
        ("Spearman (step time)", fmt(s["spearman"])),
        ("time MAPE", "-" if s["time_mape"] is None else f"{s['time_mape']:.1f}%"),
        ("memory MAPE", "-" if s["memory_mape"] is None else f"{s['memory_mape']:.1f}%"),
        ("max memory under-prediction", "-" if s["max_memory_under_prediction"] is None
         else f"{s['max_memory_under_prediction']:.1f}%"),
        ("predicted best", str(s["predicted_best"])),
        ("measured best", str(s["measured_best"])),
        ("predicted best vs measured best", "-" if s["best_gap_pct"] is None else
         ("same strategy" if best else f"{s['best_gap_pct']:+.1f}% slower (measured)")),
    ]


def table_rows(s: dict) -> list[list[str]]:
    """One row per strategy: name, status, predicted/measured time (s) and memory (MiB), errors."""
    out = []
    for r in s["strategies"]:
        load = r.get("load_1min")
        out.append([r["name"], r["status"], fmt(r["predicted_time_s"]), fmt(r["measured_time_s"]),
                    pct(r.get("time_error_pct")), fmt(r["predicted_mem_bytes"], MiB, 4),
                    fmt(r["measured_mem_bytes"], MiB, 4), pct(r.get("memory_error_pct")),
                    "-" if load is None else f"{load:.1f}"])
    return out


HEADERS = ["strategy", "status", "pred time s", "meas time s", "time err", "pred mem MiB", "meas mem MiB",
           "mem err", "load"]


def markdown(s: dict, meta: dict) -> str:
    lines = [f"# autopar validate: {meta.get('model')} on {meta.get('nproc')} {meta.get('device')} ranks", "",
             f"Command: `{meta.get('command')}`", "",
             f"Predictions from profile `{meta.get('profile')}`; seq {meta.get('seq_len')}, global batch "
             f"{meta.get('global_batch')}, {meta.get('dtype')}; {meta.get('steps')} steps per run, median step "
             f"time after {meta.get('warmup')} warm-up steps; {meta.get('load')}.", "", f"Note: {MEMORY_NOTE}. "
             "`load`: the machine's 1-minute load average when the run started (other processes slow the "
             "measured wall-clock times; predictions are for an otherwise idle machine).", "",
             "| | |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in headline(s)]
    lines += ["", "| " + " | ".join(HEADERS) + " |", "|" + "---|" * len(HEADERS)]
    lines += ["| " + " | ".join(row) + " |" for row in table_rows(s)]
    failed = [r for r in s["strategies"] if r["status"] != "ok"]
    if failed:
        lines += ["", "Failed runs:", ""]
        lines += [f"- {r['name']} (`{r['strategy']}`): {r['status']}: {r['error']} (log: {r['log'] or '-'})"
                  for r in failed]
    noted = [r for r in s["strategies"] if r["status"] == "ok" and r["error"]]
    if noted:
        lines += ["", "Notes:", ""]
        lines += [f"- {r['name']}: {r['error']} (log: {r['log']})" for r in noted]
    lines += ["", "Strategies (compact form):", ""]
    lines += [f"- {r['name']}: `{r['strategy']}`" for r in s["strategies"]]
    return "\n".join(lines) + "\n"


def scatter(s: dict, path: Path, title: str) -> Path:
    """Predicted vs measured step time and memory (log axes), one numbered point per strategy
    that ran; the numbers are keyed below the panels."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in s["strategies"] if r["status"] == "ok" and r["measured_time_s"]]
    fig, axes = plt.subplots(1, 2, figsize=(13, 6.5 + 0.16 * len(ok)))
    _panel(axes[0], ok, "time", 1.0, "step time (s)", f"Spearman {fmt(s['spearman'])}, "
           f"MAPE {fmt(s['time_mape'], 1, 3)}%")
    _panel(axes[1], ok, "mem", MiB, "peak tensor memory (MiB)", f"MAPE {fmt(s['memory_mape'], 1, 3)}%, "
           f"max under-prediction {fmt(s['max_memory_under_prediction'], 1, 3)}%")
    key = [f"{i}: {r['name']}" for i, r in enumerate(ok, 1)]
    half = (len(key) + 1) // 2
    fig.text(0.08, 0.01, "\n".join(key[:half]), fontsize=8, va="bottom", family="monospace")
    fig.text(0.55, 0.01, "\n".join(key[half:]), fontsize=8, va="bottom", family="monospace")
    fig.suptitle(title)
    fig.tight_layout(rect=(0, 0.02 + 0.16 * half / (6.5 + 0.16 * len(ok)), 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _panel(ax, rows: list[dict], key: str, scale: float, label: str, note: str) -> None:
    pred = [r["predicted_time_s" if key == "time" else "predicted_mem_bytes"] / scale for r in rows]
    meas = [r["measured_time_s" if key == "time" else "measured_mem_bytes"] / scale for r in rows]
    ax.scatter(meas, pred, s=36, color="tab:blue", zorder=3)
    for i, (x, y) in enumerate(zip(meas, pred), 1):
        ax.annotate(str(i), (x, y), textcoords="offset points", xytext=(4, 3), fontsize=8)
    if meas:
        lo, hi = min(meas + pred) / 1.3, max(meas + pred) * 1.3
        ax.plot([lo, hi], [lo, hi], "k--", lw=1, label="predicted = measured")
        ax.fill_between([lo, hi], [lo * 0.9, hi * 0.9], [lo * 1.1, hi * 1.1], color="grey", alpha=0.15,
                        label="within 10%")
        from matplotlib.ticker import FormatStrFormatter

        ax.set_xscale("log")
        ax.set_yscale("log")
        for axis in (ax.xaxis, ax.yaxis):  # plain numbers, not 4 x 10^-1
            axis.set_major_formatter(FormatStrFormatter("%g"))
            axis.set_minor_formatter(FormatStrFormatter("%g"))
        ax.set_xlim(lo, hi)
        ax.set_ylim(lo, hi)
        ax.legend(loc="upper left", fontsize=8)
    ax.set_xlabel(f"measured {label}")
    ax.set_ylabel(f"predicted {label}")
    ax.set_title(note, fontsize=10)
    ax.grid(alpha=0.3, which="both")


def write_all(s: dict, meta: dict, out: Path) -> list[Path]:
    """validation.md, validation.json and validation.png in ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    md, js, png = out / "validation.md", out / "validation.json", out / "validation.png"
    write_atomic(md, markdown(s, meta))
    write_atomic(js, json.dumps({**meta, **s}, indent=2, default=float) + "\n")
    scatter(s, png, f"{meta.get('model')}: {meta.get('nproc')} {meta.get('device')} ranks, predicted vs measured")
    return [md, js, png]


# what must agree for runs made in pieces to be one comparison
SAME = ("model", "nproc", "device", "profile", "seq_len", "global_batch", "dtype", "steps", "warmup")


def merge(dirs: list[Path]) -> tuple[list[dict], dict]:
    """The strategies and the run description of several ``autopar validate --out DIR`` runs of one
    configuration (the strategy list split in pieces, e.g. to hold a shared machine's lock for less
    time); ``validate.summarize_dicts`` compares them as one set."""
    parts = []
    for d in dirs:
        path = Path(d) / "validation.json"
        if not path.is_file():
            raise InputError(f"--merge: {path} does not exist; fix: name folders an `autopar validate --out` wrote")
        parts.append((path, json.loads(path.read_text())))
    first_path, first = parts[0]
    for path, other in parts[1:]:
        for key in SAME:
            if other.get(key) != first.get(key):
                raise InputError(f"--merge: {path} ran {key}={other.get(key)!r}, {first_path} {first.get(key)!r}; "
                                 "fix: merge runs of one configuration")
    meta = {k: first.get(k) for k in (*SAME, "threads_per_rank", "cpu_count")}
    meta["load"] = "; ".join(f"{Path(p).parent.name}: {o.get('load')}" for p, o in parts)
    meta["command"] = " && ".join(str(o.get("command")) for _p, o in parts)
    return [s for _p, o in parts for s in o["strategies"]], meta
