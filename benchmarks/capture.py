"""Graph-capture speed and memory for every preset (prints figures, asserts nothing).

Each preset runs in its own process so its peak RSS is its own (``os.wait4`` returns the
child's rusage). Target: ``autopar inspect llama3-405b`` and ``deepseek-v3`` under 30 s with
peak RSS under 3 GiB on 2 cores.

    python benchmarks/capture.py [PRESET ...] [--seq-len S]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

CHILD = """
import json, resource, sys, time
t0 = time.perf_counter()
from autopar.profiles.graph import capture
from autopar.profiles.intake import preset
from autopar.profiles.layer_stats import summarize
t1 = time.perf_counter()
spec = preset(sys.argv[1])
seq = int(sys.argv[2]) or spec.max_seq_len
graph = capture(spec, seq, 1, "bf16")
t2 = time.perf_counter()
stats = summarize(graph)
t3 = time.perf_counter()
print(json.dumps(dict(seq_len=seq, nodes=graph.graph.number_of_nodes(), groups=len(stats.groups),
                      import_s=t1 - t0, capture_s=t2 - t1, summarize_s=t3 - t2)))
"""


def run_child(argv: list[str]) -> tuple[str, float, float, int]:
    """(stdout, wall seconds, CPU seconds, peak RSS bytes) of one child process; CPU time
    is the figure to trust on a loaded machine."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        out = ""
    cpu = usage.ru_utime + usage.ru_stime
    return out, time.perf_counter() - t0, cpu, usage.ru_maxrss * 1024  # Linux reports KiB


def main() -> None:
    from autopar.profiles.intake import PRESETS

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("presets", nargs="*", default=sorted(PRESETS))
    parser.add_argument("--seq-len", type=int, default=0, help="0 = each model's max_seq_len")
    args = parser.parse_args()
    print(f"{'preset':16} {'seq':>6} {'nodes':>6} {'groups':>6} {'import s':>9} {'capture s':>10} "
          f"{'summ. s':>8} {'wall s':>7} {'cpu s':>6} {'peak RSS MiB':>13}")
    for name in args.presets:
        out, wall, cpu, rss = run_child([sys.executable, "-c", CHILD, name, str(args.seq_len)])
        if not out:
            print(f"{name:16} failed")
            continue
        r = json.loads(out)
        print(f"{name:16} {r['seq_len']:6d} {r['nodes']:6d} {r['groups']:6d} {r['import_s']:9.2f} "
              f"{r['capture_s']:10.2f} {r['summarize_s']:8.2f} {wall:7.2f} {cpu:6.2f} {rss / 2**20:13.0f}")
    print("\nfull command (python -m autopar inspect MODEL):")
    for name in ("llama3-405b", "deepseek-v3"):
        out, wall, cpu, rss = run_child([sys.executable, "-m", "autopar", "inspect", name])
        status = "ok" if out else "failed"
        print(f"  {name:14} wall {wall:6.2f} s  cpu {cpu:6.2f} s  peak RSS {rss / 2**20:6.0f} MiB  {status}")


if __name__ == "__main__":
    main()
