"""Predicted vs published peak memory for every row of published_modern.yaml that reports
``measured.memory_gib``, priced the way ``autopar estimate`` prices the row (``published_rows``).

    python benchmarks/validate_memory.py [--yaml PATH] [--markdown] [--fit]

The published figure is torchtitan's ``memory`` log line: ``torch.cuda.max_memory_reserved`` on the
worst rank (the caching allocator's reserved bytes, not the CUDA context or NCCL's own buffers).
It is compared with ``Estimate.reserved_peak_bytes``: the predicted live-tensor peak of the worst
rank (without ``framework_overhead``) times ``1 + allocator_reserve_fraction`` of the GPU profile.
Error = predicted / published - 1 (negative: under-predicted).

``--fit`` prints the allocator reserve fraction that the rows imply per GPU profile and stack (mean of
published / live-peak - 1 over their rows without a pipeline), the number the stack's reserve in
``profiles/hardware/<gpu>.yaml`` is set from; the rows of other profiles (h200) check it.

Row mapping: ``published_rows.case_for`` (torchtitan rows run as ``--runtime torchtitan``, whose
pipeline memory is ``cost_models/runtime_memory.py``; per-op SAC is ``recompute=op``; the 96 GB
H100 is ``h100-96g``; ``sp=1`` under its TP), plus, each stated once here:
- torchtitan computes the loss on vocabulary-sharded logits under TP (``loss_parallel``):
  ``PricingContext.loss_parallel``;
- "torch.compile" rows: torchtitan at the Dec 2024 benchmark commit (9dec370) compiles each
  transformer block (``compile="model"``); from 2025 it compiles the loss too
  (``compile.components`` = model, loss: ``compile="model+loss"``), as the June 2025 H200 run did;
- a row without a global batch (memory does not depend on it) runs one local batch per rank, and a
  pipeline row's local batch is split into torchtitan's default number of micro-batches (one per
  stage in Dec 2024: the 405B rows' local batch of 32 is ``mbs=4`` under 1F1B, 8 stages, and
  ``mbs=2`` interleaved, 16 stages), both in ``published_rows.case_for``, which prices their time too;
- the pipeline stages are torchtitan's own split (``runtime_memory.torchtitan_stages``, what
  ``CostModel.estimate`` takes under ``--runtime torchtitan`` when no split is given).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

from autopar.errors import AutoparError

sys.path.insert(0, str(Path(__file__).resolve().parent))
from published_rows import MODERN_YAML, RowSkip, as_run, build, case_for, estimate, load_runs  # noqa: E402

GiB = 1024**3


def compile_mode(run: dict) -> str:
    """none | model | model+loss: what the row's torchtitan version compiles (module docstring)."""
    text = f"{run['parallel'].get('technique') or ''} {run.get('precision') or ''}".lower()
    if "compile" not in text:
        return "none"
    return "model+loss" if "2025" in str(run["source"].get("title") or "") else "model"


def rows(path: Path) -> list[dict]:
    return [r for r in load_runs(path) if (r.get("measured") or {}).get("memory_gib") is not None]


def price_memory(run: dict, workdir: Path) -> dict:
    case = case_for(run)
    cm, s = build(case, workdir)
    as_run(case, cm, s)   # how torchtitan runs what the strategy names (module docstring)
    e = estimate(case, cm, s)
    live = e.peak_bytes - e.memory_overhead
    pub = float(run["measured"]["memory_gib"]) * GiB
    return {"id": run["id"], "gpu": case.gpu, "stack": case.runtime, "strategy": s.short(), "dtype": case.dtype,
            "live": live,
            "pred": e.reserved_peak_bytes, "pub": pub, "err": e.reserved_peak_bytes / pub - 1.0,
            "reserve": e.allocator_reserve_fraction, "memory": e.worst_rank.memory}


def fit(results: list[dict]) -> dict[tuple[str, str], tuple[float, int]]:
    """Per (GPU profile, stack): the mean of published / live-peak - 1 over its rows without a pipeline
    (the constant was fitted on those; the pipeline rows, priced by ``runtime_memory``, check it), and their count.
    The reserve is the stack's allocator use (``StackConstants.allocator_reserve_fraction``)."""
    by: dict[tuple[str, str], list[float]] = {}
    for r in results:
        if " pp1 " in f" {r['strategy']} ":
            by.setdefault((r["gpu"], r["stack"]), []).append(r["pub"] / r["live"] - 1.0)
    return {k: (statistics.fmean(v), len(v)) for k, v in by.items()}


def report(results: list[dict], skipped: list[tuple[str, str]], markdown: bool) -> None:
    head = ("row", "gpu", "strategy", "dtype", "live GiB", "pred GiB", "published GiB", "error")
    if markdown:
        print("| " + " | ".join(head) + " |\n|" + "---|" * len(head))
    for r in results:
        cells = (r["id"], r["gpu"], r["strategy"], r["dtype"], f"{r['live'] / GiB:.1f}", f"{r['pred'] / GiB:.1f}",
                 f"{r['pub'] / GiB:.1f}", f"{r['err'] * 100:+.1f}%")
        print(("| " + " | ".join(cells) + " |") if markdown else "  ".join(f"{c:<12}" for c in cells))
    errs = [abs(r["err"]) for r in results]
    if errs:
        print(f"\nrows {len(results)}, memory MAPE {statistics.fmean(errs) * 100:.1f}%, max |error| "
              f"{max(errs) * 100:.1f}%, worst under-prediction {min(0.0, min(r['err'] for r in results)) * 100:.1f}%")
    for rid, why in skipped:
        print(f"skipped {rid}: {why}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--yaml", type=Path, default=MODERN_YAML)
    ap.add_argument("--markdown", action="store_true")
    ap.add_argument("--fit", action="store_true", help="print the allocator reserve fraction per GPU profile")
    ap.add_argument("--breakdown", action="store_true", help="print the predicted memory components per row")
    args = ap.parse_args(argv)
    results, skipped = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for run in rows(args.yaml):
            try:
                results.append(price_memory(run, Path(tmp)))
            except (RowSkip, AutoparError) as exc:
                skipped.append((run["id"], str(exc)))
    report(results, skipped, args.markdown)
    if args.breakdown:
        for r in results:
            print(r["id"], {k: round(v / GiB, 2) for k, v in r["memory"].items() if v})
    if args.fit:
        for (gpu, stack), (value, n) in fit(results).items():
            print(f"allocator_reserve_fraction {gpu} {stack}: {value:.3f} ({n} rows)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
