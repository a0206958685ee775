"""The typer application object; each command lives in its own ``cli/*_cmd.py`` module."""

from __future__ import annotations

import typer

app = typer.Typer(
    name="autopar",
    help="Plan, price and emit hybrid-parallel PyTorch training.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,  # plain click help: rich's help formatter costs a third of a second to import
)


def disable_cache(value: bool) -> bool:
    """``--no-cache``: capture the graph again instead of reading the on-disk capture cache."""
    if value:
        from autopar.profiles import capture_cache

        capture_cache.set_enabled(False)
    return value


# A root callback keeps typer in command-group mode when cli.main registers a single command.
@app.callback()
def root(no_cache: bool = typer.Option(False, "--no-cache", callback=disable_cache,
                                       help="do not read or write the capture cache (~/.cache/autopar)")) -> None:
    """Plan, price and emit hybrid-parallel PyTorch training."""
