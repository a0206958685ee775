"""The llm-foundry (MPT) rows of ``published_modern.yaml``: the checks behind the llm-foundry part of
docs/validation.md "Outlier rows, by mechanism". Prices nothing new: it prints the rows as
``validate_published.py`` prices them (shipped constants) beside the arithmetic the doc cites.

    python benchmarks/foundry_probe.py [--cache PICKLE]

1. Same work per step: the MPT-760m rows of one table whose steps hold the same tokens in the same
   number of micro-batches of the same token count (only the sequence length differs).
2. The same job on A100-40GB and A100-80GB (same chip; 80GB has the faster HBM).
3. A hypothesis, not a shipped term: Composer's FSDP ``mixed_precision: DEFAULT`` (the A100-80GB and
   H100 tables' ``mp_mode``) keeps parameters in fp32 and runs under ``torch.autocast``, so every
   micro-batch casts each layer's gathered weights to bf16 (and back for the gradients) where
   autopar's own program (FSDP2 bf16 ``MixedPrecisionPolicy``, the A100-40GB table's ``PURE``) does
   not. It prints every row's error with that traffic added to the priced step. Refuted since: mosaicml
   0.14-0.16 (what llm-foundry 0.1 / 0.2 pin) map DEFAULT to bf16 ``param_dtype`` with ``reduce_dtype``
   None (= ``param_dtype`` in FSDP); only mosaicml 0.13 kept fp32 parameters (docs/validation.md).
4. The rows that run FSDP ``SHARD_GRAD_OP`` (ZeRO-2) as priced (per unit and micro-batch:
   ``cost_models.fsdp.gathers_per_unit``) and priced as ZeRO-3 (which also re-gathers in the backward).
5. The attention kernel each table ran (``attn_impl``: MPT's Triton kernel or FlashAttention; the tables do
   not say): each row's priced attention seconds (the step at the stack's ``attention_scale`` and at twice it)
   and the factor on them that would close the row. Rows where attention is at least 40% of the step pin
   one table's kernel rate; a table- or model-wide kernel choice moves every row of the table or model.
6. ``--f3``: every published row (all sources) as priced now and with issue 12's two llm-foundry mappings
   undone (``published_foundry_rows``: MPT-30B's 64 heads back to the row's 56; Composer DEFAULT's
   reduce-scatter back to bf16), same tree, shipped constants.
7. Per table and model (three rows or more): the published steps as g x the priced step without attention +
   a x the priced attention (``two_factor_fit``). One model's rows that need a far from 1 (MPT-30B on H100:
   g 0.89, a 1.95) say its attention or its step structure is priced wrong for that model alone, not the stack.
8. A candidate, not shipped: MPT-30B's attention (head dim 112, below the Triton kernel's power-of-two tile)
   x k per GPU type, g left at 1: its rows and the source's mean / max / rows over 15% (``D112_FACTORS``). The
   tile's own 128 / 112 is priced on both GPU types since I12b (``attention_rate.stack_tile_factor``; Hopper's
   ``HeadDimRate`` priced it before): k is what the kernel would need beyond it.
9. The same model and sequence length on 8 H100 and 8 A100-80GB: published and priced H100 / A100 ratios.
10. ``--i12b``: every published row (all sources) with I12b's two llm-foundry rules undone, one at a time and
   both, and as shipped: its fp8 library (``core.gpu.STACK_FP8_LIBRARY``: ``te-linear`` -> torchao's casts) and
   its kernels' power-of-two head-dim tile (``gpu.POW2_TILE_STACKS``), same tree, shipped constants.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import calibrate_modern as cal  # noqa: E402
import published_foundry_rows as pfr  # noqa: E402
import published_rows as pr  # noqa: E402
from relative_fit import two_factor_fit  # noqa: E402

CAST_BYTES_PER_PARAM = 6.0  # read fp32 (4) + write bf16 (2), or read bf16 (2) + write fp32 (4)


def autocast_cast_bytes(layer_params: float, recompute_full: bool) -> float:
    """HBM bytes one micro-batch moves to cast one layer's weights and gradients when FSDP keeps the
    parameters in fp32 under ``torch.autocast`` (Composer ``get_mixed_precision``: DEFAULT =
    ``MixedPrecision(param_dtype=float32, reduce_dtype=bf16, buffer_dtype=float32)`` in mosaicml 0.13 only;
    0.14 on, which llm-foundry runs, gathers bf16 parameters): the forward's
    autocast cast of each weight (fp32 -> bf16; autocast caches casts of leaf tensors only, and
    FSDP1's unsharded parameters are views of its flat parameter), the cast's backward (bf16 -> fp32
    gradient), FSDP's cast of the unsharded gradient to ``reduce_dtype`` before the reduce-scatter,
    and with full activation checkpointing the recomputed forward's cast again. Lower bound: the
    gradient accumulation into the flat parameter and the fp32 all-gathers are not counted."""
    passes = 4 if recompute_full else 3
    return passes * CAST_BYTES_PER_PARAM * layer_params


def micro_batches(strategy: str) -> int:
    d = dict(kv.split("=") for kv in strategy.split(","))
    return int(d["gbs"]) // (int(d["mbs"]) * int(d["dp"]))


def cast_seconds(b: cal.Built) -> float:
    """The hypothesis' extra seconds per step for one built row (0 for ``mp_mode`` other than DEFAULT)."""
    run = b.case.run
    if run["parallel"].get("mp_mode") != "DEFAULT":
        return 0.0
    m = run["model"]
    h, f = m["hidden"], m["ffn_hidden"]
    full = "recompute=full" in b.case.strategy
    per_mb = m["layers"] * b.cm.timer.membound(autocast_cast_bytes(4 * h * h + 2 * h * f, full)) \
        + b.cm.timer.membound(autocast_cast_bytes(m["vocab"] * h, full))  # tied embedding / LM head
    return micro_batches(b.case.strategy) * per_mb


def same_work(rows: list[tuple[cal.Built, pr.Priced]]) -> None:
    print("\n1. MPT-760m, A100-80GB: same tokens per step, same micro-batch count and tokens per micro-batch")
    for b, p in rows:
        if "a100_80gb" in b.case.id and "_760m_" in b.case.id and b.case.seq_len <= 2048:
            d = dict(kv.split("=") for kv in b.case.strategy.split(","))
            tps = b.case.run["measured"]["tokens_per_sec_per_gpu"]
            print(f"  seq {b.case.seq_len:5d}: {int(d['gbs']) * b.case.seq_len:7d} tokens/step, "
                  f"{micro_batches(b.case.strategy)} micro-batches of {int(d['mbs']) * b.case.seq_len} tokens, "
                  f"published {tps:6d} tok/s/GPU, error {100 * p.error:+.1f}%")


def eight_gpu_twins(rows: list[tuple[cal.Built, pr.Priced]], base: str, other: str):
    """(row of table ``base``, row of table ``other``) of the same model and sequence length, both on 8 GPUs."""
    index = {(b.case.run["model"]["name"], b.case.seq_len): (b, p) for b, p in rows
             if base in b.case.id and b.case.run["hardware"]["num_gpus"] == 8}
    for b, p in rows:
        twin = index.get((b.case.run["model"]["name"], b.case.seq_len))
        if other in b.case.id and b.case.run["hardware"]["num_gpus"] == 8 and twin:
            yield twin, (b, p)


def pairs(rows: list[tuple[cal.Built, pr.Priced]]) -> None:
    print("\n2. The same model and sequence length on A100-40GB (PURE) and A100-80GB (DEFAULT), 8 GPUs")
    for twin in eight_gpu_twins(rows, "a100_40gb", "a100_80gb"):
        for bb, pp in twin:
            d = dict(kv.split("=") for kv in bb.case.strategy.split(","))
            print(f"  {bb.case.id[15:50]:35s} mbs {d['mbs']:>3s} x {micro_batches(bb.case.strategy):2d} "
                  f"rc {d['recompute']:4s} published {bb.case.run['measured']['tokens_per_sec_per_gpu']:6d} "
                  f"tok/s/GPU, error {100 * pp.error:+.1f}%")


def hypothesis(rows: list[tuple[cal.Built, pr.Priced]]) -> None:
    print("\n3. Hypothesis (not shipped): fp32 parameters under autocast (mp_mode DEFAULT) add autocast_cast_bytes")
    out = []
    for b, p in rows:
        extra = cast_seconds(b)
        out.append((b.case.id, p.error, p.pub_step_s / (p.pred_step_s + extra) - 1, extra / p.pred_step_s))
    for rid, before, after, share in sorted(out):
        print(f"  {rid[15:56]:41s} {100 * before:+6.1f}% -> {100 * after:+6.1f}%  (+{100 * share:.1f}% priced time)")
    for table in ("a100_40gb", "a100_80gb", "h100_80gb", ""):
        sel = [r for r in out if table in r[0]]
        for k, col in ((1, "now"), (2, "with the casts")):
            errs = [r[k] for r in sel]
            mean = statistics.mean(map(abs, errs))
            print(f"  {table or 'all':10s} {len(sel):3d} rows {col:15s} mean {100 * mean:.2f}% "
                  f"bias {100 * statistics.mean(errs):+.2f}% max {100 * max(map(abs, errs)):.1f}% "
                  f"over 12%: {sum(abs(e) > 0.12 for e in errs)} over 15%: {sum(abs(e) > 0.15 for e in errs)}")


def zero2_as_fsdp(rows: list[tuple[cal.Built, pr.Priced]]) -> None:
    from autopar.core.strategy import Strategy

    print("\n4. FSDP SHARD_GRAD_OP rows: priced as ZeRO-2 (per-unit gathers), and as ZeRO-3 (+ backward re-gathers)")
    for b, p in rows:
        if "zero=2" in b.case.strategy:
            s3 = Strategy.parse(b.case.strategy.replace("zero=2", "zero=3")).resolve(b.strategy.world)
            as_zero3 = p.pub_step_s / b.cm.estimate(s3).step_time_s - 1
            print(f"  {b.case.id[15:56]:41s} {100 * p.error:+6.1f}% -> {100 * as_zero3:+6.1f}%")


def attention_factors(rows: list[tuple[cal.Built, pr.Priced]]) -> None:
    print("\n5. Factor on the priced attention seconds that closes each row (attention's share of the priced step)")
    for table in ("a100_40gb", "a100_80gb", "h100_80gb_amp_bf16", "h100_80gb_amp_fp8"):
        sel = [(b, p, *implied_attention(b, p)) for b, p in rows if table in b.case.id]
        long = [f for _, _, share, f in sel if share >= 0.4]
        print(f" {table}: the {len(long)} rows with attention >= 40% of the step: x{min(long):.2f}..x{max(long):.2f}")
        for b, p, share, f in sel:
            if abs(p.error) > 0.15:
                print(f"  {b.case.id[15:60]:45s} {100 * p.error:+6.1f}%  x{f:5.2f} ({100 * share:.0f}%)")


def implied_attention(b: cal.Built, p: pr.Priced) -> tuple[float, float]:
    """(priced attention share of the step, factor on it that makes the priced step the published one):
    attention seconds = 2 x (step at ``attention_scale`` - step at twice it), attention time being
    inverse in the scale."""
    c0 = b.cm.stack
    doubled = cal.price(b, c0.model_copy(update={"attention_scale": 2 * c0.attention_scale}))
    cal.price(b, c0)
    attn = 2 * (p.pred_step_s - doubled.pred_step_s)
    return attn / p.pred_step_s, 1 + (p.pub_step_s - p.pred_step_s) / attn


def two_factors(rows: list[tuple[cal.Built, pr.Priced]]) -> None:
    print("\n7. Per table and model: published step = g x priced step without attention + a x priced attention")
    groups: dict[tuple[str, str], list] = {}
    for b, p in rows:
        share, _ = implied_attention(b, p)
        table = b.case.id[15:b.case.id.index("_bf16_" if "_bf16_" in b.case.id else "_fp8_")]
        groups.setdefault((table, b.case.run["model"]["name"]), []).append((b, p, share * p.pred_step_s))
    for (table, model), sel in sorted(groups.items()):
        pts = [(p.pred_step_s - att, att, p.pub_step_s) for _, p, att in sel]
        if len(sel) < 3 or len({b.case.seq_len for b, _, _ in sel}) < 2:
            continue  # one sequence length (MPT-70b): attention's share hardly moves, g and a are not separable
        g, a = two_factor_fit(pts)
        now = [100 * p.error for _, p, _ in sel]
        fitted = [100 * (pub / (g * r + a * t) - 1) for r, t, pub in pts]
        print(f"  {table:18s} {model:9s} {len(sel)} rows  g {g:5.2f}  a {a:5.2f}  |error| max "
              f"{max(map(abs, now)):5.1f}% now -> {max(map(abs, fitted)):5.1f}% with (g, a)")


D112_FACTORS = ((1.0, 1.0), (1.3, 1.0), (1.3, 2.0), (1.6, 2.5))  # (Hopper, Ampere) k on d-112 attention


def d112_candidate(rows: list[tuple[cal.Built, pr.Priced]]) -> None:
    print("\n8. Candidate (not shipped): MPT-30B attention x k (Hopper, Ampere); 30B rows, then all llm-foundry rows")
    att = {b.case.id: implied_attention(b, p)[0] * p.pred_step_s if "_30b_" in b.case.id else 0.0 for b, p in rows}
    for kh, ka in D112_FACTORS:
        errs = {b.case.id: p.pub_step_s / (p.pred_step_s + ((kh if "h100" in b.case.id else ka) - 1)
                                           * att[b.case.id]) - 1 for b, p in rows}
        thirty = " ".join(f"{100 * e:+.1f}" for rid, e in sorted(errs.items()) if "_30b_" in rid)
        print(f"  k {kh:.1f} / {ka:.1f}: {thirty}\n    all: {_summary(errs, '')}, max "
              f"{100 * max(map(abs, errs.values())):.1f}%")


def h100_twins(rows: list[tuple[cal.Built, pr.Priced]]) -> None:
    print("\n9. Same model and sequence length on 8 GPUs: H100 / A100-80GB tokens/s per GPU, published and priced")
    for (ob, op), (b, p) in eight_gpu_twins(rows, "a100_80gb", "h100_80gb_amp_bf16"):
        pub = b.case.run["measured"]["tokens_per_sec_per_gpu"] / ob.case.run["measured"]["tokens_per_sec_per_gpu"]
        mbs = [dict(kv.split("=") for kv in x.case.strategy.split(","))["mbs"] for x in (ob, b)]
        print(f"  {b.case.run['model']['name']:9s} {b.case.seq_len:6d}  published {pub:.2f}  priced "
              f"{pub * (1 + p.error) / (1 + op.error):.2f}  (mbs {' / '.join(mbs)}; errors A100 "
              f"{100 * op.error:+.1f}%, H100 {100 * p.error:+.1f}%)")


def f3_before_after(built: list[cal.Built]) -> None:
    """Section 6: the rows each F3 mapping moves, priced with it undone and as shipped."""
    import tempfile

    from autopar.cost_models import fsdp

    real = fsdp.reduce_bytes
    now = {b.case.id: cal.price(b).error for b in built}
    fsdp.reduce_bytes = lambda runtime, grad_bytes, impl="fsdp2": real(runtime, grad_bytes)
    pr.foundry_heads = lambda m: m["heads"]
    try:
        before = {}
        with tempfile.TemporaryDirectory() as tmp:
            for b in built:
                b.cm._cache.clear()
                b.cm._z3 = type(b.cm._z3)(4096)
                moved = b.case.run["model"].get("name") in pfr.MPT_HEADS
                before[b.case.id] = pr.price(pr.case_for(b.case.run), Path(tmp)).error if moved else cal.price(b).error
    finally:
        fsdp.reduce_bytes, pr.foundry_heads = real, pfr.foundry_heads
    print("\n6. Rows the F3 mappings move (undone -> as shipped)")
    for rid in sorted(now):
        if abs(now[rid] - before[rid]) >= 0.0005:
            print(f"  {rid[:62]:62s} {100 * before[rid]:+6.1f}% -> {100 * now[rid]:+6.1f}%")
    for prefix in ("mpt_llmfoundry_a100_40", "mpt_llmfoundry_a100_80", "mpt_llmfoundry_h100", "mpt_", ""):
        print(f"  {prefix or 'all rows':24s} {_summary(before, prefix)} -> {_summary(now, prefix)}")


def i12b_before_after(built: list[cal.Built]) -> None:
    """Section 10: every row with llm-foundry's fp8 library and head-dim tile rule undone (module docstring)."""
    from autopar.core import gpu

    lib, tile = gpu.STACK_FP8_LIBRARY["llm-foundry"], gpu.POW2_TILE_STACKS
    cases = {"both undone": ("torchao", ()), "fp8 library only": (lib, ()), "tile only": ("torchao", tile),
             "as shipped": (lib, tile)}
    errors: dict[str, dict[str, float]] = {}
    try:
        for name, (fp8, tiles) in cases.items():
            gpu.STACK_FP8_LIBRARY["llm-foundry"], gpu.POW2_TILE_STACKS = fp8, tiles
            for b in built:
                b.cm._cache.clear()
            errors[name] = {b.case.id: cal.price(b).error for b in built}
    finally:
        gpu.STACK_FP8_LIBRARY["llm-foundry"], gpu.POW2_TILE_STACKS = lib, tile
    before, now = errors["both undone"], errors["as shipped"]
    print("\n10. Rows I12b's llm-foundry rules move (both undone -> as shipped)")
    for rid in sorted(now):
        if abs(now[rid] - before[rid]) >= 0.0005:
            print(f"  {rid[:62]:62s} {100 * before[rid]:+6.1f}% -> {100 * now[rid]:+6.1f}%")
    for name, errs in errors.items():
        print(f"  {name:17s} " + "; ".join(f"{p or 'all rows'} {_summary(errs, p)}" for p in ("mpt_", "")))


def _summary(errors: dict[str, float], prefix: str) -> str:
    e = [v for k, v in errors.items() if k.startswith(prefix)]
    return (f"{len(e)} rows mean {100 * statistics.mean(map(abs, e)):.2f}% bias {100 * statistics.mean(e):+.2f}% "
            f"over 15%: {sum(abs(v) > 0.15 for v in e)}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cache", type=Path, help="pickle of the built rows (validate_published.py --cache)")
    ap.add_argument("--f3", action="store_true", help="section 6 only: every row with the F3 mappings undone")
    ap.add_argument("--i12b", action="store_true", help="section 10 only: I12b's llm-foundry rules undone")
    args = ap.parse_args()
    built, _skipped = cal.load_or_build([pr.MODERN_YAML], args.cache)
    if args.f3 or args.i12b:
        (f3_before_after if args.f3 else i12b_before_after)(built)
        return
    rows = [(b, cal.price(b)) for b in built if b.case.source == "llm-foundry"]
    same_work(rows)
    pairs(rows)
    hypothesis(rows)
    zero2_as_fsdp(rows)
    attention_factors(rows)
    two_factors(rows)
    d112_candidate(rows)
    h100_twins(rows)


if __name__ == "__main__":
    main()
