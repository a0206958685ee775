"""MegaScale Table 2 (Jiang et al., NSDI 2024; 175B, strong scaling): what the published and the priced
steps of one system share when only the data-parallel size changes. Prices nothing new: it prints the rows
as ``validate_published.py`` prices them (shipped constants) beside a two-term reading of each.

    python benchmarks/megascale_probe.py [--cache PICKLE]

At a fixed global batch (768 sequences on 256 / 768 / 1,024 GPUs, tp 8 x pp 8) a pipeline's step is a
per-micro-batch time x the micro-batches per pipeline (m = 768 / dp, one sequence each) plus what does not
shrink with m (the bubble, the data-parallel sync, the optimizer): step = a·m + c. A least-squares line
through the published steps and one through the priced steps tell which of the two terms the error is in.
Then the Megatron-LM baseline rows (Table 2 and Fig. 9's 530B) with their whole data-parallel sync exposed
(``baseline_dp_exposed``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import calibrate_modern as cal  # noqa: E402
import published_rows as pr  # noqa: E402


def line(ms: list[float], steps: list[float]) -> tuple[float, float]:
    """Least-squares (a, c) of step = a·m + c."""
    mx, my = sum(ms) / len(ms), sum(steps) / len(steps)
    a = sum((x - mx) * (y - my) for x, y in zip(ms, steps)) / sum((x - mx) ** 2 for x in ms)
    return a, my - a * mx


def micro_batches(strategy: str) -> int:
    d = dict(kv.split("=") for kv in strategy.split(","))
    return int(d["gbs"]) // (int(d["mbs"]) * int(d["dp"]))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cache", type=Path, help="pickle of the built rows (validate_published.py --cache)")
    args = ap.parse_args(argv)
    built, _ = cal.load_or_build([pr.MODERN_YAML], args.cache)
    rows = [b for b in built if b.case.source == "megascale" and "table2" in b.case.id]
    for system in ("MegaScale", "Megatron-LM"):
        group = sorted((b for b in rows if f"_{system}_" in b.case.id and "gbs=768," in b.case.strategy),
                       key=lambda b: b.case.nodes)
        priced = [cal.price(b) for b in group]
        ms = [micro_batches(b.case.strategy) for b in group]
        for p, m in zip(priced, ms):
            t = p.estimate.time
            print(f"{p.case.id:44s} m {m:4d}  pub {p.pub_step_s:6.2f} s  pred {p.pred_step_s:6.2f} s  "
                  f"err {100 * p.error:+5.1f}%  pub - pred {p.pub_step_s - p.pred_step_s:+5.2f} s  "
                  f"(bubble {t['bubble']:.2f}, dp {t['dp_comm']:.2f})")
        (a_pub, c_pub), (a_pred, c_pred) = line(ms, [p.pub_step_s for p in priced]), \
            line(ms, [p.pred_step_s for p in priced])
        print(f"  {system}: published {a_pub:.4f} s per micro-batch + {c_pub:.2f} s per step; "
              f"priced {a_pred:.4f} + {c_pred:.2f}\n")
    baseline_dp_exposed([b for b in built if b.case.source == "megascale" and "_Megatron-LM_" in b.case.id])
    return 0


def baseline_dp_exposed(rows: list) -> None:
    """The Megatron-LM baseline rows priced as mapped and with their whole data-parallel sync exposed, as a
    Megatron-LM without ``--overlap-grad-reduce`` / ``--overlap-param-gather`` runs it (the reduce-scatter and
    all-gather after the last backward): ``overlap.grad_sync_exposed`` replaced by the sync itself."""
    import autopar.cost_models.overlap as ov

    mapped = {b.case.id: cal.price(b) for b in rows}
    keep, ov.grad_sync_exposed = ov.grad_sync_exposed, lambda sync_s, *_: sync_s
    try:
        for b in rows:
            b.cm._cache.clear()
            p, q = mapped[b.case.id], cal.price(b)
            print(f"{b.case.id:44s} pub {p.pub_step_s:6.2f} s  as mapped {p.pred_step_s:6.2f} s "
                  f"{100 * p.error:+5.1f}%  whole dp sync exposed {q.pred_step_s:6.2f} s {100 * q.error:+5.1f}%")
    finally:
        ov.grad_sync_exposed = keep
        for b in rows:
            b.cm._cache.clear()


if __name__ == "__main__":
    sys.exit(main())
