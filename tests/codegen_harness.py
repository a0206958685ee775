"""Run several emitted ``train.py`` programs one after another inside one torchrun launch.

A launch costs 6-10 s (mostly ``import torch`` per process), a tiny program well under one,
so the codegen tests group their programs: ``torchrun ... codegen_harness.py jobs.json``
where ``jobs.json`` lists ``{"dir": ..., "args": [...]}``. The process group is created once
here; ``train.py`` reuses it (``rt.init_distributed``) and leaves it up (``rt.shutdown``).
Rank 0 prints ``=== BEGIN <name>`` / ``=== END <name>`` around each program's output; a
failing program prints ``=== FAILED <name>`` and ends the launch (its peers would wait).
After each program the groups its mesh created are destroyed (``_drop_groups``).
"""

import datetime
import gc
import json
import os
import runpy
import sys
import traceback

import torch.distributed as dist


def _drop_groups() -> None:
    """Destroy every group but the world: each program's DeviceMesh makes 8-12 gloo groups of 3
    threads each (2 workers and a transport loop) that outlive it, so a 8-program launch reached
    145 threads per rank and the load rose with them; destroying them joins the threads."""
    gc.collect()  # the finished program's meshes and modules (reference cycles) let go of their groups
    for pg in list(dist.distributed_c10d._world.pg_map):
        if pg is not dist.GroupMember.WORLD:
            dist.destroy_process_group(pg)
    _clear_dtensor_caches()
    gc.collect()


def _clear_dtensor_caches() -> None:
    """DTensor caches redistribution plans and sharding decisions by mesh, and meshes of the same
    shape compare equal: a later program would reuse a plan naming a destroyed group ("Could not
    resolve the process group registered under the name 11"). Each cache is cleared if this
    torch has it."""
    from torch.distributed.tensor import _collective_utils, _redistribute, debug

    for clear in (getattr(debug, "_clear_sharding_prop_cache", None),
                  getattr(_redistribute, "clear_redistribute_planner_cache", None),
                  getattr(getattr(_redistribute, "_gen_transform_infos", None), "cache_clear", None),
                  getattr(getattr(_collective_utils.MeshTopoInfo, "build_from_mesh", None), "cache_clear", None)):
        if clear is not None:
            clear()


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
        _drop_groups()
        if rank == 0:
            print(f"=== END {name}", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
