"""Entry point: register the commands and turn user errors into one line and an exit code.

Start-up time is most of what a user waits for, so this module imports only the command
module that defines the command named on the command line (found by reading the
``@app.command("name")`` lines of ``cli/*_cmd.py``, no import needed); ``autopar --help``
and unknown commands import them all. Each command module keeps its module-level imports
light (typer, rich, ``cli.common``) and imports torch, the cost models and the planner
inside the command function.
"""

from __future__ import annotations

import gc
import importlib
import json
import os
import re
import sys
import types
from pathlib import Path
from typing import NoReturn

from autopar import IMPORTED_S
from autopar.cli.app import app
from autopar.errors import AutoparError, InputError

NO_BLAS_COMMANDS = ("plan", "estimate", "memory")
_CMD_RE = re.compile(r"""@app\.command\(\s*["']([\w-]+)["']""")


def command_modules() -> dict[str, str]:
    """Command name -> ``autopar.cli.<module>`` for every ``cli/*_cmd.py``."""
    out = {}
    for path in sorted(Path(__file__).parent.glob("*_cmd.py")):
        for name in _CMD_RE.findall(path.read_text()):
            out[name] = f"autopar.cli.{path.stem}"
    return out


def register(argv: list[str]) -> None:
    """Import the module of the command in ``argv`` (all of them when there is none)."""
    mods = command_modules()
    first = next((a for a in argv if not a.startswith("-")), None)
    wanted = [mods[first]] if first in mods else sorted(set(mods.values()))
    for mod in wanted:
        importlib.import_module(mod)


def error_json(exc: AutoparError) -> dict:
    """``{"error": kind, "exit_code", "message", "reasons", "fixes"}``; an error raised with
    ``details`` (reasons, fixes) keeps them apart, else the message is the one reason."""
    kind = "does_not_fit" if exc.exit_code == 3 else "input"
    details = getattr(exc, "details", None) or {"reasons": [exc.message], "fixes": []}
    return {"error": kind, "exit_code": exc.exit_code, "message": exc.message, **details}


def main(argv: list[str] | None = None) -> None:
    """The ``autopar`` command. Called with no ``argv`` (the console script, ``python -m autopar``)
    the process ends as soon as the command has: see ``_exit``. Called with ``argv`` (tests,
    scripts) it raises ``SystemExit`` like any click program and leaves the interpreter running."""
    if argv is not None:
        return run(argv)
    # the search cache serves this process only (in-process callers may patch the cost model: a hit would hide it)
    from autopar.planner import search_cache

    search_cache.enable_console(IMPORTED_S)
    # Collect cyclic garbage every 100,000 allocations instead of 700: the default threshold spent
    # 0.2 s of a warm `plan llama3-70b --nodes 128` (0.08 s of it importing pydantic models) and
    # 0.6 s of `plan deepseek-v3 --nodes 256` walking long-lived objects; at 100,000 the imports of
    # a warm plan (about 90,000 objects) run no collection at all, and the peak memory is the same
    # (deepseek-v3: 132 MB; 159 MB at 200,000).
    gc.set_threshold(100_000, 20, 10)
    if next((a for a in sys.argv[1:] if not a.startswith("-")), None) in NO_BLAS_COMMANDS:
        # numpy's OpenBLAS starts a thread per core as it loads (0.04 s of CPU of a warm plan on 2 cores, more
        # on bigger hosts); these commands call no BLAS routine (integer matmuls and elementwise numpy only)
        os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
        # and they leave almost nothing in reference cycles: the search's memos and queue live to its end and
        # the rest is freed by reference counting, so each collection walked up to 100,000 live objects for
        # nothing (1-2 of them, 0.03-0.05 s of a warm `plan llama3-70b --nodes 128`). Without collection
        # `gc.collect()` at the end finds 618 objects in cycles (warm plans of llama3-70b x128, deepseek-v3
        # x256, the awkward 530B) and 9,822 / 10,924 (cold llama3-8b / deepseek-v3: torch's capture), and the
        # peak memory moves by at most 2 MB (warm 75, 129, 90 MB; cold 255, 333 MB).
        gc.disable()
    _without_pydantic_plugins()
    sys.stdout, sys.stderr = PipeGuard(sys.stdout), PipeGuard(sys.stderr)
    try:
        run(sys.argv[1:])
        code = 0
    except SystemExit as exc:
        code = exc.code
    _exit(code)


def _without_pydantic_plugins() -> None:
    """Run this process without pydantic plugins unless ``PYDANTIC_DISABLE_PLUGINS`` says which (pydantic's own
    switch: then pydantic decides as usual). pydantic looks for plugins (entry points of the group "pydantic") as
    it builds its first model class: its loader imports importlib.metadata (and with it email, zipfile, csv) and
    scans every installed distribution, 0.02-0.03 s of a warm ``plan`` that autopar's commands, which use no
    plugin, do not need (docs/benchmarks.md, issue 15's eleventh round). The loader is taken as the one pydantic
    has when plugins are off: ``get_plugins()`` gives none (tests/test_cli_speed.py checks that pydantic still
    imports only ``get_plugins`` from it)."""
    if "PYDANTIC_DISABLE_PLUGINS" in os.environ or "pydantic.plugin._loader" in sys.modules:
        return
    loader = types.ModuleType("pydantic.plugin._loader", "autopar's stand-in: no pydantic plugins (cli/main.py)")
    loader.get_plugins = lambda: ()
    loader.__getattr__ = _real_pydantic_loader  # a later pydantic asking for more gets the real loader's names
    sys.modules[loader.__name__] = loader


def _real_pydantic_loader(name: str):
    """Any name but ``get_plugins`` (a pydantic release newer than the test's): the stand-in steps aside and
    pydantic's own loader answers, so the process still runs, only with the plugin scan."""
    import importlib

    if name.startswith("__"):   # the import system's own probes (__spec__, __path__, ...): a plain module's answer
        raise AttributeError(name)
    sys.modules.pop("pydantic.plugin._loader", None)
    return getattr(importlib.import_module("pydantic.plugin._loader"), name)


class PipeGuard:
    """A standard stream whose reader may leave first (``autopar plan ... | head -3``). Python raises
    BrokenPipeError on the next write, and click, around every command, turns it into a silent exit 1.
    Here the stream's descriptor is pointed at /dev/null instead: the rest of the output is dropped, the
    command ends as it would have, exit 0 (as ``git log | head`` does). Everything else is the stream's."""

    def __init__(self, stream):
        self._stream = stream

    def write(self, text: str) -> int:
        try:
            return self._stream.write(text)
        except BrokenPipeError:
            self._to_devnull()
            return len(text)

    def flush(self) -> None:
        try:
            self._stream.flush()
        except BrokenPipeError:
            self._to_devnull()

    def _to_devnull(self) -> None:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, self._stream.fileno())  # what is still buffered then flushes there, quietly
        os.close(devnull)

    def __getattr__(self, name: str):
        return getattr(self._stream, name)


def _exit(code: int | str | None) -> None:
    """Exit without tearing the interpreter down: the teardown (freeing every module and the
    search's objects one by one) took 0.15-0.25 s of CPU after a warm ``plan`` (a fifth of what it
    spent outside its search) and about 0.8 s after a cold one, with torch loaded (docs/benchmarks.md,
    the seventh round of the cli_latency section). The ``atexit`` functions (temporary
    folders, torch's) still run and the output is flushed; with a non-daemon thread still running,
    the normal exit waits for it (daemon threads, such as the tqdm monitor that a capture's imports
    start, a normal exit does not wait for either)."""
    import atexit
    import threading

    if not isinstance(code, int):  # sys.exit("message") or sys.exit(None)
        if code is not None:
            print(code, file=sys.stderr)
        code = 0 if code is None else 1
    if any(t is not threading.main_thread() and not t.daemon for t in threading.enumerate()):
        sys.exit(code)
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe (autopar plan ... | head): nothing left to say
            pass
    os._exit(code)


def run(args: list[str]) -> None:
    """Run the command in ``args``: returns when it succeeds, else raises ``SystemExit`` with its exit code."""
    try:
        register(args)
        code = app(args=args, standalone_mode=False)
        if isinstance(code, int) and code:  # non-standalone typer returns exit codes; Ctrl-C gives 130
            if code == 130:
                print("error: interrupted", file=sys.stderr)
            sys.exit(code)
    except AutoparError as exc:
        _fail(exc, args)
    except SystemExit:
        raise
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        sys.exit(130)
    except OSError as exc:  # a file the command reads or writes (disk full, permissions): one line, not a traceback
        where = f"{exc.filename}: " if exc.filename else ""
        _fail(InputError(f"{where}{exc.strerror or exc}; fix: check that path and its permissions"), args)
    except Exception as exc:  # click (vendored by typer) usage errors and exits
        code = getattr(exc, "exit_code", None)
        if code is None:
            raise
        if hasattr(exc, "format_message"):  # a usage error (bad option value, unknown option): one line
            ctx = getattr(exc, "ctx", None)
            where = f" (see {ctx.command_path} --help)" if ctx is not None else ""
            _fail(InputError(f"{exc.format_message()}{where}", code), args)
        sys.exit(code)


def _fail(exc: AutoparError, args: list[str]) -> NoReturn:
    """``error: <message>`` on stderr and the error's exit code; with ``--json`` a script reading stdout gets an
    object too (``error_json``: the reasons and fixes), for a usage error (click's) as for the commands' own."""
    if "--json" in args:
        print(json.dumps(error_json(exc), indent=2))
    print(f"error: {exc.message}", file=sys.stderr)
    sys.exit(exc.exit_code)


if __name__ == "__main__":
    main()
