"""FSDP2's per-unit copies and casts (cost_models/fsdp_copy.py): the byte counts of torch's
``_fully_shard`` source, the program mapping against the emitted program's ``dp_mode``, and the
estimate's term (zero=3 on one GPU is priced slower than the same program under ``replicate``)."""

import itertools
from pathlib import Path

import pytest

from autopar.codegen.runtime_parallel import dp_mode
from autopar.core.strategy import Strategy
from autopar.cost_models import fsdp_copy as fc
from autopar.cost_models.session import Inputs, build_cost_model

LLAMA_GPU = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check_models" / "llama-gpu.json"


def test_gather_bytes_follow_the_source():
    # one rank: MixedPrecisionPolicy cast fp32 -> bf16 (4 + 2) and copy_ into the unsharded param (2 + 2)
    assert fc.gather_copy_bytes(1, 2) == 10
    # 8 ranks: the cast and the copy into the all-gather buffer per shard element, copy-out per element
    assert fc.gather_copy_bytes(8, 2) == pytest.approx((6 + 4) / 8 + 4)
    assert fc.gather_copy_bytes(8, 4) == pytest.approx(8 / 8 + 8)  # fp32: no cast


def test_reduce_bytes_follow_the_source():
    # one rank: chunk_cat copy-in (2 + 2), copy_ in place of the reduce-scatter (2 + 2), cast to fp32 (2 + 4)
    assert fc.reduce_copy_bytes(1, 2, 2, accumulate=False) == 14
    assert fc.reduce_copy_bytes(1, 2, 2, accumulate=True) == 14 + 12
    # torchtitan reduces in fp32: copy-in casts (2 + 4), no cast after the reduce-scatter
    assert fc.reduce_copy_bytes(8, 2, 4, accumulate=True) == pytest.approx(6 + 12 / 8)


def test_step_bytes_count_first_reduce_as_assignment():
    got = fc.step_copy_bytes(1.0, 1, gathers=8, reduces=4, compute_bytes=2, reduce_bytes=2)
    assert got == 8 * 10 + 14 + 3 * 26  # 172 bytes per parameter: zero=3, one rank, 4 micro-batches
    assert fc.step_copy_bytes(1.0, 1, gathers=4, reduces=1, compute_bytes=2, reduce_bytes=2) == 54  # replicate
    assert fc.step_copy_bytes(0.0, 1, 8, 4, 2, 2) == 0.0


def test_fsdp1_has_no_copy_in_or_out():
    assert fc.fsdp1_step_bytes(1.0, 1, 2, 1, fp32_params=False) == 0.0  # one rank: FSDP1 shards nothing
    # bf16 parameters: shard casts only, 1/n
    assert fc.fsdp1_step_bytes(1.0, 8, 2, 1, fp32_params=False) == pytest.approx(2 * 6 / 8 + 6 / 8)
    # fp32 parameters: the whole gradient cast to the bf16 reduce dtype, then the shard back
    assert fc.fsdp1_step_bytes(1.0, 8, 2, 2, fp32_params=True) == pytest.approx(2 * (6 + 6 / 8) + 12 / 8)


def _strategy(**kw) -> Strategy:
    return Strategy.model_construct(**kw)   # unvalidated: the program rule reads its fields only


@pytest.mark.parametrize("zero,dp,dtype,offload,tp,pp,ep,etp", list(itertools.product(
    (0, 1, 2, 3), (1, 4), ("fp32", "bf16"), (False, True), (1, 2), (1, 2), (1, 2), (1, 2))))
def test_program_mirrors_the_emitted_dp_mode(zero, dp, dtype, offload, tp, pp, ep, etp):
    """fsdp_copy.program reads the emitted program's own rule: ``runtime_parallel.apply_dp`` passes DTensor
    weights under tp or etp and expert modules (``runtime_moe._keep_experts``: under ep or etp) to dp_mode."""
    emitted = dp_mode(zero, dp, tp > 1 or etp > 1, ep * etp > 1, pp > 1, offload, dtype)
    want = {"fsdp2": "fsdp2", "replicate": "replicate"}.get(emitted, "none")
    s = _strategy(zero_stage=zero, dp=dp, tp=tp, pp=pp, ep=ep, etp=etp, offload_optimizer=offload)
    assert fc.program("torch", s, dtype) == want


def test_megatron_and_deepspeed_run_no_fsdp2():
    s = _strategy(zero_stage=3, dp=8)
    for runtime in ("megatron", "deepspeed"):
        assert fc.program(runtime, s, "bf16") == "none"
    assert fc.program("torchtitan", s, "bf16") == "fsdp2"


@pytest.fixture(scope="module")
def llama_gpu():
    cm, _spec, _cl, _seq = build_cost_model(Inputs(model=str(LLAMA_GPU), gpu="h100-sxm", gpus_per_node=1,
                                                   seq_len=4096, dtype="bf16"))
    return cm


def test_zero3_on_one_gpu_prices_its_extra_copies(llama_gpu):
    """The GPU check: zero=3 on one H100 ran 41 ms slower than the same program under replicate; the
    estimate prices the difference as the bytes of the re-gathers and per-micro-batch reduces."""
    cm = llama_gpu
    z0, z3 = (cm.estimate(Strategy.parse(f"dp=1,mbs=1,gbs=4,zero={z}").resolve(1)) for z in (0, 3))
    costs = cm.layer_costs(z3.strategy)
    params = sum(costs[i].params_dense for i in cm.blocks)  # the blocks' units (the root unit is not priced)
    assert z3.time["fsdp_copy"] == pytest.approx(cm.timer.membound(172 * params))
    assert z0.time["fsdp_copy"] == pytest.approx(cm.timer.membound(54 * params))
    assert z3.step_time_s - z0.step_time_s == pytest.approx(z3.time["fsdp_copy"] - z0.time["fsdp_copy"])


def test_plain_fp32_program_has_no_copy_term():
    cm, _spec, _cl, _seq = build_cost_model(Inputs(model=str(LLAMA_GPU), gpu="h100-sxm", gpus_per_node=1,
                                                   seq_len=4096, dtype="fp32"))
    e = cm.estimate(Strategy.parse("dp=1,mbs=1,gbs=4,zero=3").resolve(1))  # emitted as the module itself
    assert e.time["fsdp_copy"] == 0.0


def test_megatron_runtime_prices_no_copies():
    cm, _spec, _cl, _seq = build_cost_model(Inputs(model=str(LLAMA_GPU), gpu="h100-sxm", gpus_per_node=8,
                                                   seq_len=4096, dtype="bf16", runtime="megatron"))
    e = cm.estimate(Strategy.parse("dp=8,mbs=1,gbs=32,zero=1").resolve(8))
    assert e.time["fsdp_copy"] == 0.0
