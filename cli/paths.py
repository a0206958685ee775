"""Typer callbacks of the options that name a file or folder to write (``--out``, ``--plot``).

A path that cannot be written is refused as the command line is parsed, in one line naming the option (click's
usage error), before a search or a capture runs, and before anything is written: otherwise the work ran first and
``write_atomic`` met the path with a traceback (a file where a folder goes, a folder where a file goes).
"""

from __future__ import annotations

import os
from pathlib import Path

import typer


def out_file(path: Path | None) -> Path | None:
    """Typer callback of an ``--out`` / ``--plot`` FILE: refuse, before any work, a path that cannot be written."""
    return _writable(path, folder=False)


def out_folder(path: Path | None) -> Path | None:
    """Typer callback of an ``--out`` / ``--plot`` FOLDER: as ``out_file``."""
    return _writable(path, folder=True)


def _writable(path: Path | None, folder: bool) -> Path | None:
    """``path`` unchanged, or ``typer.BadParameter`` (one line naming the option) when it is a folder where a file
    goes (or a file where a folder goes), lies under a file, or its nearest existing folder is not writable."""
    if path is None:
        return path
    if path.exists() and path.is_dir() != folder:
        kind = "a folder" if path.is_dir() else "a file"
        raise typer.BadParameter(f"{path} is {kind}; fix: name a {'folder' if folder else 'file'}")
    parent = next(p for p in path.absolute().parents if p.exists())  # the root always exists
    if not parent.is_dir():
        raise typer.BadParameter(f"{parent} is a file, not a folder; fix: choose a path under a folder")
    target = path if path.exists() else parent
    if not os.access(target, os.W_OK):
        raise typer.BadParameter(f"cannot write into {target} (permission denied); fix: choose a writable place")
    return path
