"""Wall and CPU time of whole ``autopar`` commands, process start included, cold and warm.

Cold: an empty capture cache (``AUTOPAR_CACHE_DIR`` set to a fresh folder per command), so a plan imports
torch and captures the graph. Warm: the same command again on the now filled cache. CPU time
is the children's user + system time (``resource.getrusage(RUSAGE_CHILDREN)``): on a shared,
loaded machine it is the steadier figure; wall time is what a user waits for.

Bytecode: the children run with the caller's environment. Where it sets ``PYTHONDONTWRITEBYTECODE``
(as this project's development shells do) every command compiles each autopar module it imports
again (62 modules for a warm ``plan``; docs/benchmarks.md has the cost); ``--bytecode`` unsets it for the children, as a
default Python runs: the cold run writes ``__pycache__`` and the warm runs read it. The header line
says which.

The ``queued`` column is the time the command's threads were ready to run but waited for a CPU (the
second field of Linux's ``/proc/PID/task/TID/schedstat``, read every 5 ms while it runs): on a 2-core
machine shared with other jobs, wall time is about CPU time plus this; blank where ``/proc`` lacks it.

Warm runs come two ways. "warm": the same command again, so the capture cache and the search cache
(``planner/search_cache.py``) both answer: a ``plan`` prints the stored search result without searching.
"warm, search run": the same with ``AUTOPAR_SEARCH_CACHE=0`` (the capture cache only), so the search runs;
its ``search`` column is the search time that run printed (``searched ... in X s``; for the awkward 530B
command ``all searches X s wall``, which also counts its alternative searches), and ``outside`` is that
run's wall time less it: interpreter start, imports, reading the capture cache, building the inputs,
printing and exit. A warm run that did not answer from the search cache (a command that does not
search) prints ``-`` in the ``hit`` column; the search-run columns are left blank for commands that print
no search time.

    python benchmarks/cli_latency.py            # all commands, one cold and REPEAT warm runs each
    python benchmarks/cli_latency.py --repeat 3
    python benchmarks/cli_latency.py --bytecode
"""

from __future__ import annotations

import argparse
import glob
import os
import re
import resource
import subprocess
import sys
import tempfile
import time

COMMANDS = {
    "--help": ["--help"],
    "input error (unknown preset)": ["plan", "no-such-model"],
    "input error (--seq-len 0)": ["estimate", "llama3-8b", "--seq-len", "0", "--strategy", "tp=8"],
    "plan llama3-8b": ["plan", "llama3-8b"],
    "plan llama3-70b --nodes 128": ["plan", "llama3-70b", "--nodes", "128"],
    "plan deepseek-v3 --nodes 256": ["plan", "deepseek-v3", "--nodes", "256"],
    "estimate llama3-70b tp=8,pp=4 (4 nodes)": ["estimate", "llama3-70b", "--nodes", "4", "--strategy",
                                                "tp=8,pp=4,dp=-1,mbs=1,recompute=selective"],
    "plan gpt-530b, 641 x 8 a100 (awkward)": ["plan", "tests/fixtures/gpt-530b/config.json", "--gpu", "a100-80g",
                                              "--nodes", "641", "--global-batch", "2520"],
}


SEARCH_RE = re.compile(r"(?:all searches|configurations in) ([0-9.]+) s")


def run(args: list[str], env: dict) -> tuple[float, float, int, float | None, float | None, bool]:
    """(wall s, CPU s, exit code, printed search s or None, queued s or None, answered from the search cache)
    of one ``python -m autopar ARGS`` process."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    with tempfile.TemporaryFile("w+") as out:   # a file, not a pipe: the poll loop below does not drain it
        t0 = time.perf_counter()
        proc = subprocess.Popen([sys.executable, "-m", "autopar", *args], env=env, stdout=out,
                                stderr=subprocess.DEVNULL, text=True)
        waits: dict[str, int] = {}   # thread -> ns waited on a run queue, as last read
        while proc.poll() is None:
            _read_waits(proc.pid, waits)
            time.sleep(0.005)
        wall = time.perf_counter() - t0
        out.seek(0)
        stdout = out.read()
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    found = SEARCH_RE.search(stdout)  # the awkward table's "all searches" line comes first
    queued = sum(waits.values()) / 1e9 if waits else None
    hit = "from the search cache" in " ".join(stdout.split())   # the note may wrap
    return wall, cpu, proc.returncode, float(found.group(1)) if found else None, queued, hit


def _read_waits(pid: int, waits: dict[str, int]) -> None:
    """Each thread's run-queue wait (``schedstat``'s second field, ns) into ``waits``; threads that have
    ended keep their last reading."""
    for path in glob.glob(f"/proc/{pid}/task/*/schedstat"):
        try:
            with open(path) as fh:
                waits[path] = int(fh.read().split()[1])
        except (OSError, IndexError, ValueError):   # the thread or the process ended meanwhile
            pass


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeat", type=int, default=2, help="warm runs per command (the best is reported)")
    ap.add_argument("--only", default="", help="run the commands whose label contains this text")
    ap.add_argument("--bytecode", action="store_true", help="let the children write and read __pycache__ "
                    "(unset PYTHONDONTWRITEBYTECODE), as a default Python does")
    args = ap.parse_args()
    base = dict(os.environ)
    if args.bytecode:
        base.pop("PYTHONDONTWRITEBYTECODE", None)
    pyc = "off (PYTHONDONTWRITEBYTECODE set)" if base.get("PYTHONDONTWRITEBYTECODE") else "on"
    print(f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}, bytecode cache {pyc}")
    print(f"{'':76s}{'warm (both caches hit)':>34s}{'warm, search run (AUTOPAR_SEARCH_CACHE=0)':>43s}")
    print(f"{'command':42s} {'exit':>4s} {'cold wall':>10s} {'cold CPU':>9s} {'queued':>7s} {'warm wall':>10s} "
          f"{'warm CPU':>9s} {'queued':>7s} {'hit':>4s} {'wall':>8s} {'CPU':>8s} {'queued':>7s} {'search':>7s} "
          f"{'outside':>8s}")
    for label, cmd in COMMANDS.items():
        if args.only and args.only not in label:
            continue
        env = dict(base, AUTOPAR_CACHE_DIR=tempfile.mkdtemp(prefix="autopar-latency-"))  # cold: empty
        env.pop("AUTOPAR_NO_CACHE", None)
        env.pop("AUTOPAR_SEARCH_CACHE", None)
        cw, cc, code, _, cq, _ = run(cmd, env)
        warm, searched = [], []
        for _ in range(args.repeat):   # alternated: both ways see the same load
            warm.append(run(cmd, env))
            searched.append(run(cmd, dict(env, AUTOPAR_SEARCH_CACHE="0")))
        ww, wc, _, _, wq, hit = min(warm, key=lambda r: r[0])
        sw, sc, _, search, sq, _ = min(searched, key=lambda r: r[0])
        line = f"{label:42s} {code:4d} {cw:9.2f}s {cc:8.2f}s {_secs(cq)} {ww:9.2f}s {wc:8.2f}s {_secs(wq)} " \
               f"{'yes' if hit else '-':>4s}"
        if search is not None:
            line += f" {sw:7.2f}s {sc:7.2f}s {_secs(sq)} {search:6.2f}s {sw - search:7.2f}s"
        print(line, flush=True)
    print(f"load average after: {os.getloadavg()[0]:.1f}")


def _secs(x: float | None) -> str:
    return f"{x:6.2f}s" if x is not None else " " * 7


if __name__ == "__main__":
    main()
