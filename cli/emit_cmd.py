"""`autopar emit PLAN --out DIR [--device cuda|cpu] [launcher options]`: write the training program of a plan."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from autopar.cli import paths
from autopar.cli.app import app


@app.command("emit")
def emit_command(
    plan: Path = typer.Argument(..., help="plan.json written by `autopar plan`"),
    out: Path = typer.Option(..., "--out", "-o", callback=paths.out_folder,
                              help="folder to write train.py and the launch scripts into"),
    device: Optional[str] = typer.Option(None, "--device", help="cuda (NCCL) or cpu (gloo: try any plan on a "
                                         "laptop); default: the device the plan was priced for"),
    account: Optional[str] = typer.Option(None, "--account", help="SLURM --account"),
    partition: Optional[str] = typer.Option(None, "--partition", help="SLURM --partition"),
    time_limit: str = typer.Option("01:00:00", "--time", help="SLURM --time ([D-]HH:MM:SS)"),
    exclusive: bool = typer.Option(True, "--exclusive/--shared", help="SLURM: whole nodes (default) or shared"),
    image: str = typer.Option("REPLACE_WITH_YOUR_IMAGE", "--image", help="PyTorchJob container image (torch inside)"),
    workdir: str = typer.Option("/workspace/run", "--workdir", help="the run folder's path inside the image"),
    host_network: bool = typer.Option(False, "--host-network", help="PyTorchJob: pods on the node's network"),
    rdma_resource: Optional[str] = typer.Option(None, "--rdma-resource",
                                                help="PyTorchJob: RDMA device-plugin resource, e.g. rdma/ib"),
) -> None:
    """Generate train.py (with its runtime, autopar_rt/, and a sample in data/), launch_torchrun.sh,
    launch_slurm.sbatch, pytorchjob.yaml and a README."""
    from autopar.codegen.emit import emit, launch_commands
    from autopar.codegen.emit_launch import LaunchOptions
    from autopar.core.plan import Plan

    p = Plan.load(plan)
    launch = LaunchOptions(account=account, partition=partition, time_limit=time_limit, exclusive=exclusive,
                           image=image, workdir=workdir, host_network=host_network, rdma_resource=rdma_resource)
    files = emit(p, out, device, launch)
    table = Table(title=f"autopar emit: {p.model.name}, {p.strategy.short()} on {p.cluster.short()}")
    table.add_column("file")
    table.add_column("bytes", justify="right")
    for f in files:
        table.add_row(str(f), str(f.stat().st_size))
    console = Console()
    console.print(table)
    console.print(f"run: cd {out} && {launch_commands(p)[0]}", soft_wrap=True, markup=False)
