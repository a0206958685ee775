"""Price every published run of a file through the path ``autopar estimate`` uses and compare with
what the run measured: per-row and per-source errors, the fitted constants, leave-one-source-out.

    python benchmarks/validate_published.py [FILE] [--markdown] [--loso] [--by-feature] [--cache PICKLE]

FILE defaults to shared/validation/published_calibration.yaml (18 Megatron-LM A100 rows); the
modern set is shared/validation/published_modern.yaml. Rows are mapped to autopar inputs by
``benchmarks/published_rows.py`` (model config, GPU, cluster, dtype, --runtime, strategy; a row
that cannot be priced gets a one-line reason). Error = predicted throughput / published - 1 in
the source's own FLOP convention (see published_rows). The constants are those the hardware
profiles ship (``stacks:``, fitted by ``benchmarks/calibrate_modern.py``); ``--loso`` refits them
without each source in turn (on every other row of the file and of published_calibration.yaml)
and predicts that source.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import calibrate_modern as cal  # noqa: E402
import published_rows as pr  # noqa: E402
import validate_memory as vm  # noqa: E402

from autopar.profiles.hw import load_gpu_profile  # noqa: E402

DEFAULT_YAML = pr.CALIBRATION_YAML


def predict(run: dict, workdir: Path) -> tuple[str, float, float, object]:
    """(metric, predicted, published, estimate) for one row, in step-time terms (calibrate_a100.py)."""
    p = pr.price(pr.case_for(run), workdir)
    return "step time s", p.pred_step_s, p.pub_step_s, p.estimate


def summary(priced: list[pr.Priced]) -> dict[str, tuple[int, float, float, float]]:
    """source -> (rows, mean |error|, max |error|, mean signed error)."""
    by: dict[str, list[float]] = {}
    for p in priced:
        by.setdefault(p.case.source, []).append(p.error)
    return {k: (len(v), statistics.mean(map(abs, v)), max(map(abs, v)), statistics.mean(v)) for k, v in by.items()}


def memory_errors(priced: list[pr.Priced]) -> dict[str, float]:
    """Predicted / published peak memory - 1 for the rows that publish ``measured.memory_gib``, priced
    as ``benchmarks/validate_memory.py`` prices them (its mapping: compile, loss_parallel, pipeline
    micro-batches; reserved bytes against ``max_memory_reserved``)."""
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for p in priced:
            if (p.case.run.get("measured") or {}).get("memory_gib") is not None:
                out[p.case.id] = vm.price_memory(p.case.run, Path(tmp))["err"]
    return out


def print_rows(priced: list[pr.Priced], markdown: bool) -> None:
    mem = memory_errors(priced)
    if markdown:
        print("| run | stack | dtype | strategy | predicted tok/s/GPU | published | error | memory error |")
        print("|---|---|---|---|---|---|---|---|")
    for p in priced:
        c, world = p.case, p.estimate.world
        pred, pub = p.estimate.tokens / p.pred_step_s / world, p.estimate.tokens / p.pub_step_s / world
        mem_err = f"{100 * mem[c.id]:+.1f}%" if c.id in mem else ""
        if markdown:
            print(f"| {c.id} | {c.stack} | {c.dtype} | `{c.strategy}` | {pred:,.0f} | {pub:,.0f} | "
                  f"{100 * p.error:+.1f}% | {mem_err} |")
        else:
            print(f"{c.id[:56]:56s} {c.stack:11s} {c.dtype:4s} pred {pred:9.0f} pub {pub:9.0f} "
                  f"err {100 * p.error:+6.1f}%" + (f"  mem err {mem_err}" if mem_err else ""))


def print_summary(priced: list[pr.Priced], skipped: list[tuple[str, str]], title: str) -> None:
    print(f"\n{title}")
    print(f"{'source':22s} {'rows':>4s} {'mean|err|':>9s} {'max|err|':>8s} {'bias':>7s}")
    for src, (n, mean, worst, bias) in sorted(summary(priced).items()):
        print(f"{src:22s} {n:4d} {100 * mean:8.1f}% {100 * worst:7.1f}% {100 * bias:+6.1f}%")
    errs = [abs(p.error) for p in priced]
    if errs:
        print(f"{'all':22s} {len(errs):4d} {100 * statistics.mean(errs):8.1f}% {100 * max(errs):7.1f}%   "
              f"over 15%: {sum(e > 0.15 for e in errs)}  not priced: {len(skipped)}")
    for rid, why in skipped:
        print(f"not priced: {rid}: {why}")


def _pow_bin(x: float, base: int) -> str:
    """The power of ``base`` bin of ``x`` ("<=base^k"), so a feature spanning decades reads in a few bins."""
    k = 0
    while base ** k < x:
        k += 1
    return f"<={base ** k:g}"


# Row features the errors are binned by (``--by-feature``): what the strategy, the model and the step hold.
FEATURES = {
    "recompute": lambda p: p.estimate.strategy.recompute,
    "seq len": lambda p: _pow_bin(p.case.seq_len, 4),
    "tokens/micro-batch": lambda p: _pow_bin(p.case.seq_len * p.estimate.strategy.micro_batch, 4),
    "micro-batches": lambda p: _pow_bin(p.estimate.strategy.num_micro_batches, 4),
    "GPUs": lambda p: _pow_bin(p.estimate.world, 8),
    "model GFLOP/token": lambda p: _pow_bin(p.estimate.model_flops / p.estimate.tokens / 1e9, 4),
    "pp x vpp": lambda p: f"{p.estimate.strategy.pp}x{p.estimate.strategy.vpp}",
    "ep x etp": lambda p: f"{p.estimate.strategy.ep}x{p.estimate.strategy.etp}",
}


def feature_table(priced: list[pr.Priced]) -> dict[tuple[str, str], dict[str, list[float]]]:
    """(source, GPU) -> feature -> bin -> the rows' signed errors: a pattern by feature inside one source and GPU
    type (one table of one stack) is physics or mapping the shared constants cannot carry; one row alone is not."""
    out: dict[tuple[str, str], dict[str, dict[str, list[float]]]] = {}
    for p in priced:
        group = out.setdefault((p.case.source, p.case.gpu), {})
        for name, of in FEATURES.items():
            group.setdefault(name, {}).setdefault(of(p), []).append(p.error)
    return out


def print_features(priced: list[pr.Priced], min_rows: int = 5) -> None:
    """``--by-feature``: per source and GPU type (``min_rows`` rows or more), each feature's bins as
    ``bin: rows mean-signed-error``; features with one bin are left out."""
    print("\nsigned error by feature (source, GPU type; bin: rows, mean signed error, max |error|)")
    for (src, gpu), feats in sorted(feature_table(priced).items()):
        if sum(len(v) for v in next(iter(feats.values())).values()) < min_rows:
            continue
        print(f"{src} {gpu}")
        for name, bins in feats.items():
            if len(bins) > 1:
                cells = "  ".join(f"{b}: {len(e)} {100 * statistics.mean(e):+.1f}% ({100 * max(map(abs, e)):.0f})"
                                  for b, e in sorted(bins.items(), key=lambda kv: _bin_order(kv[0])))
                print(f"  {name:18s} {cells}")


def _bin_order(label: str) -> tuple:
    """Numeric bins in value order ("<=16" before "<=256", "2x12" by pp then vpp), the others by name."""
    nums = [float(x) for x in label.lstrip("<=").split("x") if x.replace(".", "", 1).isdigit()]
    return (0, nums) if nums else (1, label)


def print_constants(built: list[cal.Built]) -> None:
    print("\nconstants the profiles ship (GPU type, runtime):")
    seen = set()
    for b in built:
        key = (b.case.gpu, b.case.runtime)
        if key not in seen:
            seen.add(key)
            shipped = load_gpu_profile(key[0]).stack(key[1])
            print(f"  {key[0]:9s} {key[1]:9s} {cal.constants_yaml(shipped, 'python benchmarks/calibrate_modern.py')}")


def loso(built: list[cal.Built], anchor: list[cal.Built], stand_in: bool = False,
         one_level: bool = False) -> list[pr.Priced]:
    """Each source predicted with constants fitted on every other source (and the anchor rows): the
    hardware level of its GPU types refitted without it, stack choices from the other sources of
    that stack. A stack only the left-out source runs on a GPU type inherits the refitted hardware
    level with neutral stack choices, or with ``stand_in`` the choices of the GPU type's largest
    other stack (as a user with no run of that stack might). ``one_level``: every constant fitted per
    stack (the scheme before the two levels), such a stack priced neutral."""
    out = []
    for src in sorted({b.case.source for b in built}):
        mine = [b for b in built if b.case.source == src]
        types = {b.group[0] for b in mine}  # only the GPU types holding this source change when it is left out
        refit = cal.fit([b for b in built + anchor if b.group[0] in types], exclude_source=src, one_level=one_level)
        if stand_in:
            for key in {b.group for b in mine} - set(refit.stacks):
                _stand_in(key, refit, built + anchor, src)
        out += cal.apply(mine, refit)
    return out


def _stand_in(key: tuple[str, str], refit: cal.Fitted, rows: list[cal.Built], src: str) -> None:
    """Give ``key`` the stack entry of the same GPU type's largest other fitted stack (rows of ``src`` not counted)."""
    sizes: dict[tuple[str, str], int] = {}
    for b in rows:
        if b.case.source != src:
            sizes[b.group] = sizes.get(b.group, 0) + 1
    others = [k for k in refit.stacks if k[0] == key[0] and k != key]
    if others:
        refit.stacks[key] = refit.stacks[max(others, key=lambda k: sizes.get(k, 0))]


def zero3_excess(built: list[cal.Built]) -> None:
    """``--zero3-excess``: for each DeepSpeed ZeRO-3 row, the seconds per step its published time leaves
    beyond the price with NCCL's ring model and nothing hidden (``zero3_gather_gbps`` 0, ``zero3_overlap``
    0), beside the ring's hop latency per all-gather ((n - nodes) NVLink + (nodes - 1) network hops,
    ``comm.multinode_ring_time``). A per-call latency (gathers issued parameter by parameter) would make
    the excess grow with the hop latency; bytes at a rate below the ring's keep it flat."""
    for b in built:
        if b.case.runtime != "deepspeed":
            continue
        c = load_gpu_profile(b.case.gpu).stack("deepspeed").model_copy(update={"zero3_gather_gbps": 0.0,
                                                                             "zero3_overlap": 0.0})
        p, n, cl = cal.price(b, c), b.strategy.dp, b.cm.cluster
        nodes = max(1, n // cl.gpus_per_node)
        hops_s = (n - nodes) * cl.intra_node.latency_s + (nodes - 1) * cl.inter_node.latency_s
        print(f"{b.case.id[:48]:48s} dp {n:5d}  published {p.pub_step_s:6.1f} s  ring, nothing hidden "
              f"{p.pred_step_s:6.1f} s  excess {p.pub_step_s - p.pred_step_s:5.1f} s  "
              f"ring hop latency per gather {1e3 * hops_s:.2f} ms")
    _rate_elsewhere(built)


def _rate_elsewhere(built: list[cal.Built]) -> None:
    """Whether DeepSpeed's fitted ZeRO-3 gather rate is physics other stacks share: the other ZeRO-3
    rows across nodes on the same GPU types, priced with the ring model and with that rate."""
    ds = {b.case.gpu: load_gpu_profile(b.case.gpu).stack("deepspeed").zero3_gather_gbps
          for b in built if b.case.runtime == "deepspeed"}
    gtypes = {cal.GPU_TYPE.get(g, g) for g in ds}
    rows = [b for b in built if b.group[0] in gtypes and b.case.runtime != "deepspeed"
            and b.strategy.zero_stage >= 3 and b.strategy.world > b.cm.cluster.gpus_per_node]
    rate = max(ds.values(), default=0.0)
    if not rows or not rate:
        return
    for cap in (0.0, rate):
        errs = [cal.price(b, load_gpu_profile(b.case.gpu).stack(b.case.runtime).model_copy(
            update={"zero3_gather_gbps": cap})).error for b in rows]
        how = "ring model" if not cap else f"at {cap:g} GB/s"
        print(f"other ZeRO-3 rows across nodes ({len(rows)}, {', '.join(sorted({b.case.source for b in rows}))}) "
              f"{how}: mean |err| {100 * statistics.mean(map(abs, errs)):.1f}%  "
              f"bias {100 * statistics.mean(errs):+.1f}%  max {100 * max(map(abs, errs)):.1f}%")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("file", nargs="?", type=Path, default=None)
    ap.add_argument("--yaml", type=Path, default=None, help="same as FILE")
    ap.add_argument("--markdown", action="store_true", help="per-row markdown table")
    ap.add_argument("--by-feature", action="store_true", help="signed errors binned by feature per source and GPU")
    ap.add_argument("--loso", action="store_true", help="leave-one-source-out: refit without each source")
    ap.add_argument("--cache", type=Path, help="pickle of the built rows (reused when present)")
    ap.add_argument("--sweeps", type=int, default=cal.SWEEPS, help="coordinate-descent sweeps of each --loso refit")
    ap.add_argument("--stand-in", action="store_true", help="--loso: a stack no other source runs on that GPU "
                                                            "type takes the choices of its largest other stack")
    ap.add_argument("--one-level", action="store_true", help="--loso with every constant fitted per stack (the "
                                                             "scheme before the two levels, for comparison)")
    ap.add_argument("--zero3-excess", action="store_true", help="DeepSpeed ZeRO-3 rows: the time the ring model "
                                                                "leaves unexplained against the ring's hop latency")
    ap.add_argument("--cap-scales", action="store_true", help="--loso refits with GEMM and attention scales at "
                                                             "most 1 (calibrate_modern.cap_scales)")
    ap.add_argument("--no-bounds", action="store_true", help="--loso refits without calibrate_modern.BOUNDS")
    cal.fit_flags(ap)
    args = ap.parse_args(argv)
    cal.SWEEPS = args.sweeps
    cal.set_fit_options(args.objective, args.no_bounds, args.cap_scales, **cal.fit_options(args))
    path = args.file or args.yaml or DEFAULT_YAML
    built, skipped = cal.load_or_build([path], args.cache)
    priced = _shipped(built)
    print_rows(priced, args.markdown)
    print_summary(priced, skipped, f"{path.name}: constants as shipped")
    if args.by_feature:
        print_features(priced)
    print_constants(built)
    if args.zero3_excess:
        print("\nZeRO-3 time the ring model leaves (DeepSpeed rows):")
        zero3_excess(built)
    if args.loso:
        anchor = [] if path == DEFAULT_YAML else cal.load_or_build([DEFAULT_YAML], args.cache)[0]
        title = f"{path.name}: leave-one-source-out (refit without each source{', stand-in' * args.stand_in})"
        title += ", one level" * args.one_level
        print_summary(loso(built, anchor, args.stand_in, args.one_level), skipped, title)
    return 0


def _shipped(built: list[cal.Built]) -> list[pr.Priced]:
    out = []
    for b in built:
        try:
            out.append(cal.price(b, load_gpu_profile(b.case.gpu).stack(b.case.runtime)))  # as the YAML ships
        except pr.RowSkip:
            continue
    return out


if __name__ == "__main__":
    sys.exit(main())
