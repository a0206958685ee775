"""``train.py --resume`` of a checkpoint it cannot load: exit 2, one line naming the file (or the field) and the fix,
no traceback, as ``tests/test_bad_input_sweep.py`` asks of every subcommand.

The emitted program resumes through ``runtime_ckpt.CheckpointManager.resume`` (train.py.tmpl: ``ckpt.resume(state,
args.resume)``): each case runs it in-process on a one-rank gloo group, on a copy of one good checkpoint broken one
way (missing, half-written, corrupt metadata / index / shards / train state, another format, another model). The
whole emitted program's refusal of another model's checkpoint runs in tests/test_checkpoint_resume.py (slow).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch import nn

from autopar.codegen import runtime_ckpt as rc

STEP = "step-00000001"


def _state() -> rc.TrainState:
    torch.manual_seed(0)
    part = nn.Sequential(nn.Embedding(16, 8), nn.Linear(8, 16))
    return rc.TrainState([part], [torch.optim.AdamW(part.parameters())])


def _identity(name: str = "tiny") -> dict:
    return rc.model_identity(_state().parts[0], name, 16)


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> Path:
    """One rank's process group for the module and one complete checkpoint (step 1) of ``_state``."""
    root = tmp_path_factory.mktemp("resume-refusals")
    dist.init_process_group("gloo", init_method=f"file://{root / 'store'}", rank=0, world_size=1)
    try:
        rc.CheckpointManager(root / "ck", every=1, identity=_identity(), async_save=False).maybe_save(1, _state())
        yield root / "ck"
    finally:
        dist.destroy_process_group()


def _meta(step: Path, **update) -> None:
    meta = json.loads((step / rc.META).read_text())
    (step / rc.META).write_text(json.dumps({**meta, **update}))


def _truncate_shards(step: Path) -> None:
    for shard in step.glob("*.distcp"):
        shard.write_bytes(shard.read_bytes()[:16])


BREAK = {  # case -> (how the copy is broken, what the one line must name)
    "missing": (None, "does not exist"),
    "no-marker": (lambda s: (s / rc.MARKER).unlink(), "no COMPLETE marker"),
    "empty-ckpt-dir": (lambda s: shutil.rmtree(s), "nor a folder holding one"),
    "meta-missing": (lambda s: (s / rc.META).unlink(), "meta.json is missing"),
    "meta-corrupt": (lambda s: (s / rc.META).write_text("{bad"), "meta.json is not valid JSON"),
    "meta-list": (lambda s: (s / rc.META).write_text("[1]"), "meta.json holds no JSON object"),
    "index-missing": (lambda s: (s / ".metadata").unlink(), ".metadata"),
    "train-missing": (lambda s: (s / rc.TRAIN_STATE).unlink(), "train_state.pt"),
    "train-corrupt": (lambda s: (s / rc.TRAIN_STATE).write_bytes(b"not a pickle"), "train_state.pt does not load"),
    "shards-truncated": (_truncate_shards, "its tensors do not load"),
    "format": (lambda s: _meta(s, format=99), "format 99"),
    "other-model": (lambda s: _meta(s, model=_identity("other")), "model 'other'"),
}


@pytest.mark.parametrize("case", list(BREAK))
def test_resume_refuses_in_one_line_naming_the_file_and_the_fix(good, tmp_path, capsys, case):
    breaks, field = BREAK[case]
    copy = tmp_path / "ck"
    if breaks is not None:
        shutil.copytree(good, copy)
        breaks(copy / STEP)
    arg = str(copy if case == "empty-ckpt-dir" else copy / STEP)
    manager = rc.CheckpointManager(tmp_path / "own", every=0, identity=_identity(), async_save=False)
    with pytest.raises(SystemExit) as exc:
        manager.resume(_state(), arg)
    err = capsys.readouterr().err
    assert exc.value.code == 2, err
    assert err.startswith("error: checkpoint: ") and err.count("\n") == 1 and "Traceback" not in err, err
    assert field in err and "fix: " in err, err
    assert str(copy) in err or case in ("format", "other-model"), err   # the fields name themselves


def test_auto_refuses_a_corrupt_newest_checkpoint_and_resumes_a_good_one(good, tmp_path, capsys):
    """``--resume auto`` (a requeue) loads the newest complete checkpoint in --ckpt-dir: a good one resumes its
    step; one broken by hand stops the program in one line rather than training from scratch."""
    copy = tmp_path / "ck"
    shutil.copytree(good, copy)
    manager = rc.CheckpointManager(copy, every=0, identity=_identity(), async_save=False)
    assert manager.resume(_state(), "auto") == 1
    (copy / STEP / rc.META).write_text("{bad")
    with pytest.raises(SystemExit) as exc:
        manager.resume(_state(), "auto")
    err = capsys.readouterr().err.splitlines()
    assert exc.value.code == 2 and err[-1].startswith(f"error: checkpoint: {copy / STEP}: meta.json"), err
