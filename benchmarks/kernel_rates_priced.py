"""The cost model's price for the exact shapes ``benchmarks/kernel_rates.py`` measured, against the measurement.

    python benchmarks/kernel_rates_priced.py [--rates benchmarks/data/kernel_rates_h100_sxm.json] [--gpu h100-sxm]

For each measured GEMM (bf16, fp8) it prints the TFLOP/s ``OpTimer.gemm_fb`` prices with the profile's curve
alone (stack factor 1) and with each stack's shipped constants; for each causal attention point (b 1, 32 heads,
d 128; FLOPs as kernel_rates counts them: the causal half, forward + backward 3.5x the forward) the TFLOP/s
each stack's attention is priced at (its measured kernel where the profile names one, else ``attention_eff``
x its fitted ``attention_scale``), beside every backend's measured rate. The default rates file is the first
H100 run (docs/validation.md, "Kernel rates measured on an H100").
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from autopar.core.gpu import StackConstants
from autopar.cost_models.compute import OpTimer, causal_block_fraction
from autopar.profiles.hw import load_gpu_profile

DEFAULT_RATES = Path(__file__).resolve().parent / "data" / "kernel_rates_h100_sxm.json"
STACKS = ("torch", "torchtitan", "megatron")


def gemm_tflops(gpu, stack: StackConstants, dtype: str, m: int, k: int, n: int) -> float:
    """Priced TFLOP/s of one [m,k]x[k,n] GEMM forward (no fp8 casts: kernel_rates times the GEMM alone)."""
    from autopar.cost_models.fp8_cost import Fp8Cast

    t = OpTimer(gpu, dtype, stack=stack).gemm_fb(m, n, k, 1.0, 2.0, Fp8Cast("none"))[0]
    return 2.0 * m * n * k / t / 1e12


def attention_tflops(gpu, runtime: str, seq: int, heads: int = 32, head_dim: int = 128) -> float:
    """Priced forward + backward TFLOP/s of causal attention at b 1, in kernel_rates' causal-half FLOPs."""
    timer = OpTimer(gpu, "bf16", stack=gpu.stack(runtime))
    full = 4.0 * heads * seq * seq * head_dim
    fwd, bwd = timer.attention_fb(full, 4.0 * 2 * heads * seq * head_dim, causal_block_fraction(seq), 2.5,
                                  runtime, seq)
    return 3.5 * full / 2 / (fwd + bwd) / 1e12


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rates", type=Path, default=DEFAULT_RATES)
    ap.add_argument("--gpu", default="h100-sxm")
    a = ap.parse_args(argv)
    data, gpu = json.loads(a.rates.read_text()), load_gpu_profile(a.gpu)
    print(f"measured: {json.dumps(data['env'])}; priced: {gpu.name} as shipped")
    print(f"{'GEMM (m,k,n)':24s} {'dtype':5s} {'measured':>9s} {'curve':>7s} " + " ".join(f"{s:>10s}" for s in STACKS))
    for r in (r for r in data["rows"] if r["kind"] == "gemm" and "tflops" in r):
        m, k, n = r["shape"]
        priced = [gemm_tflops(gpu, gpu.stack(s), r["dtype"], m, k, n) for s in STACKS]
        curve = gemm_tflops(gpu, StackConstants(), r["dtype"], m, k, n)
        print(f"{str(tuple(r['shape'])):24s} {r['dtype']:5s} {r['tflops']:9.1f} {curve:7.1f} "
              + " ".join(f"{p:10.1f}" for p in priced))
    print(f"\n{'attention fwd+bwd, seq':24s} {'flash':>7s} {'cudnn':>7s} {'effic.':>7s}  priced: "
          + " ".join(f"{s} ({(gpu.attention_kernel(s) and 'kernel') or 'curve'})" for s in STACKS))
    att = {(r["backend"], r["seq_len"]): r.get("fwd_bwd_tflops", float("nan"))
           for r in data["rows"] if r["kind"] == "attention"}
    for seq in sorted({s for _, s in att}):
        meas = " ".join(f"{att.get((b, seq), float('nan')):7.1f}" for b in ("flash", "cudnn", "efficient"))
        print(f"{seq:<24d} {meas}  " + " ".join(f"{attention_tflops(gpu, s, seq):10.1f}" for s in STACKS))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
