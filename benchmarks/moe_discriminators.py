"""What separates the over-predicted fine-grained Megatron MoE rows (GPT-OSS-120B, Mixtral-8x22B-G8T8, Qwen3-30B
pp 2) from the fine-grained rows priced well (Qwen2-57B-A14B, Qwen3-30B pp 1): what-if pricing on one tree, one
mechanism added at a time, for docs/validation.md ("Fine-grained MoE rows: one term priced, candidates
measured"). Nothing here is shipped.

    python benchmarks/moe_discriminators.py --cache FILE layers        # per layer and micro-batch: published vs priced
    python benchmarks/moe_discriminators.py --cache FILE percall [C]   # + C s per local expert GEMM call (bwd 2 calls)
    python benchmarks/moe_discriminators.py --cache FILE scan          # per-call C x ep_overlap x matmul_scale
    python benchmarks/moe_discriminators.py --cache FILE a2a [F]       # inter-node all-to-all bandwidth x F (0.5)
    python benchmarks/moe_discriminators.py --cache FILE stages        # per rank and micro-batch, output layer, p2p

``percall`` is the fixed cost of each GEMM Transformer Engine's ``GroupedLinear`` issues per local expert on
Hopper (``general_grouped_gemm``: one cuBLAS call per expert over its compute streams; a knee in the GEMM
curve and a host or launch cost per call all take this form), so it grows with the local experts and not
with their tokens. (GPT-OSS's unfused YaRN RoPE, found the same way, is priced: ``megatron_ops.megatron_rope``.)
"""

from __future__ import annotations

import argparse
import collections
import statistics
import sys
from contextlib import contextmanager
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import calibrate_modern as cal  # noqa: E402
from moe_probe import MODERN, compare  # noqa: E402

from autopar.cost_models import comm  # noqa: E402
from autopar.cost_models import layer_cost as lc  # noqa: E402

# Rows the summary lines show, by a unique part of their id.
KEY_ROWS = ("GPT_OSS_120B_64gpu_BF16_22", "G8T8_mcore", "G8T8_folding", "Qwen2-57B-A14B_folding_128",
            "Qwen2-57B-A14B_mcore_512", "DeepSeek", "8x70B_mcore_1024", "Mixtral-8x22B_folding_256",
            "Qwen3_30B_a3B_16gpu_FP8_12", "Qwen3_30B_a3B_16gpu_FP8_23", "235B_a22B_256gpu_FP8_13")
OUTLIER = "Qwen3_30B_a3B_16gpu_FP8_23"   # left out of the summaries' mean: no constant reaches it (docs)


def megatron_moe(built: list) -> list:
    return [b for b in built if b.case.runtime == "megatron" and b.cm.spec.is_moe]


@contextmanager
def per_call_cost(c_s: float):
    """Every local expert GEMM call of a ``--runtime megatron`` layer costs ``c_s`` more (its backward two calls)."""
    shipped = lc._op_time

    def op_time(op, s, sh, ctx, performed=1.0, cast=None):
        f, b = shipped(op, s, sh, ctx, performed, cast)
        if op.shard == "expert" and op.kind == "gemm" and ctx.runtime == "megatron":
            calls = op.calls / s.ep
            return f + calls * c_s, b + 2 * calls * c_s
        return f, b

    lc._op_time = op_time
    try:
        yield
    finally:
        lc._op_time = shipped


def errors(rows: list, **update) -> dict[str, float]:
    """Each row's error with its stack's constants updated by ``update`` (the per-layer prices re-derived)."""
    out = {}
    for b in rows:
        b.cm._cache.clear()
        out[b.case.id] = cal.price(b, b.cm.stack.model_copy(update=update) if update else None).error
        b.cm._cache.clear()
    return out


def summary(tag: str, errs: dict[str, float]) -> None:
    kept = [v for k, v in errs.items() if OUTLIER not in k]
    obj = statistics.mean(map(abs, kept)) + statistics.mean(max(0.0, abs(e) - 0.15) for e in kept)
    picks = " ".join(f"{100 * next(v for k, v in errs.items() if x in k):+6.1f}" for x in KEY_ROWS)
    print(f"{tag:24s} mean {100 * statistics.mean(map(abs, kept)):5.2f}% +excess {100 * obj:5.2f}  "
          f"over 15%: {sum(abs(e) > 0.15 for e in kept):2d} | {picks}")


@contextmanager
def recorded():
    """The (op, strategy, shards, forward s, backward s) of every op priced inside the block."""
    shipped, seen = lc._op_time, []

    def op_time(op, s, sh, ctx, performed=1.0, cast=None):
        f, b = shipped(op, s, sh, ctx, performed, cast)
        seen.append((op, s, sh, f, b))
        return f, b

    lc._op_time = op_time
    try:
        yield seen
    finally:
        lc._op_time = shipped


def layer_rows(rows: list) -> None:
    """Per MoE layer and micro-batch of the slowest stage's share: published and priced step over (micro-batches x
    layers per stage), the priced MoE layer by kind, and its expert GEMMs as one rank runs them."""
    for b in rows:
        s, p = b.strategy, cal.price(b)
        passes = s.num_micro_batches * b.cm.num_layers / s.pp
        print(f"{b.case.id[:64]:64s} {100 * p.error:+6.1f}%  published {1e3 * p.pub_step_s / passes:6.2f} ms  "
              f"priced {1e3 * p.pred_step_s / passes:6.2f} ms per layer pass")
        with recorded() as seen:
            cost = lc.price_layer(next(t for t in b.cm.templates if t.kind == "block" and t.is_moe), s, b.cm.ctx)
        kinds = collections.Counter()
        for op, _, _, f, bw in seen:
            kinds[f"{op.kind}:{op.shard}" if op.kind == "gemm" else op.kind] += f + bw
        kinds.update({f"comm:{k}": v for k, v in cost.comm_s.items()})
        print("    " + "  ".join(f"{k} {1e3 * v:.2f}" for k, v in sorted(kinds.items())) +
              f"  (layer {1e3 * (cost.fwd_s + cost.bwd_s + sum(cost.comm_s.values())):.2f} ms)")
        for op, st, sh, f, bw in seen:
            if op.shard == "expert" and op.kind == "gemm":
                (m, n, k), local = lc._local_gemm(op, st, sh), op.calls / st.ep
                print(f"    expert GEMM m {m:.0f} n {n:.0f} k {k:.0f} x {local:.0f} local: {1e3 * (f + bw):.2f} ms, "
                      f"{6 * m * n * k * local / (f + bw) / 1e12:.0f} TFLOP/s")


@contextmanager
def a2a_bandwidth(factor: float):
    """Every all-to-all whose group spans nodes runs its NIC share at ``factor`` x the cluster's inter-node
    bandwidth (``comm.multinode_all_to_all_time``; NVLink share and latencies as priced)."""
    shipped = comm.multinode_all_to_all_time

    def slowed(size_bytes, n, g, intra, inter_bw_gbps, inter_latency_s):
        return shipped(size_bytes, n, g, intra, inter_bw_gbps * factor, inter_latency_s)

    comm.multinode_all_to_all_time, comm._MEMO = slowed, comm.IdentityMemo(200_000)
    try:
        yield
    finally:
        comm.multinode_all_to_all_time, comm._MEMO = shipped, comm.IdentityMemo(200_000)


def stages(rows: list) -> None:
    """Per row: the step priced and published, each pipeline rank's forward + backward per micro-batch, the output
    layer's share of the last rank's, and one stage-to-stage send (``CostModel.p2p_time``) with the sends a
    micro-batch makes each way (pp x vpp - 1 boundaries of the chain of virtual stages)."""
    for b in rows:
        s, p = b.strategy, cal.price(b)
        e, out = p.estimate, b.cm.layer_costs(s)["output"]
        ranks = " ".join(f"{1e3 * (r.fwd_s + r.bwd_s):.1f}" for r in e.ranks)
        crossings = s.pp * max(s.vpp, 1) - 1
        print(f"{b.case.id[:60]:60s} step {p.pred_step_s:6.2f} s (published {p.pub_step_s:6.2f}), "
              f"{s.num_micro_batches} micro-batches; per micro-batch rank fwd+bwd {ranks} ms; output layer "
              f"{1e3 * (out.fwd_s + out.bwd_s):.1f} ms; p2p {1e3 * b.cm.p2p_time(s):.2f} ms x {crossings} each way")


def scan(built: list) -> None:
    """``summary`` lines of the Hopper Megatron rows over per-call cost x ``matmul_scale`` x ``ep_overlap``."""
    hopper = [b for b in built if b.case.runtime == "megatron" and b.cm.gpu.name.startswith("h100")]
    summary("shipped", errors(hopper))
    for c_s in (0.0, 10e-6, 20e-6, 40e-6):
        with per_call_cost(c_s):
            for scale in (0.75, 0.8):
                for overlap in (0.4, 0.7):
                    summary(f"C {1e6 * c_s:.0f} us ms {scale} epo {overlap}",
                            errors(hopper, matmul_scale=scale, ep_overlap=overlap))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("mode", choices=["layers", "percall", "scan", "a2a", "stages"])
    ap.add_argument("c_s", nargs="?", type=float, help="seconds per expert GEMM call (percall, default 20e-6) or "
                    "the inter-node all-to-all bandwidth factor (a2a, default 0.5)")
    ap.add_argument("--cache", type=Path, help="pickle of the built rows (validate_published.py --cache)")
    args = ap.parse_args(argv)
    built, _ = cal.load_or_build([MODERN], args.cache)
    rows = megatron_moe(built)
    if args.mode == "scan":
        scan(built)
    elif args.mode == "layers":
        layer_rows(rows)
    elif args.mode == "stages":
        stages(rows)
    else:
        base = errors(rows)
        with per_call_cost(args.c_s or 20e-6) if args.mode == "percall" else a2a_bandwidth(args.c_s or 0.5):
            compare(base, errors(rows), floor=0.005)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
