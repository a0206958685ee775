"""Run several emitted ``train.py`` programs one after another inside one torchrun launch.

A launch costs 6-10 s (mostly ``import torch`` per process), a tiny program well under one,
so the codegen tests group their programs: ``torchrun ... codegen_harness.py jobs.json``
where ``jobs.json`` lists ``{"dir": ..., "args": [...]}``. The process group is created once
here; ``train.py`` reuses it (``rt.init_distributed``) and leaves it up (``rt.shutdown``).
Rank 0 prints ``=== BEGIN <name>`` / ``=== END <name>`` around each program's output; a
failing program prints ``=== FAILED <name>`` and ends the launch (its peers would wait).
"""

import datetime
import json
import os
import runpy
import sys
import traceback

import torch.distributed as dist


def main() -> None:
    jobs = json.loads(open(sys.argv[1]).read())
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=float(os.environ.get("HARNESS_TIMEOUT", 90))))
    rank = dist.get_rank()
    for job in jobs:
        name = job.get("name", job["dir"])
        if rank == 0:
            print(f"=== BEGIN {name}", flush=True)
        script = os.path.join(job["dir"], "train.py")
        sys.argv = [script, *job.get("args", [])]
        try:
            runpy.run_path(script, run_name="__main__")
        except BaseException:
            print(f"=== FAILED {name} (rank {rank})\n{traceback.format_exc()}", flush=True)
            sys.stdout.flush()
            os._exit(1)
        dist.barrier()
        if rank == 0:
            print(f"=== END {name}", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
