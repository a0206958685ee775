"""Generated programs run with torchrun on CPU/gloo and match a single-process run.

Every case is emitted from a small ``Plan`` (tests/helpers_plans.py), run for 3 steps, and
its logged losses (mean over the global batch) compared with one process training the same
model on the same data with the same AdamW (rtol 1e-4, fp32). A torchrun launch costs
6-10 s, so all programs of one world size run inside one launch (tests/codegen_harness.py):
one launch with 2 ranks, one with 4.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers_plans import make_plan, parse_steps, reference_losses

from autopar.codegen.emit import emit

pytestmark = pytest.mark.slow

STEPS = 3
RTOL = 1e-4
HARNESS = Path(__file__).with_name("codegen_harness.py")
TORCHRUN = Path(sys.executable).with_name("torchrun")
# a non-trivial placement: neither round-robin nor contiguous, different in every MoE layer
PLACEMENT = [[[0, 3, 5, 6], [1, 2, 4, 7]], [[7, 6, 5, 4], [3, 2, 1, 0]], [[0, 1, 2, 3], [4, 5, 6, 7]]]
TIED = {"spec_update": {"tie_embeddings": True}}

# name -> (model, strategy, make_plan kwargs)
CASES_2 = {
    "dp": ("gpt-tiny", "dp=2", {}),
    "zero1": ("gpt-tiny", "dp=2,zero=1", {}),
    "zero2": ("gpt-tiny", "dp=2,zero=2", {}),
    "fsdp": ("gpt-tiny", "dp=2,zero=3", {}),
    "tp_sp": ("llama-tiny", "tp=2,sp=1", {}),
    "pp_1f1b": ("gpt-tiny", "pp=2,mbs=2", {}),
    "pp_interleaved": ("llama-tiny", "pp=2,vpp=2,schedule=interleaved,mbs=2", {}),
    "cp": ("llama-tiny", "cp=2", {}),
    "ep": ("moe-tiny", "dp=2,ep=2", {"expert_placement": PLACEMENT}),
    "ac": ("llama-tiny", "dp=2,zero=2", {"layer_recompute": ["full", "selective", "none", "selective"]}),
    "mla_tp": ("deepseek-tiny", "tp=2,sp=1,recompute=selective", {}),
    "custom_fsdp": ("helpers_plans:tiny_custom_lm", "dp=2,zero=3,recompute=full", {}),
}
CASES_4 = {
    "dp_tp": ("gpt-tiny", "dp=2,tp=2,sp=1", {}),
    "tp_pp": ("llama-tiny", "tp=2,pp=2,mbs=2", {}),
    "dp_pp": ("gpt-tiny", "dp=2,pp=2,mbs=1", TIED),  # tied embeddings across the pipeline ends
    "dp_ep": ("moe-tiny", "dp=4,ep=2", {"expert_placement": PLACEMENT}),
    "cp_tp_fsdp": ("llama-tiny", "cp=2,tp=2,sp=1,zero=3", {}),
    "ep_pp_fsdp": ("moe-tiny", "dp=2,ep=2,pp=2,zero=3,mbs=2", {"expert_placement": PLACEMENT}),
}
# checkpoint saved at step 1 and resumed for steps 2-3 (step 3's loss depends on the loaded optimizer
# moments), against the uninterrupted 3-step run, whose single-process reference the cases share
CKPT_2 = {
    "ckpt_zero1": ("gpt-tiny", "dp=2,zero=1", {}),
    "ckpt_ep": ("moe-tiny", "dp=2,ep=2", {}),
    "ckpt_pp": ("llama-tiny", "pp=2,vpp=2,schedule=interleaved,mbs=2", {}),
}
CKPT_4 = {"ckpt_dp_tp_fsdp": ("llama-tiny", "dp=2,tp=2,sp=1,zero=3", {})}
# the uninterrupted run of a checkpoint case: the plain case with the same plan where there is one (the
# same program with the same arguments), else a job of its own
FULL_RUN = {name: next((c for c, same in cases.items() if same == case), f"{name}/full")
            for cases, ckpts in ((CASES_2, CKPT_2), (CASES_4, CKPT_4)) for name, case in ckpts.items()}
DATA_CASE = ("gpt-tiny", "dp=2,zero=3", {})


def _jobs_for(root: Path, world: int, cases: dict, ckpts: dict, data: Path | None) -> list[dict]:
    jobs = []
    # constant lr, no clipping, uniform tokens: the reference run (schedule and clipping: test_train_program.py)
    base = ["--lr", "1e-2", "--timeout", "60", "--data", "synthetic", "--warmup-steps", "0", "--lr-decay", "constant",
            "--grad-clip", "0"]
    for name, (model, strategy, kw) in cases.items():
        emit(make_plan(model, world, strategy, **kw), root / name, "cpu")
        jobs.append({"name": name, "dir": str(root / name), "args": ["--steps", str(STEPS), *base]})
    for name, (model, strategy, kw) in ckpts.items():
        emit(make_plan(model, world, strategy, **kw), root / name, "cpu")
        ck = ["--ckpt-dir", str(root / name / "ckpt")]
        runs = {f"{name}/save": ["--steps", "1", "--ckpt-every", "1", *ck],
                f"{name}/resume": ["--steps", str(STEPS), "--resume", *ck], f"{name}/full": ["--steps", str(STEPS)]}
        jobs += [{"name": k, "dir": str(root / name), "args": [*v, *base]} for k, v in runs.items()
                 if not k.endswith("/full") or FULL_RUN[name] == k]  # a plain case's run is not repeated
    if data is not None:
        model, strategy, kw = DATA_CASE
        emit(make_plan(model, world, strategy, **kw), root / "data", "cpu")
        jobs.append({"name": "data", "dir": str(root / "data"),
                     "args": ["--steps", str(STEPS), *base, "--data", str(data), "--data-dtype", "int32"]})
    return jobs


def _launch(root: Path, world: int, jobs: list[dict]) -> dict[str, dict]:
    """One torchrun launch running every job; returns {job name: {step: fields}}."""
    spec = root / "jobs.json"
    spec.write_text(json.dumps(jobs))
    # the user-module case imports its factory from this folder
    path = os.pathsep.join(filter(None, [str(Path(__file__).parent), os.environ.get("PYTHONPATH")]))
    env = dict(os.environ, OMP_NUM_THREADS="1", HARNESS_TIMEOUT="60", PYTHONPATH=path)
    proc = subprocess.run([str(TORCHRUN), "--standalone", f"--nproc-per-node={world}", str(HARNESS), str(spec)],
                          capture_output=True, text=True, timeout=420, env=env)
    out = proc.stdout
    results = {}
    for job in jobs:
        name = re.escape(job["name"])
        m = re.search(f"=== BEGIN {name}\n(.*?)=== END {name}\n", out, re.S)
        results[job["name"]] = parse_steps(m.group(1)) if m else None
    if proc.returncode:
        failed = re.findall(r"=== FAILED (.*)", out)
        tail = (out + proc.stderr)[-3000:]
        results["__error__"] = f"torchrun exited {proc.returncode}; failed: {failed}\n{tail}"
    return results


def _token_file(root: Path) -> Path:
    path = root / "tokens.bin"
    np.random.default_rng(0).integers(0, 512, 5000, dtype=np.int32).tofile(path)
    return path


@pytest.fixture(scope="module")
def runs_2(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs2")
    data = _token_file(root)
    return _launch(root, 2, _jobs_for(root, 2, CASES_2, CKPT_2, data)) | {"__data__": data}


@pytest.fixture(scope="module")
def runs_4(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs4")
    return _launch(root, 4, _jobs_for(root, 4, CASES_4, CKPT_4, None))


_REFS: dict = {}


def _reference(model: str, kw: dict, steps: int = STEPS, data=None) -> list[float]:
    key = (model, json.dumps(kw.get("spec_update")), steps, str(data))
    if key not in _REFS:
        _REFS[key] = reference_losses(model, steps, spec_update=kw.get("spec_update"), data=data)
    return _REFS[key]


def _losses(results: dict, name: str, steps) -> list[float]:
    rows = results.get(name)
    assert rows is not None, f"{name} did not run: {results.get('__error__', 'no output')}"
    assert all(s in rows for s in steps), f"{name}: logged steps {sorted(rows)}, expected {list(steps)}"
    return [rows[s]["loss"] for s in steps]


def _check_case(results: dict, name: str, case) -> None:
    model, _, kw = case
    got = _losses(results, name, range(1, STEPS + 1))
    ref = _reference(model, kw)
    np.testing.assert_allclose(got, ref, rtol=RTOL, err_msg=f"{name}: losses {got} vs single process {ref}")
    for row in results[name].values():
        assert row["step_time_s"] > 0 and row["peak_mem_bytes"] > 0


@pytest.mark.parametrize("name", list(CASES_2))
def test_two_ranks_match_single_process(runs_2, name):
    _check_case(runs_2, name, CASES_2[name])


@pytest.mark.parametrize("name", list(CASES_4))
def test_four_ranks_match_single_process(runs_4, name):
    _check_case(runs_4, name, CASES_4[name])


def _check_resume(results: dict, name: str, case) -> None:
    saved = _losses(results, f"{name}/save", [1])
    resumed = results[f"{name}/resume"]
    assert resumed is not None and sorted(resumed) == [2, 3], f"{name}: resume logged {resumed}"
    full = _losses(results, FULL_RUN[name], [1, 2, 3])
    np.testing.assert_allclose(saved, full[:1], rtol=1e-6)
    np.testing.assert_allclose([resumed[2]["loss"], resumed[3]["loss"]], full[1:], rtol=1e-6)
    np.testing.assert_allclose(full, _reference(case[0], case[2]), rtol=RTOL)


@pytest.mark.parametrize("name", list(CKPT_2))
def test_checkpoint_resume_two_ranks(runs_2, name):
    _check_resume(runs_2, name, CKPT_2[name])


@pytest.mark.parametrize("name", list(CKPT_4))
def test_checkpoint_resume_four_ranks(runs_4, name):
    _check_resume(runs_4, name, CKPT_4[name])


def test_token_file_data_matches_single_process(runs_2):
    got = _losses(runs_2, "data", range(1, STEPS + 1))
    ref = _reference(DATA_CASE[0], {}, data=(str(runs_2["__data__"]), "int32"))
    np.testing.assert_allclose(got, ref, rtol=RTOL)


def test_sharding_lowers_peak_memory(runs_2):
    # live tensor bytes (the CPU tracker): ZeRO-3 < ZeRO-2 < ZeRO-1 < DDP for the same model
    peak = {n: max(r["peak_mem_bytes"] for r in runs_2[n].values()) for n in ("dp", "zero1", "zero2", "fsdp")}
    assert peak["fsdp"] < peak["zero2"] < peak["zero1"] < peak["dp"], peak
