"""Instructions one fresh search executes (valgrind cachegrind), the steadier figure where wall and CPU time are
noisy (a shared 2-core machine). The child process builds the cost model (capture cache warm) and searches once;
the same process without the search is subtracted. ``PYTHONHASHSEED=0`` and ``AUTOPAR_SEARCH_CACHE=0``; about 1.5%
between identical runs. Needs ``valgrind`` on the PATH. A before/after pair: run it on a ``git archive`` copy of
each tree (``PYTHONPATH`` on the copy), as docs/benchmarks.md's thirteenth round did.

    python benchmarks/search_instructions.py llama3-70b --nodes 128
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys

CHILD = """
import gc, sys
gc.disable()
from autopar.cost_models.session import Inputs, build_cost_model, default_global_batch
from autopar.planner import search as S
kw = {"model": sys.argv[1]}
if sys.argv[2] != "-":
    kw["nodes"] = int(sys.argv[2])
cm, _, cluster, seq = build_cost_model(Inputs(**kw))
if sys.argv[3] == "1":
    S.search(cm, default_global_batch(cluster.world, seq))
"""


def instructions(model: str, nodes: str, with_search: bool) -> int:
    """``I refs`` of one child process (cachegrind's total instruction count)."""
    env = {**os.environ, "PYTHONHASHSEED": "0", "AUTOPAR_SEARCH_CACHE": "0"}
    out = subprocess.run(["valgrind", "--tool=cachegrind", "--cache-sim=no", "--cachegrind-out-file=/dev/null",
                          sys.executable, "-c", CHILD, model, nodes, "1" if with_search else "0"],
                         env=env, capture_output=True, text=True, check=True)
    m = re.search(r"I\s+refs:\s+([\d,]+)", out.stderr)
    if m is None:
        raise SystemExit(f"error: no instruction count in valgrind's output: {out.stderr.strip()[-200:]}")
    return int(m.group(1).replace(",", ""))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("--nodes", default="-", help="node count (default: the preset's)")
    args = ap.parse_args()
    if shutil.which("valgrind") is None:
        print("error: valgrind is not on the PATH; install it (apt install valgrind)", file=sys.stderr)
        return 2
    a, b = instructions(args.model, args.nodes, True), instructions(args.model, args.nodes, False)
    print(f"{args.model} nodes {args.nodes}: search {(a - b) / 1e6:,.0f} M instructions "
          f"(process {a / 1e6:,.0f} M, without the search {b / 1e6:,.0f} M)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
