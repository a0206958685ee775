"""Fit the per-GPU-type, per-stack constants (``core.gpu.StackConstants``) on the published runs.

    python benchmarks/calibrate_modern.py [--write] [--cache FILE]

Every row of shared/validation/published_modern.yaml and published_calibration.yaml is built once
as ``autopar estimate`` builds it (``published_rows.build``); the constants of each group are then
fitted by coordinate descent over small grids, re-pricing the group's rows in memory. A group is
one GPU type (Ampere: a100-40g and a100-80g; Hopper: h100-sxm and h200; the same chip with other
memory) and one runtime (torch, megatron, deepspeed): global constants, never one per row. The
objective is the group's mean |error| plus a fifth of its largest |error| (the acceptance bounds
both). ``--write`` stores the result in the ``stacks:`` section of each profile YAML, naming this
command as the source.
"""

from __future__ import annotations

import argparse
import pickle
import statistics
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import published_rows as pr  # noqa: E402

from autopar.core.gpu import StackConstants  # noqa: E402
from autopar.core.strategy import Strategy  # noqa: E402

GPU_TYPE = {"a100-40g": "ampere", "a100-80g": "ampere", "h100-sxm": "hopper", "h100-96g": "hopper", "h200": "hopper"}
PROFILES = {"ampere": ("a100-40g", "a100-80g"), "hopper": ("h100-sxm", "h100-96g", "h200")}
GRIDS = {
    "matmul_scale": [0.7, 0.75, 0.8, 0.85, 0.9, 0.95, 1.0, 1.05, 1.1, 1.15, 1.2, 1.3],
    "fp8_matmul_scale": [0.6, 0.7, 0.8, 0.9, 1.0, 1.1, 1.2, 1.3],
    "attention_scale": [0.3, 0.4, 0.5, 0.6, 0.7, 0.85, 1.0, 1.2, 1.4],
    "tp_overlap": [0.0, 0.3, 0.6, 0.9],
    "moe_imbalance": [1.0, 1.15, 1.3, 1.5, 1.75],
    "zero3_overlap": [0.0, 0.25, 0.5, 0.7, 0.85, 1.0],
    "overlap_slowdown": [0.0, 0.05, 0.1, 0.2, 0.3],
    "inter_node_decay": [0.0, 0.05, 0.1, 0.2, 0.3],
    "step_overhead_s": [0.0, 0.05, 0.1, 0.2, 0.4],
    "zero3_gather_gbps": [0.0, 15.0, 20.0, 25.0, 30.0, 40.0, 60.0],
    "expert_grouped_gemm": [False, True],
    "ep_overlap": [0.0, 0.3, 0.5, 0.6, 0.7, 0.8, 0.9],
}
# DeepSpeed has two published rows: its ZeRO-3 prefetch overlap and gather rate; the rest stays neutral
DEEPSPEED_FIELDS = ("zero3_overlap", "zero3_gather_gbps")
SWEEPS = 2
LAYER_FIELDS = ("matmul_scale", "fp8_matmul_scale", "attention_scale", "tp_overlap", "moe_imbalance",
                "expert_grouped_gemm", "ep_overlap")


@dataclass
class Built:
    case: pr.Case
    cm: object
    strategy: object

    @property
    def group(self) -> tuple[str, str]:
        return GPU_TYPE.get(self.case.gpu, self.case.gpu), self.case.runtime


def build_all(runs: list[dict], workdir: Path) -> tuple[list[Built], list[tuple[str, str]]]:
    """Every row built once: (built rows, [(row id, one-line reason)] for the rows that cannot be priced)."""
    from autopar.errors import InputError

    built, skipped = [], []
    for run in runs:
        try:
            case = pr.case_for(run)
            cm, s = pr.build(case, workdir)
            built.append(Built(case, cm, s))
        except (pr.RowSkip, InputError) as exc:
            skipped.append((run["id"], str(exc).splitlines()[0]))
    return built, skipped


def load_or_build(paths: list[Path], cache: Path | None) -> tuple[list[Built], list[tuple[str, str]]]:
    """``build_all`` over several files, optionally pickled to ``cache`` (rebuilding takes minutes)."""
    if cache and cache.is_file():  # a pickle of several files: keep the rows of ``paths``
        ids = {r["id"] for p in paths for r in pr.load_runs(p)}
        built, skipped = pickle.loads(cache.read_bytes())
        built, skipped = [b for b in built if b.case.id in ids], [s for s in skipped if s[0] in ids]
        stale = []
        for b in built:  # the mapping may have changed since the pickle: re-derive the strategy (cheap)
            case = pr.case_for(b.case.run)
            if _build_key(case) != _build_key(b.case):  # another GPU, runtime, dtype or model: rebuild
                stale.append(b.case.id)
                continue
            b.case, b.strategy = case, Strategy.parse(case.strategy).resolve(b.strategy.world)
            _refresh(b)
        built = [b for b in built if b.case.id not in stale]
        retry = [r for p in paths for r in pr.load_runs(p) if r["id"] in {s[0] for s in skipped} | set(stale)]
        with tempfile.TemporaryDirectory() as tmp:
            more, skipped = build_all(retry, Path(tmp))  # rows the mapping may price now
        if stale and len(paths) > 1:  # keep the rebuilt rows for the next run
            cache.write_bytes(pickle.dumps((built + more, skipped)))
        return built + more, skipped
    runs = [r for p in paths for r in pr.load_runs(p)]
    with tempfile.TemporaryDirectory() as tmp:
        out = build_all(runs, Path(tmp))
    if cache:
        cache.write_bytes(pickle.dumps(out))
    return out


def _refresh(b: Built) -> None:
    """A pickled row keeps its captured layers (the slow part) but prices with the GPU profile as
    it is now (curves, stacks) and forgets its per-layer prices."""
    from autopar.profiles.hw import load_gpu_profile

    gpu = load_gpu_profile(b.case.gpu)
    b.cm.gpu = b.cm.timer.gpu = gpu
    b.cm.timer.__post_init__()
    b.cm.stack = b.cm.timer.stack = gpu.stack(b.case.runtime)
    b.cm._cache.clear()


def _build_key(case: pr.Case) -> tuple:
    """What a built CostModel depends on (the strategy is re-derived from the row)."""
    return case.gpu, case.cluster, case.nodes, case.gpus_per_node, case.seq_len, case.dtype, case.runtime, \
        repr(sorted(case.config.items()))


def price(b: Built, consts: StackConstants | None = None) -> pr.Priced:
    """Re-price one built row under ``consts`` (None: the constants its profile ships)."""
    if consts is not None:
        old = b.cm.stack
        b.cm.stack = b.cm.timer.stack = consts
        if any(getattr(old, f, None) != getattr(consts, f) for f in LAYER_FIELDS):
            b.cm._cache.clear()  # per-layer prices depend on these; the per-step terms are re-derived anyway
    e = b.cm.estimate(b.strategy)
    return pr.Priced(b.case, e.step_time_s, pr.published_step_s(b.case.run, e), e)


def errors(rows: list[Built], consts: StackConstants | None = None) -> list[tuple[float, bool]]:
    """(error, is a published_calibration.yaml row) per priced row."""
    out = []
    for b in rows:
        try:
            out.append((price(b, consts).error, "software" not in b.case.run))
        except pr.RowSkip:
            continue
    return out


def objective(errs: list[tuple[float, bool]]) -> float:
    """Mean |error| + a fifth of the largest, plus a steep penalty where the 18 calibration rows
    (Megatron-LM A100) leave their acceptance band (mean 5%, max 10%)."""
    if not errs:
        return 0.0
    a = [abs(e) for e, _ in errs]
    calib = [abs(e) for e, c in errs if c]
    penalty = 5 * (max(0.0, statistics.mean(calib) - 0.05) + max(0.0, max(calib) - 0.10)) if calib else 0.0
    return statistics.mean(a) + 0.2 * max(a) + penalty


def fields_for(rows: list[Built], runtime: str) -> list[str]:
    """The constants a group's rows can tell apart (fp8 only with fp8 rows, zero3 with FSDP rows...)."""
    if runtime == "deepspeed":
        return list(DEEPSPEED_FIELDS)
    strategies = [b.strategy for b in rows]
    out = ["matmul_scale", "attention_scale", "overlap_slowdown", "step_overhead_s"]
    if any(b.case.dtype == "fp8" for b in rows):
        out.append("fp8_matmul_scale")
    if any(b.cm.spec.is_moe for b in rows):
        out.append("moe_imbalance")
        if runtime != "torch":  # autopar's own programs loop over experts and do not overlap the all-to-alls
            out.append("expert_grouped_gemm")
            out += ["ep_overlap"] if any(s.ep > 1 for s in strategies) else []
    if runtime != "torch" and any(s.tp > 1 for s in strategies):
        out.append("tp_overlap")  # async TP / --tp-comm-overlap; autopar's own torch programs run none
    if any(s.zero_stage >= 3 for s in strategies):
        out.append("zero3_overlap")
    if any(s.world > b.cm.cluster.gpus_per_node for s, b in zip(strategies, rows)):
        out.append("inter_node_decay")
    return out


def fit_group(rows: list[Built], runtime: str, start: StackConstants | None = None) -> StackConstants:
    """Coordinate descent over ``GRIDS`` for the fields the rows can tell apart."""
    best = (start or StackConstants()).model_copy()
    best_obj = objective(errors(rows, best))
    for _ in range(SWEEPS):
        for name in fields_for(rows, runtime):
            for value in GRIDS[name]:
                trial = best.model_copy(update={name: value})
                obj = objective(errors(rows, trial))
                if obj < best_obj - 1e-6:
                    best, best_obj = trial, obj
    return best


def fit(built: list[Built], exclude_source: str | None = None) -> dict[tuple[str, str], StackConstants]:
    """Constants per (GPU type, runtime) from every row except those of ``exclude_source``."""
    rows = [b for b in built if b.case.source != exclude_source]
    groups: dict[tuple[str, str], list[Built]] = {}
    for b in rows:
        groups.setdefault(b.group, []).append(b)
    out = {}
    for key in sorted(groups):
        out[key] = fit_group(groups[key], key[1])
    return out


def apply(built: list[Built], consts: dict[tuple[str, str], StackConstants]) -> list[pr.Priced]:
    """Price every row under the fitted constants of its group (neutral where its group has none)."""
    out = []
    for b in built:
        try:
            out.append(price(b, consts.get(b.group, StackConstants())))
        except pr.RowSkip:
            continue
    return out


def constants_yaml(c: StackConstants, command: str) -> str:
    fields = {k: v for k, v in c.model_dump().items() if k != "sources" and v != StackConstants().model_dump()[k]}
    body = ", ".join(f"{k}: {v}" for k, v in fields.items())
    return f"{{{body}{', ' if body else ''}sources: {{all: \"fitted by `{command}`\"}}}}"


MARKER = "\n# per software stack (--runtime): constants fitted over the published runs of this GPU type"


def write_profiles(consts: dict[tuple[str, str], StackConstants], command: str) -> list[Path]:
    """Replace the ``stacks:`` block at the end of each profile YAML with the fitted constants."""
    root = Path(__file__).resolve().parents[1] / "profiles" / "hardware"
    written = []
    for gtype, names in PROFILES.items():
        lines = [f"  {rt}: {constants_yaml(c, command)}" for (g, rt), c in sorted(consts.items()) if g == gtype]
        for name in names:
            path = root / f"{name}.yaml"
            head = path.read_text().split(MARKER)[0].split("\nstacks:")[0].rstrip("\n")
            block = MARKER + " (docs/validation.md)\nstacks:\n" + "\n".join(lines) + "\n" if lines else "\n"
            path.write_text(head + block)
            written.append(path)
    return written


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--write", action="store_true", help="store the constants in profiles/hardware/*.yaml")
    ap.add_argument("--cache", type=Path, help="pickle of the built rows (reused when present)")
    args = ap.parse_args(argv)
    built, skipped = load_or_build([pr.MODERN_YAML, pr.CALIBRATION_YAML], args.cache)
    consts = fit(built)
    for (g, rt), c in sorted(consts.items()):
        errs = [p.error for p in apply([b for b in built if b.group == (g, rt)], consts)]
        print(f"{g:7s} {rt:9s} rows {len(errs):3d}  mean |err| {100 * statistics.mean(map(abs, errs)):5.1f}%  "
              f"max {100 * max(map(abs, errs)):5.1f}%  {constants_yaml(c, 'python benchmarks/calibrate_modern.py')}")
    by: dict[str, list[float]] = {}
    for p in apply(built, consts):
        by.setdefault(p.case.source, []).append(p.error)
    for src, errs in sorted(by.items()):
        print(f"  {src:22s} rows {len(errs):3d}  mean |err| {100 * statistics.mean(map(abs, errs)):5.1f}%  "
              f"max {100 * max(map(abs, errs)):5.1f}%  bias {100 * statistics.mean(errs):+5.1f}%")
    if args.write:
        for path in write_profiles(consts, "python benchmarks/calibrate_modern.py --write"):
            print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    # run as the importable module, so the --cache pickle names calibrate_modern.Built (which
    # validate_published.py can read back) rather than __main__.Built
    import calibrate_modern

    sys.exit(calibrate_modern.main())
