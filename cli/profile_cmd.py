"""`autopar profile MODEL` and `autopar profile-comm --nproc N`: measure this machine.

Both write atomically (``fileio.write_atomic``): an interrupted run leaves the previous file as
it was. Progress shows as a live line on a terminal and as plain timestamped lines otherwise.
"""

from __future__ import annotations

import datetime
import json
import shlex
import sys
import time
from pathlib import Path
from typing import Optional

import typer
import yaml
from rich.console import Console
from rich.table import Table

from autopar.cli import common as c
from autopar.cli import paths
from autopar.cli.app import app
from autopar.core.gpu import GpuProfile
from autopar.errors import InputError
from autopar.fileio import write_atomic
from autopar.profiles.intake import resolve_model


class Progress:
    """Log sink: a transient status line on a terminal, plain lines with elapsed seconds otherwise;
    ``keep`` lines are printed in both cases."""

    def __init__(self, console: Console):
        self.console, self.t0 = console, time.perf_counter()
        self.live = console.is_terminal
        self.status = console.status("starting") if self.live else None

    def __enter__(self):
        if self.status:
            self.status.__enter__()
        return self

    def __exit__(self, *exc):
        if self.status:
            self.status.__exit__(*exc)

    def __call__(self, msg: str, keep: bool | None = None) -> None:
        keep = keep if keep is not None else msg.split(" ", 1)[0] not in ("matmul", "membound", "attention")
        stamp = f"[{time.perf_counter() - self.t0:6.1f}s]"
        if not self.live:
            print(f"{stamp} {msg}", flush=True)
            return
        self.status.update(f"{stamp} {msg}")
        if keep:
            self.console.print(f"{stamp} {msg}", highlight=False)


def _console() -> Console:
    """A terminal console, or a wide one for logs (signatures are long; no wrapping mid-line)."""
    return Console() if sys.stdout.isatty() else Console(width=200)


def _command() -> str:
    return "autopar " + " ".join(shlex.quote(a) for a in sys.argv[1:]) if sys.argv else "autopar profile"


@app.command("profile")
def profile_command(
    model: str = typer.Argument(..., help="preset name, config.json path, or pkg.mod:fn factory"),
    device: str = typer.Option("cpu", "--device", help="cpu | cuda (cuda:N)"),
    dtype: Optional[str] = typer.Option(None, "--dtype", help="fp32 | bf16 | fp16 (default fp32 on cpu, bf16 on cuda)"),
    seq_len: Optional[int] = typer.Option(None, "--seq-len", min=1,
                                          help="sequence length (default: the model's, <= 4096)"),
    micro_batch: int = typer.Option(1, "--micro-batch", min=1, help="sequences per micro-batch (the cost model's "
                                                              "templates are captured at 1)"),
    threads: int = typer.Option(1, "--threads", min=1,
                                help="torch threads (CPU); generated CPU programs use 1 per rank"),
    budget_s: float = typer.Option(75.0, "--budget-s", min=0.001, help="wall-clock seconds for timing ops and sweeps"),
    out: Optional[Path] = typer.Option(None, "--out", callback=paths.out_file,
                                         help="profile JSON to write (default profile-<name>.json)"),
    name: Optional[str] = typer.Option(None, "--name", help="profile name (default: the --out file stem)"),
    alias: list[str] = typer.Option([], "--alias", help="extra name load_gpu_profile accepts (repeatable)"),
    extend: bool = typer.Option(False, "--extend", help="keep the measured ops already in --out (other models)"),
    input_shape: Optional[str] = c.InputShape,
    input_dtype: str = c.InputDtype,
    hf: bool = c.Hf,
):
    """Time every distinct op of MODEL forward and backward on this device and fit its efficiency curves."""
    from autopar.cost_models.session import default_seq_len
    from autopar.profiles.profiler import profile_device

    if budget_s <= 0 or threads < 1 or micro_batch < 1:
        raise InputError("--budget-s, --threads and --micro-batch must be positive")
    if not all(a.strip() for a in alias):
        raise InputError("--alias: an empty name; fix: a name --gpu will accept, e.g. --alias my-gpu")
    dtype = dtype or ("fp32" if device == "cpu" else "bf16")
    name = name or (out.stem if out else ("cpu" if device == "cpu" else "cuda"))
    out = out or Path(f"profile-{name}.json")
    if input_dtype not in c.INPUT_DTYPES:
        raise InputError(f"--input-dtype={input_dtype} is not one of {', '.join(c.INPUT_DTYPES)}")
    spec = resolve_model(c.hf_model(model, hf), input_shape=c._shape(input_shape), input_dtype=input_dtype)
    seq = seq_len or default_seq_len(spec)
    console = _console()
    with Progress(console) as log:
        run = profile_device(spec, seq, micro_batch, dtype, device, threads, budget_s, name, _command(), log)
    prof = _merge_previous(run.profile, out, alias, extend)
    GpuProfile.model_validate(prof)  # never write a file load_gpu_profile would refuse
    write_atomic(out, json.dumps(prof, indent=1) + "\n")
    _print_ops(console, run)
    console.print(f"wrote {out}: {len(prof['measured_ops'])} measured ops, peak "
                  f"{next(iter(prof['peak_tflops'].values())):.3f} TFLOP/s, {prof['mem_bw_gbps']:.1f} GB/s, "
                  f"in {run.wall_s:.1f} s", highlight=False)


def _merge_previous(prof: dict, out: Path, alias: list[str], extend: bool) -> dict:
    """Carry over from the file being replaced: its aliases and collective fits (they describe
    the interconnect, not the ops), and with ``extend`` its measured ops and timed points (the
    peaks and curves are refitted over both runs' points: ``profiler.refit``)."""
    from autopar.profiles.profiler import refit

    old = {}
    if out.is_file():
        try:
            old = json.loads(out.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise InputError(f"--out: {out} exists and is not a profile JSON; remove it or pick another path") from None
    prof["aliases"] = sorted(set(old.get("aliases", [])) | set(alias))
    if old.get("comm_fits"):
        prof["comm_fits"] = old["comm_fits"]
        prof["meta"]["comm"] = old.get("meta", {}).get("comm", {})
    if extend and old.get("measured_ops"):
        prof = refit(prof, old)  # the best peak of both runs; curves through both models' points
        prof["measured_ops"] = {**old["measured_ops"], **prof["measured_ops"]}
        models = old.get("meta", {}).get("models", [old.get("meta", {}).get("model")])
        prof["meta"]["models"] = sorted({m for m in models if m} | {prof["meta"]["model"]})
    return prof


def _print_ops(console: Console, run) -> None:
    t = Table(title="measured ops (one row per distinct signature)", show_edge=False)
    for col in ("op signature", "in model", "fwd", "bwd", "spread"):
        t.add_column(col, justify="left" if col == "op signature" else "right")
    for sig, n, fwd, bwd, spread in run.op_rows:
        t.add_row(sig, f"x{n}", _us(fwd), _us(bwd), f"{100 * spread:.1f}%")
    console.print(t)
    for line in run.lines:
        console.print(line, highlight=False)


def _us(x: float) -> str:
    return f"{x * 1e3:.2f} ms" if x >= 1e-3 else f"{x * 1e6:.1f} us"


# ----- profile-comm ------------------------------------------------------------------------
@app.command("profile-comm")
def profile_comm_command(
    nproc: int = typer.Option(..., "--nproc", min=2, help="local ranks to start (2 or more)"),
    backend: str = typer.Option("gloo", "--backend", help="gloo (CPU) | nccl (one GPU per rank)"),
    budget_s: float = typer.Option(60.0, "--budget-s", min=0.001,
                                   help="seconds of measurement (start-up not included)"),
    max_mib: float = typer.Option(256.0, "--max-mib", min=0.001, help="largest message in MiB"),
    out: Path = typer.Option(Path("cluster-local.yaml"), "--out", callback=paths.out_file,
                                   help="cluster YAML to write (link classes)"),
    name: Optional[str] = typer.Option(None, "--name", help="cluster name (default: --out stem without "
                                                             "'cluster-')"),
    gpu: str = typer.Option("cpu", "--gpu", help="hardware profile the cluster file names"),
    profile: Optional[Path] = typer.Option(None, "--profile", help="measured device profile JSON to store the "
                                                                    "collective fits in (what --profile reads)"),
    json_out: bool = typer.Option(False, "--json", help="print the fits as JSON"),
):
    """Measure all_reduce, all_gather, reduce_scatter, all_to_all and send/recv between local ranks; fit alpha-beta."""
    from autopar.profiles.comm_profiler import profile_comm

    _check_comm_args(nproc, backend, budget_s, max_mib, profile, gpu)
    console = _console()
    with Progress(console) as log:
        try:
            run = profile_comm(nproc, backend, budget_s, int(max_mib * 2**20), lambda m: log(m, keep=False))
        except RuntimeError as exc:
            raise InputError(str(exc)) from None
    how = f"measured by `{_command()}`, {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}"
    cluster_name = name or out.stem.removeprefix("cluster-")
    write_atomic(out, _cluster_yaml(run, cluster_name, gpu, how))
    if profile is not None:
        _store_fits(profile, run, how)
    if json_out:
        print(json.dumps(_fits_json(run), indent=2))
        return
    _print_fits(console, run)
    console.print(f"wrote {out}" + (f" and the fits into {profile}" if profile else "") +
                  f" in {run.wall_s:.1f} s", highlight=False)


def _check_comm_args(nproc: int, backend: str, budget_s: float, max_mib: float, profile: Optional[Path],
                     gpu: str) -> None:
    if nproc < 2:
        raise InputError(f"--nproc={nproc}: collectives need at least 2 ranks")
    if backend not in ("gloo", "nccl"):
        raise InputError(f"--backend: '{backend}' is not gloo or nccl")
    if budget_s <= 0 or max_mib * 2**20 < 1024:
        raise InputError("--budget-s must be positive and --max-mib at least 1/1024 (1 KiB)")
    if backend == "nccl":
        import torch

        if torch.cuda.device_count() < nproc:
            raise InputError(f"--backend nccl needs one GPU per rank: {torch.cuda.device_count()} GPUs for "
                             f"--nproc={nproc}; use fewer ranks or --backend gloo")
    if profile is not None and not profile.is_file():
        raise InputError(f"--profile: {profile} does not exist; write it first with `autopar profile MODEL`")
    from autopar.profiles.hw import load_gpu_profile

    load_gpu_profile(gpu)  # the cluster file names it: an unknown name would fail only where the file is read


def _cluster_yaml(run, name: str, gpu: str, how: str) -> str:
    from autopar.profiles.comm_profiler import link_class

    intra = link_class(run.fits, run.nproc, how)
    if not intra:
        raise InputError("profile-comm: no all_reduce fit (budget too small?); raise --budget-s")
    inter = _inter_node(intra)
    data = {"name": name, "description": f"one machine, {run.nproc} local ranks over {run.backend}; {how}",
            "gpu": gpu, "nodes": 1, "gpus_per_node": run.nproc, "intra_node": intra, "inter_node": inter}
    header = (f"# {how}.\n# intra_node: ring all-reduce model fitted to the all_reduce of {run.nproc} ranks; "
              "the per-collective fits live in the device profile (comm_fits).\n")
    return header + yaml.safe_dump(data, sort_keys=False)


def _inter_node(intra: dict) -> dict:
    """Not measured (one machine): 10 GbE, but never faster than half the measured loopback
    (a network hop adds to what the local ranks already pay)."""
    bw = min(1.1, intra["bw_gbps"] / 2)
    return {"bw_gbps": float(f"{bw:.4g}"), "latency_s": max(5e-5, 2 * intra["latency_s"]),
            "source": "NOT MEASURED (profile-comm runs on one machine): 10 GbE (~1.1 GB/s achievable, 50 us), "
                      "capped at half the measured intra-node bandwidth and at least twice its latency"}


def _store_fits(path: Path, run, how: str) -> None:
    from autopar.profiles.comm_profiler import fit_rows

    data = json.loads(path.read_text())
    data["comm_fits"] = fit_rows(run)
    data.setdefault("meta", {})["comm"] = {"how": how, "backend": run.backend, "nproc": run.nproc,
                                           "held_out": _fits_json(run)}
    data.setdefault("sources", {})["comm_fits"] = f"alpha-beta fits (relative least squares), {how}"
    GpuProfile.model_validate(data)
    write_atomic(path, json.dumps(data, indent=1) + "\n")


def _fits_json(run) -> list[dict]:
    return [{"kind": f.kind, "group": f.group, "alpha_s": f.alpha_s, "beta_s_per_byte": f.beta_s_per_byte,
             "r2": f.r2, "points": f.points, "held_out_bytes": f.held_out_bytes,
             "held_out_error": f.held_out_error} for f in run.fits]


def _print_fits(console: Console, run) -> None:
    t = Table(title=f"collective fits: time = alpha + S / bw ({run.nproc} ranks, {run.backend})", show_edge=False)
    for col in ("kind", "ranks", "alpha", "bw GB/s", "r2", "sizes", "held-out size", "held-out error"):
        t.add_column(col, justify="left" if col == "kind" else "right")
    for f in run.fits:
        bw = f"{1 / f.beta_s_per_byte / 1e9:.2f}" if f.beta_s_per_byte > 0 else "-"
        held = (f"{f.held_out_bytes / 2**20:.2f} MiB", f"{100 * f.held_out_error:+.1f}%") \
            if f.held_out_error is not None else ("-", "-")
        t.add_row(f.kind, str(f.group), _us(f.alpha_s), bw, f"{f.r2:.3f}", str(f.points), *held)
    console.print(t)
