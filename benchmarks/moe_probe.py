"""What-if pricing of the MoE rows of published_modern.yaml (docs/validation.md, "MoE rows, fresh readings"):
each mode prices every row on one tree twice, as shipped and with one reading changed, and prints the rows
that move. Nothing here is shipped: the readings that hold go to the mapping or the profiles.

    python benchmarks/moe_probe.py --cache FILE flops     # Folding rows: autopar's graph FLOPs vs Megatron-LM's
    python benchmarks/moe_probe.py --cache FILE knee [T0]  # Hopper matmul_eff knee t0 (s), e.g. 19.7e-6
    python benchmarks/moe_probe.py --cache FILE fp8-ratio  # Megatron fp8 GEMMs at most bf16 x 1.8
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import calibrate_modern as cal  # noqa: E402
import published_rows as pr  # noqa: E402
from published_moe_rows import FOLDING, mcore_flops  # noqa: E402

from autopar.core import gpu as gpu_mod  # noqa: E402

MODERN = Path(__file__).resolve().parents[2] / "shared" / "validation" / "published_modern.yaml"
E_MAX, P_BF16 = 0.75, 989.4e12          # the Hopper matmul_eff curve: eff = 1/(1/e_max + P t0 / flops)
FP8_OVER_BF16 = 1.8                      # measured cuBLAS fp8 / bf16 rate at >= 8192^3 (kernel_rates_h100_sxm.json)


def flops_rows(built: list) -> None:
    """The Folding rows' published step with autopar's graph FLOPs against Megatron-LM's count (same prices)."""
    for b in built:
        if pr.source_key(b.case.run) != FOLDING:
            continue
        p = cal.price(b)
        e = p.estimate
        per = pr._published_tflops(b.case.run) * 1e12 * e.world
        old, new = e.model_flops / per, mcore_flops(pr.model_config(b.case.run), b.case.run, e.tokens) / per
        print(f"{b.case.id[12:62]:50s} pred {p.pred_step_s:6.2f} s  published {old:6.2f} -> {new:6.2f} s  "
              f"err {100 * (old / p.pred_step_s - 1):+6.1f}% -> {100 * (new / p.pred_step_s - 1):+6.1f}%")


def knee_errors(built: list, t0: float) -> dict[str, float]:
    """Every row's error with the Hopper profiles' matmul_eff replaced by the physics curve at knee ``t0``."""
    shipped = gpu_mod.GpuProfile.eff

    def eff(self, name: str, x: float) -> float:
        if name in ("matmul", "matmul_eff") and self.name.startswith(("h100", "h200", "h800")):
            return 1 / (1 / E_MAX + P_BF16 * t0 / max(x, 1.0))
        return shipped(self, name, x)

    gpu_mod.GpuProfile.eff = eff
    try:
        for b in built:
            b.cm._cache.clear()
        return {b.case.id: cal.price(b).error for b in built}
    finally:
        gpu_mod.GpuProfile.eff = shipped
        for b in built:
            b.cm._cache.clear()


def fp8_ratio_errors(built: list) -> dict[str, float]:
    """Every Megatron fp8 row's error with ``fp8_matmul_scale`` = ``matmul_scale`` x the measured fp8/bf16 rate."""
    out = {}
    for b in built:
        if b.case.dtype != "fp8" or b.case.runtime != "megatron":
            continue
        stack, gpu = b.cm.stack, b.cm.gpu
        scale = stack.matmul_scale * FP8_OVER_BF16 * gpu.peak_flops("bf16") / gpu.peak_flops("fp8")
        tied = stack.model_copy(update={"fp8_matmul_scale": scale})
        out[b.case.id] = cal.price(b, tied).error
        b.cm.stack = b.cm.timer.stack = stack
        b.cm._cache.clear()
    return out


def compare(base: dict[str, float], new: dict[str, float], floor: float = 0.02) -> None:
    """Rows that move by more than ``floor`` or sit above 15% either way; the mean and the count above 15%."""
    for rid in sorted(new):
        if abs(new[rid] - base[rid]) > floor or max(abs(base[rid]), abs(new[rid])) > 0.15:
            print(f"{rid[:60]:60s} {100 * base[rid]:+6.1f} -> {100 * new[rid]:+6.1f}")
    if len(new) == len(base):
        print(f"mean |err| {100 * statistics.mean(map(abs, base.values())):.2f}% -> "
              f"{100 * statistics.mean(map(abs, new.values())):.2f}%; over 15%: "
              f"{sum(abs(v) > 0.15 for v in base.values())} -> {sum(abs(v) > 0.15 for v in new.values())}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("mode", choices=["flops", "knee", "fp8-ratio"])
    ap.add_argument("t0", nargs="?", type=float, default=19.7e-6, help="knee latency in seconds (mode knee)")
    ap.add_argument("--cache", type=Path, help="pickle of the built rows (validate_published.py --cache)")
    args = ap.parse_args(argv)
    built, _ = cal.load_or_build([MODERN], args.cache)
    if args.mode == "flops":
        flops_rows(built)
        return 0
    base = {b.case.id: cal.price(b).error for b in built}
    compare(base, knee_errors(built, args.t0) if args.mode == "knee" else fp8_ratio_errors(built), floor=0.0
            if args.mode == "fp8-ratio" else 0.02)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
