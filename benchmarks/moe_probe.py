"""What-if pricing of the MoE rows of published_modern.yaml (docs/validation.md, "MoE rows, fresh readings"):
flops, knee, fp8-ratio and a2a-blocking price every row on one tree twice, as shipped and with one reading
changed, and print the rows that move; whatif, serial and combined print the rows they name. Nothing here is
shipped: the readings that hold go to the mapping or the profiles.

    python benchmarks/moe_probe.py --cache FILE flops     # Folding rows: autopar's graph FLOPs vs Megatron-LM's
    python benchmarks/moe_probe.py --cache FILE knee [T0]  # Hopper matmul_eff knee t0 (s), e.g. 19.7e-6
    python benchmarks/moe_probe.py --cache FILE fp8-ratio  # Megatron fp8 GEMMs at most bf16 x 1.8
    python benchmarks/moe_probe.py --cache FILE a2a-blocking [F]  # inter-node all-to-all x F, blocking rows only
    python benchmarks/moe_probe.py --cache FILE whatif ROW K=V;K=V ...  # one row under other strategy knobs
    python benchmarks/moe_probe.py --cache FILE serial [ROW]  # pp > 1 MoE rows, their stages run one after another
    python benchmarks/moe_probe.py --cache FILE combined [ROW]  # interleaved rows as combined 1F1B steps

``a2a-blocking`` slows the NIC share of the all-to-alls of the rows that block on them (``Case.a2a_overlap``
False: MoE Parallel Folding's early-2025 Megatron-Core, ``torch.distributed.all_to_all_single`` on NCCL) and
leaves the Megatron-Bridge rows (overlapped) as shipped: the most an all-to-all rate of that software alone could
explain. ``whatif`` re-prices one row (id substring) with strategy knobs replaced (``K=DEL`` drops one;
``a2a_overlap=0``: the row blocks on its all-to-alls), for readings of a row's configuration the row does not
state. ``serial`` bounds a pipeline whose stages do not overlap at all: per micro-batch the sum of the ranks'
forward + backward instead of the slowest rank's.
``combined`` replays an interleaved row's pipeline with Megatron-Core's all-to-all overlap schedule, whose merged
forward-backward steps send a forward's output only after the backward beside it (``combined_order``).
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
from autopar.core.strategy import Strategy  # noqa: E402
from autopar.cost_models import pipeline  # noqa: E402

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


def a2a_blocking_errors(built: list, factor: float) -> dict[str, float]:
    """Every Megatron MoE row's error with the all-to-alls of the blocking rows (``a2a_overlap`` False) priced at
    ``factor`` x the inter-node bandwidth (``moe_discriminators.a2a_bandwidth``); the other rows as shipped."""
    from moe_discriminators import a2a_bandwidth, errors, megatron_moe  # it imports this module: load on use

    rows = megatron_moe(built)
    out = errors([b for b in rows if b.case.a2a_overlap])
    with a2a_bandwidth(factor):
        out.update(errors([b for b in rows if not b.case.a2a_overlap]))
    return out


def whatif(built: list, key: str, specs: list[str]) -> None:
    """Each row whose id holds ``key``, as shipped and with each spec's strategy knobs replaced."""
    for b in (b for b in built if key in b.case.id):
        p = cal.price(b)
        print(f"{b.case.id}  {b.case.strategy}\n  shipped {p.breakdown()}")
        for spec in specs:
            knobs = dict(kv.split("=") for kv in b.case.strategy.split(","))
            knobs.update(kv.split("=") for kv in spec.split(";"))
            overlap = b.cm.ctx.a2a_overlap
            b.cm.ctx.a2a_overlap = bool(int(knobs.pop("a2a_overlap", overlap)))   # the row's --no-a2a-overlap
            shipped, b.strategy = b.strategy, Strategy.parse(
                ",".join(f"{k}={v}" for k, v in knobs.items() if v != "DEL")).resolve(b.strategy.world)
            b.cm._cache.clear()
            p = cal.price(b)
            print(f"  {spec:24s} {p.breakdown()}  peak {p.estimate.reserved_peak_bytes / 2**30:.1f} GiB")
            b.strategy, b.cm.ctx.a2a_overlap = shipped, overlap
            b.cm._cache.clear()


def serial_rows(built: list, key: str = "") -> None:
    """Megatron MoE rows with a pipeline (id holding ``key``): published and priced step, and the step if the
    stages ran one after another (per micro-batch the sum of the ranks' forward + backward, the rest as priced)."""
    for b in built:
        if b.case.runtime != "megatron" or not b.cm.spec.is_moe or b.strategy.pp < 2 or key not in b.case.id:
            continue
        p = cal.price(b)
        e, m = p.estimate, b.strategy.num_micro_batches
        ranks = [r.fwd_s + r.bwd_s for r in e.ranks]
        serial = p.pred_step_s + m * (sum(ranks) - max(ranks))
        print(f"{b.case.id[:60]:60s} pp {b.strategy.pp} vpp {b.strategy.vpp} m {m}: published {p.pub_step_s:.2f} s, "
              f"priced {p.pred_step_s:6.2f} s ({100 * p.error:+6.1f}%), stages in series {serial:6.2f} s "
              f"({100 * (p.pub_step_s / serial - 1):+6.1f}%); per micro-batch ranks "
              + " ".join(f"{1e3 * x:.1f}" for x in ranks) + " ms")


def combined_order(rank: int, p: int, m: int, v: int) -> list[list[tuple]]:
    """Megatron-Core's interleaved order under ``--overlap-moe-expert-parallel-comm`` (v0.16
    ``schedules.get_pp_rank_microbatches``: one forward more in warmup; ``combined_1f1b_schedule_for_interleaved_
    pipelining``: each steady-state forward runs merged with the next backward): units of ops whose outputs
    all exist when the unit ends."""
    plain = pipeline._interleaved_order(rank, p, m, v)
    warm = round(pipeline._looped_warmup(rank, p, m, v) * v)   # the plain schedule's warm-up forwards, in chunks
    fwd = [op for op in plain if op[0] == "F"]
    bwd = [op for op in plain if op[0] == "B"]
    steady = m * v - warm
    return [[op] for op in fwd[:warm]] + [[fwd[warm + k], bwd[k]] for k in range(steady)] + \
        [[op] for op in bwd[steady:]]


def replay_units(f: list[float], b: list[float], m: int, v: int, p2p: float) -> float:
    """Step of the interleaved pipeline run as ``combined_order``'s units (``pipeline.simulate``'s rules)."""
    p = len(f)
    orders = [combined_order(r, p, m, v) for r in range(p)]
    done, free, pos = {}, [0.0] * p, [0] * p
    while any(pos[r] < len(orders[r]) for r in range(p)):
        moved = False
        for r in range(p):
            while pos[r] < len(orders[r]):
                unit = orders[r][pos[r]]
                ready = [pipeline._ready_time(k, mb, c, r, p, v, done, p2p) for k, mb, c in unit]
                if None in ready:
                    break
                free[r] = max([free[r], *ready]) + sum((f[r] if k == "F" else b[r]) / v for k, _, _ in unit)
                done.update({(k, mb, pipeline._virtual(r, c, p)): free[r] for k, mb, c in unit})
                pos[r], moved = pos[r] + 1, True
        if not moved:
            raise RuntimeError("combined schedule deadlocked")
    return max(free)


def combined_rows(built: list, key: str = "") -> None:
    """Interleaved Megatron MoE rows (id holding ``key``) that overlap their all-to-alls: the pipeline replayed
    op by op as priced (``pipeline.simulate``) and as ``combined_order`` runs it, with the priced p2p."""
    for b in built:
        s = b.strategy
        if s.schedule != "interleaved" or not b.case.a2a_overlap or not b.cm.spec.is_moe or key not in b.case.id:
            continue
        e = cal.price(b).estimate
        f, bw, p2p = [r.fwd_s for r in e.ranks], [r.bwd_s for r in e.ranks], b.cm.p2p_time(s)
        plain = pipeline.simulate(f, bw, s.num_micro_batches, s.schedule, s.vpp, p2p).step_time_s
        merged = replay_units(f, bw, s.num_micro_batches, s.vpp, p2p)
        print(f"{b.case.id[:60]:60s} pipeline {plain:.3f} s as priced, {merged:.3f} s with combined "
              f"forward-backward steps (p2p {1e3 * p2p:.2f} ms)")


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
    ap.add_argument("mode", choices=["flops", "knee", "fp8-ratio", "a2a-blocking", "whatif", "serial",
                                         "combined"])
    ap.add_argument("extra", nargs="*", help="knee: latency in seconds (19.7e-6); a2a-blocking: bandwidth factor "
                    "(0.5); whatif: a row id substring, then one or more K=V;K=V strategy specs")
    ap.add_argument("--cache", type=Path, help="pickle of the built rows (validate_published.py --cache)")
    args = ap.parse_args(argv)
    built, _ = cal.load_or_build([MODERN], args.cache)
    if args.mode == "whatif":
        whatif(built, args.extra[0], args.extra[1:])
    elif args.mode in ("serial", "combined"):
        (serial_rows if args.mode == "serial" else combined_rows)(built, *args.extra[:1])
    elif args.mode == "flops":
        flops_rows(built)
    if args.mode in ("flops", "whatif", "serial", "combined"):
        return 0
    base = {b.case.id: cal.price(b).error for b in built}
    if args.mode == "a2a-blocking":
        new = a2a_blocking_errors(built, float(args.extra[0]) if args.extra else 0.5)
        compare({k: base[k] for k in new}, new, floor=0.005)
        return 0
    new = knee_errors(built, float(args.extra[0]) if args.extra else 19.7e-6) if args.mode == "knee" \
        else fp8_ratio_errors(built)
    compare(base, new, floor=0.0 if args.mode == "fp8-ratio" else 0.02)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
