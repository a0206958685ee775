"""Options shared by the commands that price strategies (estimate, memory, plan)."""

from __future__ import annotations

import json
from typing import Optional

import typer

from autopar.cost_models.session import Inputs

Model = typer.Argument(..., help="preset name, config.json path, or pkg.mod:fn factory")
Gpu = typer.Option(None, "--gpu", help="GPU profile (h100-sxm, a100-80g, h200, h800, a100-40g, cpu) or a file")
Nodes = typer.Option(None, "--nodes", help="number of nodes (default 1)")
GpusPerNode = typer.Option(None, "--gpus-per-node", help="GPUs per node (default 8; 1 for cpu)")
Cluster = typer.Option(None, "--cluster", help="cluster preset (dgx-a100, dgx-h100, ...) or YAML file")
SeqLen = typer.Option(None, "--seq-len", help="sequence length (default: the model's, capped at 4096/8192)")
GlobalBatch = typer.Option(None, "--global-batch", help="sequences per optimizer step")
Dtype = typer.Option("auto", "--dtype",
                     help="bf16 | fp16 | fp32 | fp8 (auto: bf16, fp32 where the profile has no bf16)")
Profile = typer.Option(None, "--profile", help="measured profile JSON from `autopar profile`")
Placement = typer.Option(None, "--placement", help="expert placement JSON from `autopar experts`")
Trace = typer.Option(None, "--trace", help="routing trace JSON from `autopar trace-routing`")
Json = typer.Option(False, "--json", help="print one JSON object")
InputShape = typer.Option(None, "--input-shape", help="example input shape of a factory model, e.g. 2,128")


def inputs(model: str, gpu: Optional[str], nodes: Optional[int], gpus_per_node: Optional[int],
           cluster: Optional[str], seq_len: Optional[int], dtype: str, profile: Optional[str],
           placement: Optional[str] = None, trace: Optional[str] = None,
           input_shape: Optional[str] = None) -> Inputs:
    shape = [int(x) for x in input_shape.split(",")] if input_shape else None
    return Inputs(model=model, gpu=gpu, nodes=nodes, gpus_per_node=gpus_per_node, cluster=cluster,
                  seq_len=seq_len, dtype=dtype, profile=profile, placement=placement, trace=trace,
                  input_shape=shape)


def console():
    """A rich console that does not wrap tables at 80 columns when stdout is a pipe."""
    from rich.console import Console

    con = Console()
    return con if con.is_terminal else Console(width=140)


def print_json(obj) -> None:
    typer.echo(json.dumps(obj, indent=2, default=float))


def gib(x: float) -> str:
    return f"{x / 2**30:.1f} GiB"


def seconds(x: float) -> str:
    if x >= 1:
        return f"{x:.2f} s"
    if x >= 1e-3:
        return f"{x * 1e3:.1f} ms"
    return f"{x * 1e6:.0f} us"
