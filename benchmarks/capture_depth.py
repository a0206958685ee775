"""Reduced-depth capture against the full-depth one, per preset: same statistics and templates? and CPU time.

``profiles.layer_stats.capture_stats`` captures one block per distinct layer context and the last
block (``profiles/depth.py``); this compares what it returns with ``summarize(capture(...))`` of the
whole depth, field by field (layer statistics, then the cost templates built from them), and says
whether the reduction ran or fell back to full depth.

    python benchmarks/capture_depth.py                        # the default list below
    python benchmarks/capture_depth.py llama3-8b:8192 deepseek-v3:4096
"""

from __future__ import annotations

import argparse
import time

from autopar.cost_models.templates import templates_from_stats
from autopar.profiles import depth, layer_stats
from autopar.profiles.graph import capture
from autopar.profiles.intake import resolve_model

DEFAULT = ("gpt-small:256", "llama3-8b:8192", "llama3-70b:4096", "llama3-405b:8192", "gpt3-175b:2048",
           "mixtral-8x7b:4096", "qwen2-57b-a14b:2048", "deepseek-v3:4096", "gemma3-1b:2048", "gemma2-2b:8192",
           "llama4-maverick-text:2048", "command-r-plus:2048")


def compare(name: str, seq: int) -> str:
    spec = resolve_model(name)
    plan = depth.layer_plan(spec)
    plans, real = [], layer_stats.capture
    layer_stats.capture = lambda *a, **k: plans.append(a[4] if len(a) > 4 else k.get("plan")) or real(*a, **k)
    try:
        t0 = time.process_time()
        reduced = layer_stats.capture_stats(spec, seq, 1, "bf16")
    finally:
        layer_stats.capture = real
    t1 = time.process_time()
    full = layer_stats.summarize(capture(spec, seq, 1, "bf16"))
    t2 = time.process_time()
    same_stats = reduced.model_dump(exclude={"capture_time_s"}) == full.model_dump(exclude={"capture_time_s"})
    same_templates = templates_from_stats(reduced, spec, seq, "bf16") == templates_from_stats(full, spec, seq, "bf16")
    how = "full depth (no plan)" if plan is None else "reduced" if plans == [plan] else "fell back to full depth"
    kept = f"{len(plan.kept)}/{spec.layers} layers" if plan else f"{spec.layers}/{spec.layers} layers"
    label = f"{name}:{seq}"
    return (f"{label:28s} {how:24s} {kept:14s} stats same: {same_stats}  templates same: {same_templates}  "
            f"CPU {t1 - t0:5.2f} s (full depth {t2 - t1:5.2f} s)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("models", nargs="*", default=list(DEFAULT), help="PRESET:SEQ_LEN pairs")
    args = ap.parse_args()
    print("(the first model's reduced-depth time includes one-off imports and first-call costs)")
    for item in args.models:
        name, _, seq = item.partition(":")
        print(compare(name, int(seq or 2048)), flush=True)


if __name__ == "__main__":
    main()
