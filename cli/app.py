"""The typer application object; each command lives in its own ``cli/*_cmd.py`` module."""

from __future__ import annotations

import typer

app = typer.Typer(
    name="autopar",
    help="Plan, price and emit hybrid-parallel PyTorch training.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
