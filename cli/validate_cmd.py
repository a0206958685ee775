"""`autopar validate MODEL --nproc N`: the closed loop. Predict, emit, run and compare at least
eight strategies on N local ranks (see ``codegen/validate.py``)."""

from __future__ import annotations

import os
import shlex
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from autopar.cli import common as c
from autopar.cli import paths
from autopar.cli.app import app
from autopar.errors import InputError


@app.command("validate")
def validate_cmd(model: str = c.Model,
                 nproc: int = typer.Option(..., "--nproc", min=1, help="local ranks (processes) per run"),
                 device: str = typer.Option("cpu", "--device", help="cpu (gloo) or cuda (NCCL)"),
                 gpu: Optional[str] = typer.Option(None, "--gpu", help="hardware profile the predictions use "
                                                   "(default: cpu for --device cpu, h100-sxm for cuda)"),
                 profile: Optional[str] = c.Profile,
                 strategies: str = typer.Option("auto", "--strategies", help="auto, or a file with one "
                                                "strategy per line (tp=2,dp=-1,mbs=1)"),
                 steps: int = typer.Option(6, "--steps", min=1, help="training steps per run"),
                 warmup: int = typer.Option(2, "--warmup", min=0, help="first steps left out of the median"),
                 seq_len: Optional[int] = c.SeqLen,
                 global_batch: Optional[int] = typer.Option(None, "--global-batch", min=1, help="sequences per step "
                                                            "(default 4 x nproc)"),
                 dtype: str = typer.Option("fp32", "--dtype", help="fp32 | bf16"),
                 timeout: float = typer.Option(300.0, "--timeout", min=0.001,
                                               help="seconds per run before it is killed"),
                 out: Path = typer.Option(Path("validate-out"), "--out", callback=paths.out_folder,
                                                help="folder for the runs and reports"),
                 json_out: bool = c.Json,
                 runtime: str = typer.Option("torch", "--runtime", help="torch: validate runs autopar's own "
                                             "emitted programs, so only their runtime can be compared"),
                 input_shape: Optional[str] = c.InputShape, input_dtype: str = c.InputDtype, hf: bool = c.Hf,
                 trace: Optional[str] = c.Trace,
                 merge: Optional[str] = typer.Option(None, "--merge", help="comma-separated --out folders of "
                                                     "earlier runs of this configuration (the strategies split in "
                                                     "pieces): one report of them all in --out; runs nothing")):
    """Run strategies for real and compare measured step time and memory with the predictions."""
    from autopar.codegen import validate as v
    from autopar.codegen import validate_report as rep
    from autopar.cost_models.session import Inputs, build_cost_model

    if nproc < 1:
        raise InputError(f"--nproc={nproc} must be at least 1")
    if runtime != "torch":
        raise InputError(f"--runtime={runtime}: validate runs autopar's emitted torch programs; use --runtime torch")
    model = c.hf_model(model, hf)
    if merge:
        return _merged(v, rep, model, nproc, [Path(d) for d in merge.split(",") if d], out, json_out)
    c.precheck(model, None, None, None, None, c._shape(input_shape), input_dtype)
    if strategies != "auto":
        v.read_strategies(strategies)   # a typo exits 2 before the cost model is built
    inp = Inputs(model=model, gpu=gpu or ("cpu" if device == "cpu" else None), nodes=1, gpus_per_node=nproc,
                 seq_len=seq_len, dtype=dtype, profile=profile, input_shape=c._shape(input_shape),
                 input_dtype=input_dtype, trace=trace)  # a routing trace: the busiest expert rank's load
    cm, spec, cl, seq = build_cost_model(inp)
    cfg = v.Config(nproc=nproc, global_batch=global_batch or 4 * nproc, steps=steps, warmup=warmup,
                   timeout_s=timeout, device=device, threads_per_rank=cm.gpu.threads_per_rank)
    cfg.check()
    chosen = v.select(cm, v.candidates(cm, strategies, nproc), cfg, strict=strategies != "auto")
    load0 = os.getloadavg()[0]
    rows, summary = _run(v, cm, chosen, cfg, out, quiet=json_out)
    meta = _meta(model, cm, cfg, profile or inp.gpu or "", load0)
    files = rep.write_all(summary, meta, out)
    if json_out:
        c.print_json({**meta, **summary})
        return
    _print(summary, meta, files)


def _merged(v, rep, model: str, nproc: int, dirs: list[Path], out: Path, json_out: bool) -> None:
    """--merge: the pieces' strategies compared as one set, reported like a run."""
    strategies, meta = rep.merge(dirs)
    if (meta["model"], meta["nproc"]) != (model, nproc):
        raise InputError(f"--merge: the folders ran {meta['model']} on {meta['nproc']} ranks, not {model} on {nproc}; "
                         "fix: give the model and --nproc they ran")
    summary = v.summarize_dicts(strategies)
    files = rep.write_all(summary, meta, out)
    if json_out:
        c.print_json({**meta, **summary})
        return
    _print(summary, meta, files)


def _run(v, cm, chosen, cfg, out: Path, quiet: bool):
    """The runs, with a progress bar across them (on stderr, so --json stays clean)."""
    from rich.console import Console

    cols = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()]
    with Progress(*cols, console=Console(stderr=True), disable=False) as bar:
        task = bar.add_task("validate", total=len(chosen))

        def start(row):
            bar.update(task, description=f"running {row.name}")

        def done(row):
            status = row.measurement.status if row.measurement else "failed"
            bar.advance(task)
            if not quiet:
                bar.console.print(f"  {row.name}: {status}")

        return v.validate(cm, chosen, cfg, out, on_start=start, on_done=done)


def _meta(model: str, cm, cfg, profile: str, load0: float) -> dict:
    load1 = os.getloadavg()[0]
    return {"model": model, "nproc": cfg.nproc, "device": cfg.device, "profile": profile,
            "seq_len": cm.seq_len, "global_batch": cfg.global_batch, "dtype": cm.dtype, "steps": cfg.steps,
            "warmup": cfg.warmup, "threads_per_rank": cfg.threads_per_rank, "cpu_count": os.cpu_count(),
            "load": f"1-min load average {load0:.1f} at start, {load1:.1f} at end on {os.cpu_count()} cores",
            "command": "autopar " + " ".join(shlex.quote(a) for a in sys.argv[1:]) if sys.argv[1:] else
            "autopar validate"}


def _print(summary: dict, meta: dict, files: list[Path]) -> None:
    from autopar.codegen import validate_report as rep

    con = c.console()
    table = Table(title=f"autopar validate: {meta['model']} on {meta['nproc']} {meta['device']} ranks")
    for h in rep.HEADERS:
        table.add_column(h, justify="left" if h in ("strategy", "status") else "right")
    for row in rep.table_rows(summary):
        table.add_row(*row)
    con.print(table)
    for k, val in rep.headline(summary):
        con.print(f"{k}: {val}", markup=False)
    con.print(f"note: {rep.MEMORY_NOTE}; {meta['load']}", markup=False)
    for r in summary["strategies"]:
        if r["error"]:
            what = "failed" if r["status"] != "ok" else "note"
            con.print(f"{what}: {r['name']}: {r['error']} (log: {r['log'] or '-'})", markup=False)
    con.print("wrote " + ", ".join(str(f) for f in files), markup=False)
