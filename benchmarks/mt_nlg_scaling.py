"""MT-NLG 530B (Smith et al. 2022, arXiv:2201.11990, Sec. 2.4): the paper's three configurations of one
global batch (1,920 sequences on 280 / 350 / 420 DGX A100 nodes, tp 8 x pp 35 per replica) priced with the
mapping of the one row ``published_modern.yaml`` holds (350 nodes), to show which micro-batch reproduces
the published scaling (``published_dense_rows.mt_nlg_microbatch``).

    python benchmarks/mt_nlg_scaling.py [--mbs N ...]

The 280- and 420-node iteration times (60.1 and 44.4 s) are the paper's, taken as the row's own (50.2 s)
is; they are not rows of the shared file. Each configuration keeps every other field of the row.
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import published_dense_rows as dense  # noqa: E402
import published_rows as pr  # noqa: E402

ROW = "mt_nlg_530b_2800gpu"


def configuration(run: dict, nodes: int, step_s: float, mbs: int | None) -> dict:
    """The row on ``nodes`` DGX A100 nodes with the paper's iteration time there; ``mbs`` None keeps the mapping."""
    r = copy.deepcopy(run)
    r["id"] = f"mt_nlg_530b_{nodes * 8}gpu"
    r["hardware"]["num_gpus"] = nodes * 8
    r["parallel"]["dp"] = nodes // dense.MT_NLG_REPLICA_NODES
    r["measured"]["step_time_s"] = step_s
    if mbs:
        r["parallel"]["microbatch"] = mbs
    return r


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mbs", type=int, nargs="*", default=[1, 0], help="sequences per micro-batch (0: the mapping)")
    args = ap.parse_args(argv)
    run = next(r for r in pr.load_runs(pr.MODERN_YAML) if r["id"] == ROW)
    k = dense.one_f_one_b_microbatch(dense.MT_NLG_STEP_S, dense.MT_NLG_GLOBAL_BATCH, dense.MT_NLG_PP,
                                     dense.MT_NLG_REPLICA_NODES)
    print(f"micro-batch the 1F1B bubble reads from the published times: {k:.2f} sequences")
    with tempfile.TemporaryDirectory() as tmp:
        for mbs in args.mbs:
            for nodes, step_s in sorted(dense.MT_NLG_STEP_S.items()):
                case = pr.case_for(configuration(run, nodes, step_s, mbs or None))
                p = pr.price(case, Path(tmp))
                print(f"{case.id:22s} {case.strategy}\n    {p.breakdown()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
