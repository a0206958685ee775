"""`autopar emit PLAN --out DIR [--device cuda|cpu]`: write the training program of a plan."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from autopar.cli.app import app


@app.command("emit")
def emit_command(
    plan: Path = typer.Argument(..., help="plan.json written by `autopar plan`"),
    out: Path = typer.Option(..., "--out", "-o", help="folder to write train.py and the launch scripts into"),
    device: str = typer.Option("cuda", "--device", help="cuda (NCCL) or cpu (gloo: try any plan on a laptop)"),
) -> None:
    """Generate train.py, launch_torchrun.sh, launch_slurm.sbatch, pytorchjob.yaml and a README."""
    from autopar.codegen.emit import emit, launch_commands
    from autopar.core.plan import Plan

    p = Plan.load(plan)
    files = emit(p, out, device)
    table = Table(title=f"autopar emit: {p.model.name}, {p.strategy.short()} on {p.cluster.short()}")
    table.add_column("file")
    table.add_column("bytes", justify="right")
    for f in files:
        table.add_row(str(f), str(f.stat().st_size))
    console = Console()
    console.print(table)
    console.print(f"run: cd {out} && {launch_commands(p)[0]}", soft_wrap=True, markup=False)
