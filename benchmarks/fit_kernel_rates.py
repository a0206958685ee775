"""Fit a GPU profile's ``membound_eff`` curve and ``host_launch_s`` from ``benchmarks/kernel_rates.py`` output.

    python benchmarks/kernel_rates.py --launch --membound --out rates.json      # on the GPU
    python benchmarks/fit_kernel_rates.py rates.json --gpu h100-sxm [--trace summary-moe-mbs1.json] [--write]

``membound_eff``: the physics curve every profile uses, ``eff(x) = 1 / (1/e_max + BW * t0 / x)`` for ``x`` bytes
moved (a kernel takes ``x / (e_max BW) + t0``), fitted to the copy / add / bf16-cast rows (``kind: membound``) by
least squares on the relative error of their times, then tabulated on the profile's grid.

``host_launch_s`` (``cost_models/host_bound.py``): seconds the host spends per kernel launch of an eager training
step. With ``--trace`` (a ``benchmarks/gpu_trace.py`` summary of a host-bound program: kernels busy under the step)
it is the step's seconds over its kernel launches: the program's own Python, hooks and dispatch included. Without
it, the autograd loop of tiny multiplies (``kind: launch``, mode ``autograd``): the framework's floor only, which an
emitted program's modules and FSDP hooks exceed (the H100's trace: 65.5 us per launch where the floor is ~10 us).

``--write`` replaces the two entries and their ``sources`` lines in ``profiles/hardware/<gpu>.yaml`` (other lines
untouched; written atomically). Bad input: one line naming the field and the fix, exit 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import datetime, timezone
from pathlib import Path

from autopar.errors import InputError
from autopar.fileio import write_atomic
from autopar.profiles.hw import load_gpu_profile

HARDWARE = Path(__file__).resolve().parents[1] / "profiles" / "hardware"
GRID = [1e3, 1e4, 1e5, 1e6, 1e7, 3e7, 1e8, 3e8, 1e9, 3e9, 1e10, 3e10, 1e11, 1e12, 1e13]   # the profiles' x grid


def fit_membound(rows: list[dict], bw_gbps: float) -> tuple[float, float]:
    """(e_max, t0 seconds) of ``t = bytes / (e_max * BW) + t0`` minimising the relative error of each row's time
    (weighted linear least squares in (1 / (e_max BW), t0))."""
    pts = [(float(r["bytes"]), float(r["time_s"])) for r in rows if r.get("time_s", 0) > 0]
    if len(pts) < 2:
        raise InputError("FILE: fewer than 2 membound rows with a time; fix: run kernel_rates.py --membound")
    # rows of the weighted system: [x/t, 1/t] . [a, c] = 1
    sxx = sum((x / t) ** 2 for x, t in pts)
    sx1 = sum(x / t / t for x, t in pts)
    s11 = sum(1 / t / t for _, t in pts)
    bx, b1 = sum(x / t for x, t in pts), sum(1 / t for _, t in pts)
    det = sxx * s11 - sx1 * sx1
    a, c = (bx * s11 - b1 * sx1) / det, (sxx * b1 - sx1 * bx) / det
    if c < 0:   # a negative intercept is noise on the large sizes: refit through the origin
        a, c = bx / sxx, 0.0
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


def _replace(lines: list[str], prefix: str, new: str, after: str | None = None) -> list[str]:
    """``lines`` with the one starting ``prefix`` replaced by ``new`` (inserted after ``after``'s line if none)."""
    hits = [i for i, ln in enumerate(lines) if ln.startswith(prefix)]
    if hits:
        return lines[:hits[0]] + [new] + lines[hits[0] + 1:]
    at = next((i for i, ln in enumerate(lines) if after and ln.startswith(after)), None)
    if at is None:
        raise InputError(f"--gpu: the profile has no '{prefix.strip()}' nor '{after}' line; fix: add the entry")
    return lines[:at + 1] + [new] + lines[at + 1:]


def write_profile(path: Path, pts: list[list[float]], mem_source: str, launch_s: float, launch_source: str) -> None:
    """Replace ``membound_eff`` / ``host_launch_s`` and their sources in the profile YAML, other lines untouched."""
    lines = path.read_text().splitlines()
    lines = _replace(lines, "membound_eff:", "membound_eff: " + json.dumps(pts).replace('"', ""))
    lines = _replace(lines, "host_launch_s:", f"host_launch_s: {launch_s:.3g}", after="membound_eff:")
    lines = _replace(lines, "  membound_eff:", "  membound_eff: " + json.dumps(mem_source), after="sources:")
    lines = _replace(lines, "  host_launch_s:", "  host_launch_s: " + json.dumps(launch_source), after="sources:")
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
    cmd = f"`python benchmarks/fit_kernel_rates.py {Path(a.file).name} --gpu {a.gpu}" + \
          (f" --trace {Path(a.trace).name}" if a.trace else "") + " --write`"
    on = f"on {env.get('gpu', '?')}, torch {env.get('torch', '?')}, {when}"
    mem_source = (f"physics model fitted to kernel_rates.py --membound (copy / add / fp32->bf16 cast, "
                  f"{len([r for r in rows if r.get('kind') == 'membound'])} rows) by {cmd} {on}: e_max {e_max:.3f} "
                  f"of {gpu.mem_bw_gbps:g} GB/s, t0 {t0 * 1e6:.2f} us")
    launch_source = f"{how} = {launch_s * 1e6:.1f} us, by {cmd} {on}"
    out = {"membound_eff": curve(e_max, t0, gpu.mem_bw_gbps), "e_max": e_max, "t0_s": t0,
           "host_launch_s": launch_s, "sources": {"membound_eff": mem_source, "host_launch_s": launch_source}}
    if a.write:
        write_profile(path, out["membound_eff"], mem_source, launch_s, launch_source)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("file", help="kernel_rates.py JSON with membound and launch rows")
    ap.add_argument("--gpu", required=True, help="profile name (profiles/hardware/<gpu>.yaml) or a YAML path")
    ap.add_argument("--trace", help="gpu_trace.py summary-*.json of a host-bound program (host_launch_s from it)")
    ap.add_argument("--write", action="store_true", help="write the fit into the profile YAML")
    a = ap.parse_args(argv)
    try:
        out = run(a)
    except InputError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return 2
    print(f"membound_eff: e_max {out['e_max']:.3f}, t0 {out['t0_s'] * 1e6:.2f} us; "
          f"host_launch_s {out['host_launch_s'] * 1e6:.1f} us" + (" (written)" if a.write else ""))
    print(json.dumps(out["membound_eff"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
