"""The emitted programs do what the cost model priced (issue 11, item 2): optimizer offload,
ZeRO-3 under a pipeline, ZeRO-1 with tp/ep/pp, bf16 widths, expert placement, ep with tp and
etp. Each test builds the program's model parts with its own ``build()`` (or the runtime's
``apply_*``) in one process on a fake process group of several ranks, and reads the set-up:
FSDP2 policies, optimizer kind, parameter dtypes, the experts each rank keeps. Numerics of
the same strategies against one process run in ``benchmarks/contract.py`` (CI subset:
tests/test_contract.py)."""

from __future__ import annotations

import json
import runpy
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
from helpers_plans import make_plan, tiny_spec

from autopar.codegen import runtime as rt
from autopar.codegen.emit import emit
from autopar.codegen.runtime_zero1 import ShardedAdamW


@pytest.fixture
def fake_world(request):
    """A fake process group of ``world`` ranks (this process is rank 0): meshes and FSDP2 set-up
    run, collectives return immediately."""
    from torch.testing._internal.distributed.fake_pg import FakeStore

    def start(world: int):
        dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world)

    yield start
    if dist.is_initialized():
        dist.destroy_process_group()


def _fsdp_policies(module):
    from torch.distributed.fsdp import fully_shard

    group = fully_shard.state(module)._fsdp_param_group
    return group.offload_policy, group.mp_policy, group.post_forward_mesh_info is not None


def _build_emitted(plan, tmp_path: Path, world: int):
    """Emit ``plan`` and run its ``build()`` (the program's set-up) in this process."""
    out = tmp_path / "run"
    emit(plan, out, "cpu")
    prog = runpy.run_path(str(out / "train.py"), run_name="emitted")
    rt_mod = sys.modules["autopar_rt.runtime"]
    g = prog
    mesh = rt_mod.build_mesh("cpu", pp=g["PP"], dp=g["DP"], cp=g["CP"], tp=g["TP"], ep=g["EP"], etp=g["ETP"])
    spec = rt_mod.load_spec(out / "plan.json")
    parts, _, _ = g["build"](SimpleNamespace(seed=0), torch.device("cpu"), mesh, spec)
    return parts, (out / "train.py").read_text()


def test_offload_plan_emits_cpu_offload_policy(fake_world, tmp_path):
    """Priced: parameter shards, gradients and AdamW states on the host (estimate.rank_memory,
    offload_step_time). Emitted: FSDP2 CPUOffloadPolicy on every sharded module."""
    fake_world(2)
    plan = make_plan("gpt-tiny", 2, "dp=2,zero=3,offload=1")
    parts, text = _build_emitted(plan, tmp_path, 2)
    assert "offload=True" in text
    for mod in [parts[0], *parts[0].layers.values()]:
        offload, _, reshard = _fsdp_policies(mod)
        assert type(offload).__name__ == "CPUOffloadPolicy" and reshard
    assert all(p.to_local().device.type == "cpu" for p in parts[0].parameters())


def test_offload_without_zero3_still_shards_to_host(fake_world):
    """CPUOffloadPolicy needs FSDP2's shards: offload at zero 0/1 runs fully_shard without resharding
    after forward (priced so: gathered parameters on the device, shards on the host)."""
    fake_world(2)
    mesh = rt.build_mesh("cpu", dp=2)
    model = rt.apply_dp(rt.build_meta_model(tiny_spec("gpt-tiny")), mesh, zero_stage=1, offload=True)
    offload, _, reshard = _fsdp_policies(model.layers["0"])
    assert type(offload).__name__ == "CPUOffloadPolicy" and not reshard


def test_zero3_with_pipeline_reshards_every_microbatch(fake_world):
    """ZeRO-3 under pp reshards after forward, and the pipeline may not turn per-micro-batch
    resharding / reduce-scatter off (which would hold whole parameters and gradients)."""
    fake_world(4)
    mesh = rt.build_mesh("cpu", pp=2, dp=2)
    model = rt.apply_dp(rt.build_meta_model(tiny_spec("gpt-tiny")), mesh, zero_stage=3, pipeline=True)
    assert _fsdp_policies(model.layers["0"])[2]
    model.set_requires_gradient_sync(False)  # what torch.distributed.pipelining calls per micro-batch
    model.set_reshard_after_backward(False)
    state = model.layers["0"]._get_fsdp_state()._fsdp_param_group
    assert state.reduce_grads and state.reshard_after_backward


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_zero1_with_tp_is_zero1(fake_world, dtype):
    """ZeRO-1 with tensor parallel: whole (DTensor) parameters, no FSDP wrapper; the optimizer
    holds fp32 master slices of 1/dp of each local tensor; bf16 parameters in bf16."""
    fake_world(4)
    mesh = rt.build_mesh("cpu", dp=2, tp=2)
    spec = tiny_spec("gpt-tiny")
    model = rt.apply_tp(rt.build_meta_model(spec), mesh)
    rt.materialize([model], spec, 0, "cpu")
    model = rt.apply_dp(model, mesh, zero_stage=1, tp=2, dtype=dtype)
    assert rt.dp_mode(1, 2, True, False, False, False, dtype) == "zero1"
    (opt,) = rt.make_optimizer([model], 1e-3, mesh=mesh)
    assert isinstance(opt, ShardedAdamW) and not hasattr(model, "_get_fsdp_state")
    want = torch.float32 if dtype == "fp32" else torch.bfloat16
    assert {p.dtype for p in model.parameters()} == {want}
    local = sum(p.to_local().numel() if hasattr(p, "to_local") else p.numel() for p in model.parameters())
    master = sum(m.numel() for ms in opt.masters for m in ms)
    assert all(m.dtype == torch.float32 for ms in opt.masters for m in ms)
    assert local / 2 <= master <= local / 2 + 2 * len(list(model.parameters()))  # 1/dp, chunks rounded up


def test_bf16_runs_fsdp2_mixed_precision(fake_world):
    """bf16 plans: FSDP2 MixedPrecisionPolicy with bf16 parameters and reductions (2-byte
    collectives, as priced), fp32 shards for the optimizer; no autocast."""
    fake_world(2)
    mesh = rt.build_mesh("cpu", dp=2)
    for zero in (0, 3):
        model = rt.apply_dp(rt.build_meta_model(tiny_spec("gpt-tiny")), mesh, zero_stage=zero, dtype="bf16")
        mp = model.layers["0"]._get_fsdp_state()._fsdp_param_group.mp_policy  # replicate (zero 0), fully_shard
        assert mp.param_dtype == torch.bfloat16 and mp.reduce_dtype == torch.bfloat16
    assert isinstance(rt.precision("bf16", torch.device("cpu")), type(rt.precision("fp32", torch.device("cpu"))))


PLACEMENT = [[[0, 3, 5, 6], [1, 2, 4, 7]], [[7, 6, 5, 4], [3, 2, 1, 0]], [[0, 1, 2, 3], [4, 5, 6, 7]]]


def test_program_routes_by_the_priced_placement(fake_world, tmp_path):
    """``plan --placement`` -> Plan.expert_placement -> EXPERT_PLACEMENT in train.py -> the experts
    ep rank 0 keeps in every MoE layer."""
    fake_world(2)
    plan = make_plan("moe-tiny", 2, "dp=2,ep=2", expert_placement=PLACEMENT)
    parts, text = _build_emitted(plan, tmp_path, 2)
    assert "EXPERT_PLACEMENT" in text
    model = getattr(parts[0], "module", parts[0])  # fp32 dp: DDP wraps
    kept = [blk.feed_forward.experts.local_expert_ids for blk in model.layers.values()
            if hasattr(blk.feed_forward, "experts")]
    assert kept == [layer[0] for layer in PLACEMENT]


def test_ep_with_tp_and_etp_build(fake_world, tmp_path):
    """ep=2 with tp=2 and etp=2 on 4 ranks: emitted and built; the experts' ffn split over etp."""
    fake_world(4)
    plan = make_plan("moe-tiny", 4, "dp=2,tp=2,ep=2,etp=2")
    parts, _ = _build_emitted(plan, tmp_path, 4)
    experts = next(b.feed_forward.experts for b in parts[0].layers.values() if hasattr(b.feed_forward, "experts"))
    ffn = plan.model.moe_ffn_hidden
    assert experts.w1.to_local().shape[-1] == ffn // 2 and experts.w2.to_local().shape[1] == ffn // 2
    assert len(experts.local_expert_ids) == plan.model.num_experts // 2


@pytest.mark.slow
def test_cli_offload_plan_emits_offload(tmp_path):
    """``autopar plan llama3-70b --offload --out p.json && autopar emit p.json``: the plan offloads,
    so the program does (the apply_dp call of its build step)."""
    from autopar.cli.main import main

    p = tmp_path / "p.json"
    with pytest.raises(SystemExit) as exc:
        main(["plan", "llama3-70b", "--offload", "--top", "1", "--out", str(p)])
        raise SystemExit(0)
    assert exc.value.code in (0, None)
    strategy = json.loads(p.read_text())["strategy"]
    assert strategy["offload_optimizer"]
    with pytest.raises(SystemExit) as exc:
        main(["emit", str(p), "--out", str(tmp_path / "d")])
        raise SystemExit(0)
    assert exc.value.code in (0, None)
    assert "offload=True" in (tmp_path / "d" / "train.py").read_text()
