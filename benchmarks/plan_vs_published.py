"""`autopar plan` against the published configurations of shared/validation/published_*.yaml.

For every run: the cost model's prediction for the published configuration (built exactly as
benchmarks/validate_published.py builds it, ``benchmarks/published_rows.py``: the row's model,
GPU, cluster, dtype, runtime and strategy) next to the plan the search returns for the same
model, GPU count, sequence length, global batch and runtime. Acceptance: the plan's predicted
throughput is at least the published configuration's; the ratio is the planner's claimed gain.

    python benchmarks/plan_vs_published.py [--yaml PATH] [--markdown] [--only ID_SUBSTRING]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import published_rows as pr  # noqa: E402

from autopar.planner.search import search  # noqa: E402


def compare(run: dict, workdir: Path) -> dict:
    case = pr.case_for(run)
    cm, pub = pr.build(case, workdir)
    e_pub = pr.estimate(case, cm, pub)
    t0 = time.perf_counter()
    res = search(cm, pub.global_batch, top_k=1)
    elapsed = time.perf_counter() - t0
    best = res.candidates[0] if res.candidates else None
    return {"id": run["id"], "gpus": cm.cluster.world, "gb": pub.global_batch, "published": pub.short(),
            "pub_tok": e_pub.tokens_per_s, "pub_fits": e_pub.feasible,
            "plan": best.strategy.short() if best else "nothing fits",
            "plan_tok": best.estimate.tokens_per_s if best else 0.0, "search_s": elapsed}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--yaml", default=str(pr.CALIBRATION_YAML))
    ap.add_argument("--markdown", action="store_true", help="print a markdown table")
    ap.add_argument("--only", default="", help="runs whose id contains this text")
    args = ap.parse_args(argv)
    runs = [r for r in pr.load_runs(args.yaml) if args.only in r["id"]]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for run in runs:
            try:
                rows.append(compare(run, Path(tmp)))
            except pr.RowSkip as exc:
                print(f"not priced: {run['id']}: {exc}")
                continue
            if not args.markdown:
                _line(rows[-1])
    if args.markdown:
        print("| run | GPUs | global batch | published configuration | predicted tokens/s | plan | plan tokens/s "
              "| plan / published |\n|---|---|---|---|---|---|---|---|")
        for r in rows:
            fits = "" if r["pub_fits"] else " (does not fit in the model)"
            print(f"| {r['id']} | {r['gpus']} | {r['gb']} | `{r['published']}`{fits} | {r['pub_tok']:,.0f} | "
                  f"`{r['plan']}` | {r['plan_tok']:,.0f} | {r['plan_tok'] / r['pub_tok']:.2f}x |")
    ok = sum(r["plan_tok"] >= r["pub_tok"] * (1 - 1e-9) or not r["pub_fits"] for r in rows)
    print(f"\nplans at least as fast as the published configuration: {ok}/{len(rows)} "
          f"(a published configuration that does not fit in the model is not a bar); "
          f"slowest search {max(r['search_s'] for r in rows):.2f} s")
    return 0 if ok == len(rows) else 1


def _line(r: dict) -> None:
    fits = "" if r["pub_fits"] else " [does not fit]"
    print(f"{r['id']:42s} {r['gpus']:5d} GPUs  published {r['published']}{fits}: {r['pub_tok']:12,.0f} tok/s | "
          f"plan {r['plan']}: {r['plan_tok']:12,.0f} tok/s ({r['plan_tok'] / r['pub_tok']:.2f}x, "
          f"search {r['search_s']:.2f} s)", flush=True)


if __name__ == "__main__":
    sys.exit(main())
