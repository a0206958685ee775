"""FSDP2's per-unit copies and casts, counted for the GPU check's llama-gpu (h4096, 4 layers, seq 4096,
global batch 4 = 4 micro-batches of 1, bf16, one H100): zero=3 (``fully_shard``, reshard after forward) vs
zero=0 (FSDP2 ``replicate``: what a 16-bit zero-0 plan emits), and the same counts at dp=8.

    python benchmarks/fsdp_copy_probe.py [--measured-delta-s 0.041]

Prints each copy's bytes per parameter (``cost_models.fsdp_copy``, from torch 2.13's
``distributed/fsdp/_fully_shard`` source), the step's bytes, their time at the H100 profile's memory-bound
rate, the rate at which the zero=3 - replicate difference equals the measured one (0.337 - 0.296 s,
docs/validation.md "FSDP2 copies"), and ``autopar estimate``'s step time with the term for both plans."""

from __future__ import annotations

import argparse
from pathlib import Path

from autopar.core.strategy import Strategy
from autopar.cost_models import fsdp_copy as fc
from autopar.cost_models.session import Inputs, build_cost_model

MODEL = Path(__file__).resolve().parent / "gpu_check_models" / "llama-gpu.json"
MEASURED = {0: 0.296, 3: 0.337}  # s/step on one H100, bf16 (the GPU check, docs/validation.md)


def per_param_lines(n: int, m: int) -> list[tuple[str, float, float]]:
    """(copy, bytes per parameter per step under zero=3, under replicate) for ``m`` micro-batches on ``n`` ranks."""
    g, red = fc.gather_copy_bytes(n, 2), fc.reduce_copy_bytes
    return [("gathers: fwd (+ bwd re-gather under zero=3) per micro-batch", 2 * m * g, m * fc.gather_copy_bytes(1, 2)),
            ("reduce: first of the step (assigns the fp32 grad)", red(n, 2, 2, False), red(1, 2, 2, False)),
            ("reduce: the others (accumulate into the fp32 grad)", (m - 1) * red(n, 2, 2, True), 0.0)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--measured-delta-s", type=float, default=MEASURED[3] - MEASURED[0])
    args = ap.parse_args()
    cm, _spec, _cl, _seq = build_cost_model(Inputs(model=str(MODEL), gpu="h100-sxm", gpus_per_node=1,
                                                   seq_len=4096, dtype="bf16"))
    costs = cm.layer_costs(Strategy.parse("dp=1,mbs=1,gbs=4").resolve(1))
    blocks = sum(costs[i].params_dense for i in cm.blocks)
    params = blocks + costs["embedding"].params_dense + costs["output"].params_dense
    m = 4
    print(f"llama-gpu: {params / 1e9:.4f} B parameters ({blocks / 1e9:.4f} B in the blocks, the rest in the root "
          f"unit: embedding, norm, output), {m} micro-batches, bf16\n")
    for n in (1, 8):
        rows = per_param_lines(n, m)
        print(f"dp={n}: bytes per parameter per step        zero=3   replicate")
        for name, z3, rep in rows:
            print(f"  {name:52s} {z3:7.2f} {rep:9.2f}")
        z3, rep = sum(r[1] for r in rows), sum(r[2] for r in rows)
        print(f"  {'total':52s} {z3:7.2f} {rep:9.2f}   difference {z3 - rep:.2f}\n")
    z3 = fc.step_copy_bytes(params, 1, 2 * m, m, 2, 2)
    rep = fc.step_copy_bytes(params, 1, m, 1, 2, 2)
    rate = cm.timer.bw * cm.gpu.eff("membound", 1e9)
    print(f"one H100: zero=3 {z3 / 1e9:.1f} GB, replicate {rep / 1e9:.1f} GB, difference {(z3 - rep) / 1e9:.1f} GB")
    print(f"  at the profile's membound rate {rate / 1e12:.2f} TB/s (mem_bw x membound_eff e_max): "
          f"zero=3 {z3 / rate * 1e3:.1f} ms, replicate {rep / rate * 1e3:.1f} ms, "
          f"difference {(z3 - rep) / rate * 1e3:.1f} ms")
    print(f"  measured difference {args.measured_delta_s * 1e3:.0f} ms = the counted bytes at "
          f"{(z3 - rep) / args.measured_delta_s / 1e12:.2f} TB/s\n")
    zb, rb = fc.step_copy_bytes(blocks, 1, 2 * m, m, 2, 2), fc.step_copy_bytes(blocks, 1, m, 1, 2, 2)
    print(f"  priced (the blocks' units only; the root unit is left out, as the optimizer term leaves it): "
          f"zero=3 {zb / rate * 1e3:.1f} ms, replicate {rb / rate * 1e3:.1f} ms, difference "
          f"{(zb - rb) / rate * 1e3:.1f} ms\n")
    for zero in (0, 3):
        s = Strategy.parse(f"dp=1,mbs=1,gbs=4,zero={zero}").resolve(1)
        e = cm.estimate(s)
        print(f"autopar estimate zero={zero}: {e.step_time_s:.3f} s (fsdp_copy {e.time['fsdp_copy'] * 1e3:.1f} ms; "
              f"without it {e.step_time_s - e.time['fsdp_copy']:.3f} s), measured {MEASURED[zero]:.3f} s, "
              f"error {(e.step_time_s / MEASURED[zero] - 1) * 100:+.1f}%")


if __name__ == "__main__":
    main()
