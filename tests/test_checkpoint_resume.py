"""Checkpoints continue under another plan (issue 16) and survive kills and requeues (issue 14).

Emitted programs run on CPU/gloo inside grouped torchrun launches (tests/codegen_harness.py):

- launch 1, 4 ranks: plan A (dp2 x tp2 + sp, ZeRO-1) trains 4 steps, checkpointing at 2 and 4:
  the uninterrupted run. Plan C (FSDP dp4) resumes A's step-2 checkpoint. A MoE run on ep2
  checkpoints at 2 and 4 and an ep4 program with another expert placement resumes step 2.
- launch 2, 2 ranks: plan B (pp2, 1F1B) resumes A's step-2 checkpoint; plan D (ZeRO-2 dp2)
  trains 4 steps uninterrupted, then again with a kill during the save of step 4.
- launch 3, 2 ranks: the killed run restarts (``--resume auto``, as a requeue does) and goes on
  from step 2, the last complete one (the half-written step-4 folder is removed, never read),
  keeping the newest 1; its losses equal the uninterrupted run's (sampler and RNG state).
  Then a gpt-tiny program asked to resume the MoE checkpoint stops with one line (exit 2).

Two steps after a resume, not one: the first resumed loss only reads the loaded weights, the
second also depends on the loaded optimizer moments and LR schedule. Resumed losses at steps
3-4 match the uninterrupted run's within rtol 1e-4 (fp32 reduction order differs between
plans); a restart under the same plan matches to the printed digits.
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
from helpers_plans import make_plan, parse_steps

from autopar.codegen import runtime_ckpt as rc
from autopar.codegen.emit import emit

HARNESS = Path(__file__).with_name("codegen_harness.py")
TORCHRUN = Path(sys.executable).with_name("torchrun")
RTOL = 1e-4
BASE = ["--lr", "1e-2", "--timeout", "60", "--mem-steps", "1"]
# expert placements [moe layer][ep rank] -> expert ids: ep2, and ep4 arranged differently
EP2 = [[[0, 3, 5, 6], [1, 2, 4, 7]], [[7, 6, 5, 4], [3, 2, 1, 0]], [[0, 1, 2, 3], [4, 5, 6, 7]]]
EP4 = [[[7, 0], [6, 1], [5, 2], [4, 3]], [[0, 4], [1, 5], [2, 6], [3, 7]], [[3, 1], [2, 0], [7, 5], [6, 4]]]
PLANS = {  # name -> (world, model, strategy, make_plan kwargs)
    "A": (4, "gpt-tiny", "dp=2,tp=2,sp=1,zero=1,mbs=2", {}),  # 2 micro-batches: TP steps cost 1 CPU-s here
    "C": (4, "gpt-tiny", "dp=4,zero=3", {}),
    "M2": (4, "moe-tiny", "dp=4,ep=2", {"expert_placement": EP2}),
    "M4": (4, "moe-tiny", "dp=4,ep=4", {"expert_placement": EP4}),
    "B": (2, "gpt-tiny", "pp=2,mbs=2,schedule=1f1b", {}),
    "D": (2, "gpt-tiny", "dp=2,zero=2", {}),
}


def _job(root: Path, name: str, plan: str, *args: str) -> dict:
    return {"name": name, "dir": str(root / plan), "args": [*args, *BASE]}


def _launch(root: Path, world: int, jobs: list[dict], env: dict | None = None, tag: str = "") -> dict:
    """One torchrun launch running ``jobs`` in order; {job name: {step: fields}} plus the raw output."""
    spec = root / f"jobs{world}{tag}.json"
    spec.write_text(json.dumps(jobs))
    path = os.pathsep.join(filter(None, [str(Path(__file__).parent), os.environ.get("PYTHONPATH")]))
    full_env = dict(os.environ, OMP_NUM_THREADS="1", HARNESS_TIMEOUT="60", PYTHONPATH=path, **(env or {}))
    proc = subprocess.run([str(TORCHRUN), "--standalone", f"--nproc-per-node={world}", str(HARNESS), str(spec)],
                          capture_output=True, text=True, timeout=400, env=full_env)
    out = proc.stdout
    results = {"__rc__": proc.returncode, "__out__": out + proc.stderr}
    for job in jobs:
        name = re.escape(job["name"])
        m = re.search(f"=== BEGIN {name}\n(.*?)(=== END {name}\n|$)", out, re.S)
        results[job["name"]] = (parse_steps(m.group(1)), m.group(1)) if m else (None, "")
    return results


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    for name, (world, model, strategy, kw) in PLANS.items():
        emit(make_plan(model, world, strategy, **kw), root / name, "cpu")
    a2, m2 = str(root / "ckA" / "step-00000002"), str(root / "ckM" / "step-00000002")
    jobs4 = [
        _job(root, "A", "A", "--steps", "4", "--ckpt-every", "2", "--ckpt-dir", str(root / "ckA")),
        _job(root, "C<-A", "C", "--steps", "4", "--resume", a2, "--ckpt-dir", str(root / "ckC")),
        _job(root, "M2", "M2", "--steps", "4", "--ckpt-every", "2", "--ckpt-dir", str(root / "ckM")),
        _job(root, "M4<-M2", "M4", "--steps", "4", "--resume", m2, "--ckpt-dir", str(root / "ckM4")),
    ]
    out = {"__root__": root}
    first = _launch(root, 4, jobs4)
    ckd = ["--ckpt-every", "2", "--ckpt-dir", str(root / "ckD")]
    jobs2 = [
        _job(root, "B<-A", "B", "--steps", "4", "--resume", a2, "--ckpt-dir", str(root / "ckB")),
        _job(root, "D", "D", "--steps", "4", "--ckpt-dir", str(root / "ckD-none")),
        _job(root, "D/killed", "D", "--steps", "4", *ckd),  # the launch dies in the save of step 4
    ]
    second = _launch(root, 2, jobs2, env={"AUTOPAR_CKPT_CRASH_AT_STEP": "4"})
    out["__after_kill__"] = sorted(p.name for p in (root / "ckD").iterdir()) if (root / "ckD").exists() else []
    third = _launch(root, 2, [_job(root, "D/restart", "D", "--steps", "4", "--ckpt-keep", "1", *ckd),
                              # the last job: a checkpoint of another model stops the program (exit 2)
                              _job(root, "D<-M2", "D", "--steps", "4", "--resume", m2, "--ckpt-dir", str(root / "x"))],
                    tag="restart")
    return out | {"first": first, "second": second, "third": third}


def _losses(res: dict, name: str, steps) -> list[float]:
    rows, text = res.get(name, (None, ""))
    assert rows and all(s in rows for s in steps), f"{name}: logged {rows}; rc={res.get('__rc__')}\n" \
                                                   f"{text[-1500:]}\n{res.get('__out__', '')[-3000:]}"
    return [rows[s]["loss"] for s in steps]


@pytest.mark.slow
@pytest.mark.parametrize("launch,name,ref", [("first", "C<-A", "A"), ("second", "B<-A", "A"),
                                             ("first", "M4<-M2", "M2")])
def test_resume_under_another_plan_continues_the_trajectory(runs, launch, name, ref):
    ref_launch = "first"
    want = _losses(runs[ref_launch], ref, [3, 4])
    got = _losses(runs[launch], name, [3, 4])
    rows, text = runs[launch][name]
    assert sorted(rows) == [3, 4] and "resumed from" in text and "step 2" in text, text[:500]
    np.testing.assert_allclose(got, want, rtol=RTOL, err_msg=f"{name} vs uninterrupted {ref}")


@pytest.mark.slow
def test_killed_during_save_restarts_from_the_previous_complete_checkpoint_exactly(runs):
    assert runs["second"]["__rc__"] != 0, "the kill during the step-4 save did not happen"
    assert "step-00000002" in runs["__after_kill__"] and "step-00000004.tmp" in runs["__after_kill__"]
    rows, text = runs["third"]["D/restart"]
    assert "step-00000002 (step 2" in text, text[:500]
    assert sorted(rows or {}) == [3, 4], text
    # a requeue after step 2 under the same plan: the same numbers to the printed digit (sampler, RNG, optimizer)
    assert [rows[s]["loss"] for s in (3, 4)] == _losses(runs["second"], "D", [3, 4])
    left = sorted(p.name for p in (runs["__root__"] / "ckD").iterdir())
    assert left == ["step-00000004"], left  # the tmp folder removed, step 2 rotated out (--ckpt-keep 1)


@pytest.mark.slow
def test_checkpoint_records_plan_step_and_identity(runs):
    root = runs["__root__"]
    assert [p.name for p in rc.complete_checkpoints(root / "ckM")] == ["step-00000002", "step-00000004"]
    meta = rc.read_meta(root / "ckA" / "step-00000002")
    assert meta["step"] == 2 and meta["world"] == 4
    assert meta["plan"]["strategy"]["tp"] == 2 and meta["model"]["name"] == "gpt-tiny"
    assert meta["model"]["vocab"] == 512 and meta["model"]["n_params"] > 0


@pytest.mark.slow
def test_a_checkpoint_of_another_model_stops_the_program_with_one_line(runs):
    out = runs["third"]["__out__"]
    # torchrun prefixes a worker's stderr lines with "[rankN]:"
    lines = [re.sub(r"^\[rank\d+\]:\s?", "", line) for line in out.splitlines()]
    lines = [line for line in lines if line.startswith("error: checkpoint:")]
    assert len(lines) == 1 and "model 'moe-tiny' differs from this program's 'gpt-tiny'" in lines[0], out[-2000:]
    assert "SystemExit: 2" in out and not (runs["__root__"] / "x").exists()


# ----- no launch ----------------------------------------------------------------------------
def test_half_written_checkpoints_are_never_found(tmp_path):
    (tmp_path / "step-00000002").mkdir()
    (tmp_path / "step-00000002" / rc.MARKER).write_text("ok\n")
    (tmp_path / "step-00000004.tmp").mkdir()  # killed before the rename
    (tmp_path / "step-00000004.tmp" / rc.MARKER).write_text("ok\n")
    (tmp_path / "step-00000006").mkdir()  # renamed by hand, no marker
    assert rc.latest_checkpoint(tmp_path) == tmp_path / "step-00000002"
    assert rc.latest_checkpoint(tmp_path / "absent") is None
    with pytest.raises(rc.CheckpointMismatch, match="not a complete checkpoint"):
        rc.read_meta(tmp_path / "step-00000006")


def test_another_model_is_refused_with_one_line():
    import torch

    def ident(vocab, hidden=8, name="m"):
        model = torch.nn.Sequential(torch.nn.Embedding(vocab, hidden), torch.nn.Linear(hidden, vocab))
        return rc.model_identity(model, name, vocab)

    rc.check_identity(ident(64), ident(64))
    for other, field in ((ident(64, name="x"), "model"), (ident(96), "vocabulary size"),
                         (ident(64, hidden=16), "parameter count")):
        with pytest.raises(rc.CheckpointMismatch) as err:
            rc.check_identity(other, ident(64))
        assert field in str(err.value) and "\n" not in str(err.value)
