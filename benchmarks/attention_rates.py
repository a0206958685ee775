"""What the cost model prices for fused attention against the measured points, by keys per query tile and head dim.

    python benchmarks/attention_rates.py [--gpu h100-sxm]

For each measured kernel of the profile (``attention_kernels``): the knee fitted to its points
(``cost_models.attention_rate.knee_fit``), then per shape the keys a query tile reads, the measured rate where the
shape was measured, and the seconds and TFLOP/s (forward + backward, b 1, on the blocks computed) that
``OpTimer.attention_fb`` prices. Shapes: the measured ones (h 32, d 128, seq 4k/8k/16k), GPT-OSS-120B's layers
(32 heads shown, d 64, seq 4096; full causal and the 128-token window), and unmeasured d 128 ones.
"""

from __future__ import annotations

import argparse

from autopar.cost_models.attention_rate import keys_per_query_tile, knee_fit
from autopar.cost_models.compute import OpTimer, causal_block_fraction, measured_kernel_points
from autopar.profiles.hw import load_gpu_profile

# (label, heads, head_dim, seq, window): kernel_rates' shapes, then GPT-OSS-120B's (its 64 heads; 32 shown), others
SHAPES = [("measured 4k", 32, 128, 4096, 0), ("measured 8k", 32, 128, 8192, 0), ("measured 16k", 32, 128, 16384, 0),
          ("gpt-oss full", 32, 64, 4096, 0), ("gpt-oss window 128", 32, 64, 4096, 128),
          ("d128 window 128", 32, 128, 4096, 128), ("short 1k", 32, 128, 1024, 0), ("long 32k", 32, 128, 32768, 0)]


def priced(gpu, runtime: str, heads: int, d: int, seq: int, window: int) -> tuple[float, float]:
    """(seconds, TFLOP/s on the blocks computed) of one forward + backward call as priced."""
    full = 4.0 * heads * seq * seq * d
    perf = causal_block_fraction(seq, 1, window)
    t = OpTimer(gpu, "bf16", stack=gpu.stack(runtime))
    f, b = t.attention_fb(full, 4.0 * 2 * heads * seq * d, perf, 2.5, runtime, seq, 1, d)
    return f + b, 3.5 * full * perf / (f + b) / 1e12


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gpu", default="h100-sxm")
    gpu = load_gpu_profile(ap.parse_args(argv).gpu)
    for name, kernel in gpu.attention_kernels.items():
        runtime = kernel.stacks[0]
        pts = measured_kernel_points(kernel, gpu.peak_tflops["bf16"])
        e_max, k0 = knee_fit(tuple(pts))
        print(f"{name} ({runtime}): knee e_max {e_max:.4f} ({e_max * gpu.peak_tflops['bf16']:.1f} TFLOP/s), "
              f"k0 {k0:.0f} keys; measured on the blocks computed: "
              + ", ".join(f"{k:.0f} keys {e * gpu.peak_tflops['bf16']:.1f}" for k, e in pts))
        measured = {round(k): e * gpu.peak_tflops["bf16"] for k, e in pts}
        print(f"  {'shape':20s} {'keys/tile':>9s} {'measured':>8s} {'priced s':>10s} {'TFLOP/s':>8s}")
        for label, h, d, seq, w in SHAPES:
            sec, rate = priced(gpu, runtime, h, d, seq, w)
            keys = keys_per_query_tile(seq, causal_block_fraction(seq, 1, w))
            meas = f"{measured[round(keys)]:8.1f}" if d == kernel.head_dim and round(keys) in measured else f"{'-':>8s}"
            print(f"  {label:20s} {keys:9.0f} {meas} {sec * 1e3:8.3f}ms {rate:8.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
