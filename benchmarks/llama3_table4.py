"""Llama 3 405B (Llama Team 2024, arXiv:2407.21783, Sec. 3.3.2 Table 4): the paper's three pretraining
configurations priced with the mapping of the one row ``published_modern.yaml`` holds (the 131k-token
stage), to tell what the 131k row's error comes from: attention at long context, or the mapping itself.

    python benchmarks/llama3_table4.py [--runtime torch|torchtitan|megatron] [--vpp N]

The two 8k-token configurations are not rows of the shared file; their TFLOP/s per GPU are Table 4's
(8,192 GPUs: TP 8, CP 1, PP 16, DP 64, 32 sequences per DP rank, 430; 16,384 GPUs: DP 128, 16 per DP
rank, 400), taken from the paper as the 131k row's own figure (380) is. Each configuration keeps every
other field of the 131k row (the model, Meta's FSDP as autopar's ZeRO-1 program, which moves the same bytes
under a pipeline: ``published_dense_rows.llama3_zero``; the interleaved schedule, the runtime).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import published_rows as pr  # noqa: E402

ROW = "llama3_405b_16384gpu_seq131072"
TABLE4 = [  # (GPUs, CP, DP, sequence length, sequences per DP rank, TFLOP/s per GPU)
    (8192, 1, 64, 8192, 32, 430.0),
    (16384, 1, 128, 8192, 16, 400.0),
    (16384, 16, 8, 131072, 16, 380.0),
]


def configuration(run: dict, gpus: int, cp: int, dp: int, seq: int, per_dp: int, tflops: float) -> dict:
    """The 131k row with one Table 4 configuration's GPU count, CP, DP, sequence and figure."""
    r = copy.deepcopy(run)
    r["id"] = f"llama3_405b_{gpus}gpu_seq{seq}"
    r["hardware"]["num_gpus"] = gpus
    r["parallel"].update(cp=cp, dp=dp, batch_size_per_dp=per_dp)
    r["model"]["seq_len"] = seq
    r["measured"]["tflops_per_gpu"] = tflops
    return r


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runtime", default=None, help="price as this runtime instead of the row's mapping")
    ap.add_argument("--vpp", type=int, default=None, help="stages per rank instead of the mapping's default")
    args = ap.parse_args(argv)
    run = next(r for r in pr.load_runs(pr.MODERN_YAML) if r["id"] == ROW)
    with tempfile.TemporaryDirectory() as tmp:
        for row in TABLE4:
            r = configuration(run, *row)
            if args.vpp:
                r["parallel"]["vpp"] = args.vpp
            case = pr.case_for(r)
            if args.runtime:
                case = dataclasses.replace(case, runtime=args.runtime)
            p = pr.price(case, Path(tmp))
            print(f"{r['id']:34s} {case.runtime:10s} {case.strategy}\n    {p.breakdown()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
