"""Elastic re-plan (planner/elastic.py, `plan --from`) and the checkpoint commands
(`inspect-checkpoint`, `reshard`). The gloo runs that resume under another plan are in
tests/test_checkpoint_resume.py."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from helpers_plans import make_plan

from autopar.core.strategy import Strategy
from autopar.cost_models.session import Inputs, build_cost_model
from autopar.planner import elastic


@pytest.fixture(scope="module")
def cm():
    return build_cost_model(Inputs(model="gpt-tiny", gpu="cpu", gpus_per_node=4, seq_len=32, dtype="fp32"))[0]


def _layout(cm, text: str, world: int) -> elastic.Layout:
    s = Strategy.parse(text).resolve(world, 8)
    return elastic.Layout(s, elastic.even_stages(cm.num_layers, s.pp * s.vpp), world)


def test_same_layout_moves_nothing(cm):
    lay = _layout(cm, "dp=2,tp=2,zero=1", 4)
    move = elastic.state_move(cm, lay, lay, lost=[])
    assert move.from_peers_bytes == 0 and move.from_checkpoint_bytes == 0


def test_replicated_state_survives_in_peers(cm):
    move = elastic.state_move(cm, _layout(cm, "dp=4", 4), _layout(cm, "dp=2", 2), lost=[2, 3])
    assert move.from_peers_bytes == 0 and move.from_checkpoint_bytes == 0  # every GPU held everything


def test_sharded_state_of_lost_gpus_comes_from_the_checkpoint(cm):
    # ZeRO-3 over 4 -> 2 ranks, GPUs 2 and 3 lost: rank 0 (GPU 0, held [0, 1/4)) needs [0, 1/2):
    # [1/4, 1/2) from GPU 1; rank 1 (GPU 1) needs [1/2, 1), held only by the lost GPUs
    move = elastic.state_move(cm, _layout(cm, "dp=4,zero=3", 4), _layout(cm, "dp=2,zero=3", 2), lost=[2, 3])
    total = move.total_state_bytes
    assert move.per_rank[0].from_peers_bytes == pytest.approx(total / 4)
    assert move.per_rank[0].from_checkpoint_bytes == pytest.approx(0)
    assert move.per_rank[1].from_peers_bytes == pytest.approx(0)
    assert move.per_rank[1].from_checkpoint_bytes == pytest.approx(total / 2)


def test_tp_to_pp_moves_the_layers_a_stage_gains(cm):
    # tp2 (each GPU half of every layer) -> pp2 (each GPU every tensor of half the layers): each
    # rank fetches the other half of its layers from its surviving peer, nothing from the checkpoint
    move = elastic.state_move(cm, _layout(cm, "tp=2", 2), _layout(cm, "pp=2,mbs=4", 2), lost=[])
    assert move.from_checkpoint_bytes == 0
    assert 0 < move.from_peers_bytes < move.total_state_bytes


def test_choose_prefers_least_state_within_two_percent():
    def opt(t, moved):
        cand = type("C", (), {"step_time_s": t})()
        return elastic.ElasticOption(cand, elastic.StateMove([elastic.RankFetch(0, 0, moved, 0.0)], 1.0, []))

    assert elastic.choose([opt(1.0, 5.0), opt(1.015, 1.0), opt(1.05, 0.0)]) == 1
    assert elastic.choose([opt(1.0, 5.0), opt(1.03, 1.0)]) == 0


def test_lost_ranks():
    assert elastic.lost_ranks(16, 4, 12, None) == [12, 13, 14, 15]
    assert elastic.lost_ranks(16, 4, 12, [1]) == [4, 5, 6, 7]
    with pytest.raises(Exception, match="--lost-nodes"):
        elastic.lost_ranks(16, 4, 12, [9])


def test_plan_from_keeps_the_global_batch(run_cli, tmp_path):
    old = tmp_path / "old.json"
    make_plan("gpt-tiny", 4, "dp=2,tp=2,zero=1").save(old)
    code, out, err = run_cli("plan", "--from", str(old), "--gpus", "2", "--json", "--out", str(tmp_path / "new.json"))
    assert code == 0, err
    data = json.loads(out)
    assert data["global_batch"] == 8 and data["new"]["gpus"] == 2 and data["old"]["gpus"] == 4
    assert data["old"]["step_time_s"] > 0 and data["new"]["step_time_s"] > 0
    move = data["new"]["move"]
    assert len(move["per_rank"]) == 2 and move["lost_gpus"] == [2, 3]
    assert move["from_checkpoint_bytes"] > 0  # tp halves held only by the lost GPUs
    new = json.loads((tmp_path / "new.json").read_text())
    assert new["strategy"]["global_batch"] == 8 and new["cluster"]["gpus_per_node"] * new["cluster"]["nodes"] == 2


def test_plan_from_bad_sizes_exit_2(run_cli, tmp_path):
    old = tmp_path / "old.json"
    make_plan("gpt-tiny", 4, "dp=4").save(old)
    for args in (["--gpus", "2", "--nodes", "1"], ["--gpus", "6"], []):
        code, out, err = run_cli("plan", "--from", str(old), *args)
        assert code == 2 and len(err.strip().splitlines()) == 1, (args, err)


# ----- inspect-checkpoint and reshard on a checkpoint written by one process ---------------------
WRITER = textwrap.dedent("""
    import sys, torch, torch.distributed as dist
    sys.path.insert(0, sys.argv[3])
    from helpers_plans import make_plan
    from autopar.codegen import runtime_ckpt as rc
    from autopar.profiles.models import build_model
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    plan = make_plan("gpt-tiny", 1, "dp=1")
    plan.save(sys.argv[2])
    model = build_model(plan.model, "cpu")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.zeros(2, 8, dtype=torch.long)).sum().backward()
    opt.step()
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    ident = rc.model_identity(build_model(plan.model, "meta"), plan.model.name, plan.model.vocab)
    mgr = rc.CheckpointManager(sys.argv[1], 5, plan_path=sys.argv[2], identity=ident, async_save=False)
    mgr.maybe_save(5, rc.TrainState([model], [opt], [sched]))
    dist.destroy_process_group()
""")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    proc = subprocess.run([sys.executable, "-c", WRITER, str(root / "ck"), str(root / "plan.json"),
                           str(Path(__file__).parent)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return root


def test_inspect_checkpoint(run_cli, ckpt):
    code, out, err = run_cli("inspect-checkpoint", str(ckpt / "ck"))
    assert code == 0, err
    assert "step 5, written by 1 ranks" in out and "gpt-tiny" in out and "dp1" in out
    code, out, err = run_cli("inspect-checkpoint", str(ckpt / "ck"), "--json")
    info = json.loads(out)
    assert info["step"] == 5 and info["sections"]["model"]["tensors"] > 0 and info["sections"]["optim"]["tensors"] > 0


def test_reshard_refuses_another_model_or_vocabulary(run_cli, ckpt, tmp_path):
    for name, plan, field in (("llama", make_plan("llama-tiny", 2, "tp=2"), "model"),
                              ("vocab", make_plan("gpt-tiny", 2, "tp=2", spec_update={"vocab": 256}), "vocabulary")):
        plan.save(tmp_path / f"{name}.json")
        code, out, err = run_cli("reshard", str(ckpt / "ck"), "--to", str(tmp_path / f"{name}.json"),
                                 "--out", str(tmp_path / name))
        assert code == 2 and field in err and len(err.strip().splitlines()) == 1, err
        assert not (tmp_path / name).exists()  # nothing written


def test_reshard_writes_a_complete_checkpoint_for_the_target(run_cli, ckpt, tmp_path):
    from autopar.codegen import runtime_ckpt as rc

    make_plan("gpt-tiny", 2, "pp=2,mbs=2").save(tmp_path / "pp.json")
    code, out, err = run_cli("reshard", str(ckpt / "ck"), "--to", str(tmp_path / "pp.json"),
                             "--out", str(tmp_path / "o"))
    assert code == 0, err
    found = rc.latest_checkpoint(tmp_path / "o")
    meta = rc.read_meta(found)
    assert found.name == "step-00000005" and meta["plan"]["strategy"]["pp"] == 2 and meta["resharded_from"]
    assert not list((tmp_path / "o").glob("*.tmp"))
