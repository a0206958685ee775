"""Expert placement benchmark: proven gap and time on synthetic routing traces.

Prints the two acceptance figures of issue 6 and the comparison against round-robin and
random placement:

1. 64 experts x 8 ranks x 32 layers (top-1, strong affinity 0.9, Zipf 0.5, 65,536 tokens):
   gap <= 2 % within 30 s, cross-rank tokens at least 50 % below round-robin, max/mean load
   within 5 % of balanced.
2. 256 experts x 64 ranks x 60 layers (top-8, DeepSeek-V3 shape): a placement with its bound
   and gap within 120 s.

Then how the gap moves with tokens per trace, affinity and top-k (the bound's slack grows when
few tokens spread over many expert pairs). Run: ``python benchmarks/experts.py [--skip-large]``.
"""

from __future__ import annotations

import argparse
import os
import time

from autopar.planner.experts import make_problem, placement_stats, random_placement, round_robin, solve_placement
from autopar.planner.experts_ilp import load_bound
from autopar.profiles.routing import synthetic_trace

BYTES_PER_TOKEN = 2 * 4096          # one bf16 token of hidden size 4096


def run(name: str, E: int, G: int, L: int, k: int, tokens: int, skew: float, affinity: float,
        time_limit: float, target_gap: float = 0.0, seed: int = 0) -> dict:
    t0 = time.perf_counter()
    trace = synthetic_trace(E, L, k, tokens, skew=skew, affinity=affinity, seed=seed)
    gen_s = time.perf_counter() - t0
    pl = solve_placement(trace, G, method="search", time_limit_s=time_limit, seed=seed, target_gap=target_gap)
    p = make_problem(trace, G)
    rows = {"placement": placement_stats(trace, pl, BYTES_PER_TOKEN),
            "round-robin": placement_stats(trace, round_robin(p), BYTES_PER_TOKEN),
            "random": placement_stats(trace, random_placement(p, seed), BYTES_PER_TOKEN)}
    print(f"\n== {name}: {E} experts x {G} ranks x {L} layers, top-{k}, {tokens} tokens, skew {skew}, "
          f"affinity {affinity} (trace generated in {gen_s:.1f} s)")
    print(f"   objective {pl.objective:,.1f}  lower bound {pl.lower_bound:,.1f}  gap {pl.gap:.2%}  "
          f"solve {pl.solve_time_s:.1f} s (limit {time_limit:.0f} s, stop at gap {target_gap:.0%})")
    print(f"   {'':12} {'cross tokens':>14} {'share':>7} {'a2a MB/rank max':>16} {'mean':>8} {'max/mean load':>14}")
    for label, s in rows.items():
        print(f"   {label:12} {s['cross_rank_tokens']:>14,.0f} {s['cross_fraction']:>7.1%} "
              f"{s['a2a_bytes_per_rank_max'] / 1e6:>16,.1f} {s['a2a_bytes_per_rank_mean'] / 1e6:>8,.1f} "
              f"{s['max_load_ratio']:>14.4f}")
    reduction = 1 - rows["placement"]["cross_rank_tokens"] / rows["round-robin"]["cross_rank_tokens"]
    floor = load_bound(p).sum() / (p.load.sum() / G)
    print(f"   cross-rank tokens {reduction:.1%} below round-robin; max/mean load can be no lower than {floor:.4f}")
    return dict(gap=pl.gap, time_s=pl.solve_time_s, reduction=reduction,
                max_load_ratio=rows["placement"]["max_load_ratio"])


def verdict(label: str, ok: bool) -> None:
    print(f"   [{'PASS' if ok else 'FAIL'}] {label}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--skip-large", action="store_true", help="skip the 256 x 64 x 60 instance")
    ap.add_argument("--skip-sweep", action="store_true", help="skip the sensitivity rows")
    args = ap.parse_args()
    print(f"cpus: {os.cpu_count()}, load average: {os.getloadavg()[0]:.1f} (timings are wall clock)")

    a = run("acceptance 1+2a", 64, 8, 32, 1, 65536, 0.5, 0.9, time_limit=30, target_gap=0.02)
    verdict(f"gap {a['gap']:.2%} <= 2% in {a['time_s']:.1f} s <= 30 s", a["gap"] <= 0.02 and a["time_s"] <= 30)
    verdict(f"cross-rank tokens -{a['reduction']:.1%} (>= 50%), max/mean load {a['max_load_ratio']:.4f} (<= 1.05)",
            a["reduction"] >= 0.5 and a["max_load_ratio"] <= 1.05)
    if not args.skip_large:
        b = run("acceptance 2b", 256, 64, 60, 8, 32768, 0.5, 0.9, time_limit=120)
        verdict(f"placement with bound, gap {b['gap']:.2%}, in {b['time_s']:.1f} s <= 120 s", b["time_s"] <= 120)
    if not args.skip_sweep:
        for k, tokens, aff in ((1, 8192, 0.9), (1, 262144, 0.9), (1, 65536, 0.6), (2, 65536, 0.9)):
            run("sensitivity", 64, 8, 32, k, tokens, 0.5, aff, time_limit=30, target_gap=0.02)


if __name__ == "__main__":
    main()
