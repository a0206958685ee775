"""Fit a GPU profile's ``membound_eff`` curve and its eager-launch constants from ``kernel_rates.py`` output and
``gpu_trace.py`` summaries.

    python benchmarks/kernel_rates.py --launch --membound --out rates.json      # on the GPU
    python benchmarks/gpu_trace.py --out DIR                                    # on the GPU: summary-<case>.json
    python benchmarks/fit_kernel_rates.py rates.json --gpu h100-sxm [--trace DIR/summary-moe-mbs1.json]
        [--count-trace DIR/summary-llama-mbs1.json --count-trace DIR/summary-llama-mbs1-full.json] [--write]

``membound_eff``: the physics curve every profile uses, ``eff(x) = 1 / (1/e_max + BW * t0 / x)`` for ``x`` bytes
moved (a kernel takes ``x / (e_max BW) + t0``), fitted to the copy / add / bf16-cast rows (``kind: membound``) by
least squares on the relative error of their times, then tabulated on the profile's grid.

``host_launch_s`` (``cost_models/host_bound.py``): seconds the host spends per kernel launch of an eager training
step. With ``--trace`` (a ``benchmarks/gpu_trace.py`` summary of a host-bound program: kernels busy under the step)
it is the step's seconds over its kernel launches: the program's own Python, hooks and dispatch included. Without
it, the autograd loop of tiny multiplies (``kind: launch``, mode ``autograd``): the framework's floor only, which an
emitted program's modules and FSDP hooks exceed (the H100's trace: 65.5 us per launch where the floor is ~10 us).

``kernels_per_op_call`` and ``backward_launch_ratio`` (``cost_models/host_bound.py``): each traced step's kernel
launches against the captured op calls the cost model counts for its case (``gpu_trace.CASES``, named by the
``summary-<case>.json`` file; ``host_bound.rank_calls``): launches = k (forward calls x (1 + ratio) + re-run calls),
least squares on the relative error over ``--trace`` and every ``--count-trace``. The ratio is fitted only where a
recompute case (``llama-mbs1-full``) separates it from k; otherwise the profile's ratio stays and k alone is fitted.

``--write`` replaces the fitted entries and their ``sources`` lines in ``profiles/hardware/<gpu>.yaml`` (other lines
untouched; written atomically). Bad input: one line naming the field and the fix, exit 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import datetime, timezone
from pathlib import Path

from gpu_trace import CASES, MODELS
from relative_fit import two_factor_fit

from autopar.core.strategy import Strategy
from autopar.cost_models import host_bound
from autopar.cost_models.session import Inputs, build_cost_model
from autopar.errors import InputError
from autopar.fileio import write_atomic
from autopar.profiles.hw import load_gpu_profile

HARDWARE = Path(__file__).resolve().parents[1] / "profiles" / "hardware"
GRID = [1e3, 1e4, 1e5, 1e6, 1e7, 3e7, 1e8, 3e8, 1e9, 3e9, 1e10, 3e10, 1e11, 1e12, 1e13]   # the profiles' x grid


def fit_membound(rows: list[dict], bw_gbps: float) -> tuple[float, float]:
    """(e_max, t0 seconds) of ``t = bytes / (e_max * BW) + t0`` minimising the relative error of each row's time
    (``relative_fit.two_factor_fit`` in (1 / (e_max BW), t0))."""
    pts = [(float(r["bytes"]), float(r["time_s"])) for r in rows if r.get("time_s", 0) > 0]
    if len(pts) < 2:
        raise InputError("FILE: fewer than 2 membound rows with a time; fix: run kernel_rates.py --membound")
    try:
        a, c = two_factor_fit([(x, 1.0, t) for x, t in pts])
    except ValueError:
        raise InputError("FILE: every membound row moves the same bytes; fix: run kernel_rates.py --membound "
                         "with a larger --max-mb") from None
    if c < 0:   # a negative intercept is noise on the large sizes: refit through the origin
        a, c = sum(x / t for x, t in pts) / sum((x / t) ** 2 for x, t in pts), 0.0
    if a <= 0:   # e.g. a CPU's few small rows, the cast slower than the copy
        raise InputError("FILE: membound times do not grow with bytes moved; fix: run kernel_rates.py --membound "
                         "with a larger --max-mb")
    return min(1.0, 1.0 / (a * bw_gbps * 1e9)), c


def curve(e_max: float, t0_s: float, bw_gbps: float) -> list[list[float]]:
    """The fitted curve on ``GRID`` (3 significant digits, as the profiles write it)."""
    return [[x, float(f"{1.0 / (1.0 / e_max + bw_gbps * 1e9 * t0_s / x):.3g}")] for x in GRID]


def host_launch(rows: list[dict], trace: dict | None) -> tuple[float, str]:
    """(seconds per launch, how): a host-bound trace's step / launches, else the autograd loop's floor."""
    if trace is not None:
        step, launches, busy = trace.get("step_time_s"), trace.get("kernel_launches"), trace.get("kernel_busy_ms")
        if not step or not launches:
            raise InputError("--trace: no step_time_s / kernel_launches; fix: pass a gpu_trace.py summary-*.json")
        if busy is not None and busy / 1e3 >= 0.8 * step:   # llama-gpu: 279 of 297 ms; moe-gpu: 201 of 360
            raise InputError(f"--trace: kernels busy {busy:.0f} ms of a {step * 1e3:.0f} ms step: GPU-bound, it does "
                             "not show the host's rate; fix: pass a host-bound case (e.g. summary-moe-mbs1.json)")
        return step / launches, f"gpu_trace.py summary: step {step:.4g} s / {launches} kernel launches"
    auto = [r for r in rows if r.get("kind") == "launch" and r.get("mode") == "autograd"]
    if not auto:
        raise InputError("FILE: no launch rows; fix: run kernel_rates.py --launch (or pass --trace)")
    return auto[0]["host_launch_s"], "kernel_rates.py --launch autograd loop (the framework's floor)"


def traced_calls(summary: Path, profile: Path) -> tuple[float, float]:
    """(forward op calls, re-run op calls) per step the cost model counts for the ``gpu_trace.py`` case a
    ``summary-<case>.json`` names (its model, strategy, seq 4096, global batch 4, bf16, one GPU)."""
    case = summary.stem.removeprefix("summary-")
    if case not in CASES:
        raise InputError(f"--trace: {summary.name} names no gpu_trace.py case; fix: pass the summary-<case>.json it "
                         f"wrote (cases: {', '.join(CASES)})")
    config, strategy = CASES[case]
    cm = build_cost_model(Inputs(model=str(MODELS / config), gpu=str(profile), gpus_per_node=1, seq_len=4096,
                                 dtype="bf16"))[0]
    s = Strategy.parse(strategy, global_batch=4).resolve(cm.cluster.world)
    n = cm.num_layers
    return host_bound.rank_calls(cm, s, list(range(n)), [s.recompute] * n, True, True)


def fit_launch_counts(rows: list[tuple[float, float, float]], ratio: float) -> tuple[float, float | None]:
    """(kernels per op call and pass, backward kernels per forward kernel; None: not separable, ``ratio`` kept)
    from (forward calls, re-run calls, traced launches) rows: weighted least squares of launches = u (F + R) + v F
    (u = k, v = k ratio) on the relative error (``relative_fit.two_factor_fit``); k alone at the given ratio where
    every row has the same R / F."""
    try:
        u, v = two_factor_fit([(f + r, f, n) for f, r, n in rows], tol=1e-6)
    except ValueError:   # one row, or one R / F
        u = v = 0.0
    if u > 0 and v > 0:
        return u, v / u
    c = [(f * (1.0 + ratio) + r) / n for f, r, n in rows]
    return sum(c) / sum(x * x for x in c), None


def launch_counts(summaries: list[Path], gpu_path: Path, ratio: float) -> tuple[float, float | None, str]:
    """(k, fitted ratio or None, how) over the traced cases' kernel launches."""
    rows, named = [], []
    for path in summaries:
        launches = json.loads(path.read_text()).get("kernel_launches")
        if not launches:
            raise InputError(f"--count-trace: {path.name} has no kernel_launches; fix: pass a gpu_trace.py summary")
        rows.append((*traced_calls(path, gpu_path), float(launches)))
        named.append(f"{path.stem.removeprefix('summary-')} {launches} kernels / {rows[-1][0]:.0f} op calls"
                     + (f" + {rows[-1][1]:.0f} re-run" if rows[-1][1] else ""))
    k, fitted = fit_launch_counts(rows, ratio)
    held = f"backward_launch_ratio {fitted:.3g} fitted" if fitted else f"backward_launch_ratio {ratio:g} held"
    return k, fitted, f"gpu_trace.py kernel counts ({'; '.join(named)}), {held}"


def _replace(lines: list[str], prefix: str, new: str, after: str | None = None) -> list[str]:
    """``lines`` with the one starting ``prefix`` replaced by ``new`` (inserted after ``after``'s line if none)."""
    hits = [i for i, ln in enumerate(lines) if ln.startswith(prefix)]
    if hits:
        return lines[:hits[0]] + [new] + lines[hits[0] + 1:]
    at = next((i for i, ln in enumerate(lines) if after and ln.startswith(after)), None)
    if at is None:
        raise InputError(f"--gpu: the profile has no '{prefix.strip()}' nor '{after}' line; fix: add the entry")
    return lines[:at + 1] + [new] + lines[at + 1:]


def write_profile(path: Path, entries: dict[str, tuple[str, str]]) -> None:
    """Replace each ``field: (YAML value, source)`` entry and its ``sources`` line in the profile YAML (a missing
    one inserted after ``membound_eff`` / under ``sources``), other lines untouched."""
    lines = path.read_text().splitlines()
    for field, (value, source) in entries.items():
        lines = _replace(lines, f"{field}:", f"{field}: {value}", after="membound_eff:")
        lines = _replace(lines, f"  {field}:", f"  {field}: " + json.dumps(source), after="sources:")
    text = "\n".join(lines) + "\n"
    load_check = path.with_name(path.stem + ".fitcheck.yaml")
    write_atomic(load_check, text)
    try:
        load_gpu_profile(load_check)   # the written profile must load before it replaces the old one
    finally:
        load_check.unlink(missing_ok=True)
    write_atomic(path, text)


def _profile_path(gpu: str) -> Path:
    path = Path(gpu) if gpu.endswith((".yaml", ".yml")) else HARDWARE / f"{gpu}.yaml"
    if not path.is_file():
        raise InputError(f"--gpu: no profile {path}; fix: name one of profiles/hardware/*.yaml or give a path")
    return path


def run(a: argparse.Namespace) -> dict:
    data = json.loads(Path(a.file).read_text())
    rows, env = data.get("rows", []), data.get("env", {})
    path = _profile_path(a.gpu)
    gpu = load_gpu_profile(path)
    e_max, t0 = fit_membound([r for r in rows if r.get("kind") == "membound"], gpu.mem_bw_gbps)
    trace = json.loads(Path(a.trace).read_text()) if a.trace else None
    launch_s, how = host_launch(rows, trace)
    when = datetime.now(timezone.utc).strftime("%Y-%m-%d")
    counted = [Path(p) for p in ([a.trace] if a.trace else []) + (a.count_trace or [])]
    cmd = f"`python benchmarks/fit_kernel_rates.py {Path(a.file).name} --gpu {a.gpu}" + \
          (f" --trace {Path(a.trace).name}" if a.trace else "") + \
          "".join(f" --count-trace {Path(p).name}" for p in a.count_trace or []) + " --write`"
    on = f"on {env.get('gpu', '?')}, torch {env.get('torch', '?')}, {when}"
    mem_source = (f"physics model fitted to kernel_rates.py --membound (copy / add / fp32->bf16 cast, "
                  f"{len([r for r in rows if r.get('kind') == 'membound'])} rows) by {cmd} {on}: e_max {e_max:.3f} "
                  f"of {gpu.mem_bw_gbps:g} GB/s, t0 {t0 * 1e6:.2f} us")
    out = {"membound_eff": curve(e_max, t0, gpu.mem_bw_gbps), "e_max": e_max, "t0_s": t0, "host_launch_s": launch_s}
    entries = {"membound_eff": (json.dumps(out["membound_eff"]).replace('"', ""), mem_source),
               "host_launch_s": (f"{launch_s:.3g}", f"{how} = {launch_s * 1e6:.1f} us, by {cmd} {on}")}
    if counted:
        k, ratio, how_k = launch_counts(counted, path, host_bound.launch_rates(gpu)[1])
        out["kernels_per_op_call"] = k
        entries["kernels_per_op_call"] = (f"{k:.3g}", f"{how_k}: {k:.3g} kernels per op call and pass, by {cmd} {on}")
        if ratio is not None:
            out["backward_launch_ratio"] = ratio
            entries["backward_launch_ratio"] = (f"{ratio:.3g}", f"{how_k}, by {cmd} {on}")
    out["sources"] = {f: src for f, (_, src) in entries.items()}
    if a.write:
        write_profile(path, entries)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("file", help="kernel_rates.py JSON with membound and launch rows")
    ap.add_argument("--gpu", required=True, help="profile name (profiles/hardware/<gpu>.yaml) or a YAML path")
    ap.add_argument("--trace", help="gpu_trace.py summary-*.json of a host-bound program (host_launch_s from it)")
    ap.add_argument("--count-trace", action="append", help="another gpu_trace.py summary-<case>.json whose kernel "
                    "count joins the kernels_per_op_call fit (repeatable; a recompute case fits the backward ratio)")
    ap.add_argument("--write", action="store_true", help="write the fit into the profile YAML")
    a = ap.parse_args(argv)
    try:
        out = run(a)
    except InputError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return 2
    print(f"membound_eff: e_max {out['e_max']:.3f}, t0 {out['t0_s'] * 1e6:.2f} us; "
          f"host_launch_s {out['host_launch_s'] * 1e6:.1f} us"
          + "".join(f"; {f} {out[f]:.3g}" for f in ("kernels_per_op_call", "backward_launch_ratio") if f in out)
          + (" (written)" if a.write else ""))
    print(json.dumps(out["membound_eff"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
