"""The routing a trace records is the routing the emitted program runs (plan is program).

An expert-parallel moe-tiny program runs its first step on 2 gloo ranks with a forward hook
on every ``TopKRouter``; the per-layer, per-expert token copies summed over its data-parallel
ranks must equal ``autopar trace-routing --data ...`` for the same seed, data, sequence length
and global batch. Routing depends on the data: the program's default data (the generated
sample, 29 character ids) loads expert 6 of the first MoE layer ~2.2x the mean, uniform random
tokens ~1.2x; a trace of other data would price another load (docs/validation.md, moe-tiny).
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers_plans import GLOBAL_BATCH, SEQ_LEN, make_plan

from autopar.cli.main import main
from autopar.codegen.emit import emit
from autopar.cost_models.moe_load import contiguous
from autopar.profiles.routing import RoutingTrace

TORCHRUN = Path(sys.executable).with_name("torchrun")

# Runs each job's train.py in this process group (as tests/codegen_harness.py) with a global
# forward hook counting each router's picks; writes {job: [layer][expert] counts} per rank.
HOOKED_HARNESS = r'''
import datetime, json, os, runpy, sys
import torch
import torch.distributed as dist
from torch.nn.modules.module import register_module_forward_hook

counts = {}  # router module -> [E] counts, in first-call order = layer order on this rank


def hook(module, _inputs, output):
    if type(module).__name__ == "TopKRouter":
        picks = torch.bincount(output[0].reshape(-1), minlength=module.gate.out_features)
        counts[module] = counts.get(module, 0) + picks


register_module_forward_hook(hook)
sys.path.insert(0, os.environ["ROUTING_TESTS_DIR"])
import codegen_harness  # noqa: E402
root = os.path.dirname(os.path.abspath(sys.argv[1]))
jobs, out = json.loads(open(sys.argv[1]).read()), {}
dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))  # train.py reuses it
for job in jobs:
    counts.clear()
    sys.argv = [os.path.join(job["dir"], "train.py"), *job["args"]]
    runpy.run_path(sys.argv[0], run_name="__main__")
    out[job["name"]] = [c.tolist() for c in counts.values()]
    dist.barrier()
    counts.clear()
    codegen_harness._drop_groups()  # the program's groups and their threads
with open(os.path.join(root, f"routing_rank{dist.get_rank()}.json"), "w") as f:
    f.write(json.dumps(out))
dist.destroy_process_group()
'''


def _program_routing(root: Path, jobs: list[dict], world: int) -> dict[str, np.ndarray]:
    """Run the jobs in one torchrun launch; {job: [layer, expert] counts summed over ranks}."""
    (root / "jobs.json").write_text(json.dumps(jobs))
    (root / "hooked.py").write_text(HOOKED_HARNESS)
    env = dict(os.environ, OMP_NUM_THREADS="1", ROUTING_TESTS_DIR=str(Path(__file__).parent))
    proc = subprocess.run([str(TORCHRUN), "--standalone", f"--nproc-per-node={world}", str(root / "hooked.py"),
                           str(root / "jobs.json")], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    per_rank = [json.loads((root / f"routing_rank{r}.json").read_text()) for r in range(world)]
    return {job["name"]: sum(np.asarray(rank[job["name"]]) for rank in per_rank) for job in jobs}


def _trace(tmp: Path, name: str, *args: str) -> np.ndarray:
    out = tmp / f"{name}.json"
    main(["trace-routing", "moe-tiny", "--seq-len", str(SEQ_LEN), "--global-batch", str(GLOBAL_BATCH),
          "--out", str(out), *args])
    return RoutingTrace.load_file(out).load_array


@pytest.fixture(scope="module")
def program(tmp_path_factory):
    root = tmp_path_factory.mktemp("routing_program")
    for name, strategy in (("ep", "dp=2,ep=2"), ("ep_mbs1", "dp=2,ep=2,mbs=1")):
        emit(make_plan("moe-tiny", 2, strategy), root / name, "cpu")
    common = ["--steps", "1", "--timeout", "60"]
    jobs = [{"name": "sample", "dir": str(root / "ep"), "args": common},  # train.py's default data
            {"name": "sample_mbs1", "dir": str(root / "ep_mbs1"), "args": common},
            {"name": "synthetic", "dir": str(root / "ep"), "args": [*common, "--data", "synthetic"]},
            {"name": "seed3", "dir": str(root / "ep"), "args": [*common, "--seed", "3"]}]
    return root, _program_routing(root, jobs, 2)


@pytest.mark.slow
def test_trace_equals_program_first_step(program, tmp_path):
    root, seen = program
    assert seen["sample"].shape == (3, 8) and (seen["sample"].sum(axis=1) == GLOBAL_BATCH * SEQ_LEN * 2).all()
    np.testing.assert_array_equal(_trace(tmp_path, "sample", "--data", "sample"), seen["sample"])
    np.testing.assert_array_equal(seen["sample_mbs1"], seen["sample"])  # micro-batching does not route
    np.testing.assert_array_equal(_trace(tmp_path, "file", "--data", str(root / "ep" / "data" / "sample.bin")),
                                  seen["sample"])
    np.testing.assert_array_equal(_trace(tmp_path, "synthetic", "--data", "synthetic"), seen["synthetic"])
    np.testing.assert_array_equal(_trace(tmp_path, "seed3", "--data", "sample", "--seed", "3"), seen["seed3"])
    # the mismatch this closes: the program's data skews routing far more than random tokens
    skew = seen["sample"].max(axis=1) / seen["sample"].mean(axis=1)
    rand = _trace(tmp_path, "random", "--tokens", str(GLOBAL_BATCH * SEQ_LEN))
    assert skew[0] > 1.6 > (rand.max(axis=1) / rand.mean(axis=1)).max()


def test_default_placement_is_the_priced_one(tmp_path):
    """A plan without a placement runs the experts where a trace is priced (contiguous blocks,
    ``moe_load.contiguous``), so the busiest rank the price sees is the program's."""
    emit(make_plan("moe-tiny", 4, "dp=4,ep=4"), tmp_path / "run", "cpu")
    tree = ast.parse((tmp_path / "run" / "train.py").read_text())
    placement = next(ast.literal_eval(node.value) for node in tree.body if isinstance(node, ast.Assign)
                     and getattr(node.targets[0], "id", "") == "EXPERT_PLACEMENT")
    ranks = contiguous(3, 8, 4)
    for layer, owners in zip(placement, ranks):
        assert [sorted(ids) for ids in layer] == [np.flatnonzero(owners == r).tolist() for r in range(4)]


def test_data_steps_stack_global_batches(tmp_path):
    two = _trace(tmp_path, "two", "--data", "sample", "--steps", "2")
    one = _trace(tmp_path, "one", "--data", "sample", "--global-batch", str(2 * GLOBAL_BATCH))
    np.testing.assert_array_equal(two, one)  # the window stream does not depend on the batch split
    assert (two.sum(axis=1) == 2 * GLOBAL_BATCH * SEQ_LEN * 2).all()


@pytest.mark.parametrize("args, message", [
    (["--data", "sample", "--tokens", "64"], "not both"),
    (["--data", "/no/such/tokens.bin"], "no such file"),
])
def test_data_errors(tmp_path, capsys, args, message):
    with pytest.raises(SystemExit) as exc:
        main(["trace-routing", "moe-tiny", "--out", str(tmp_path / "t.json"), *args])
    assert exc.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "t.json").exists()
