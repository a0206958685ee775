"""The cost model's activation memory against Korthikanti et al. 2022 Table 2, through the
same code path estimate() uses (graph capture -> templates -> saved_bytes under a sharding)."""

import pytest

from autopar.core.model_spec import ModelSpec
from autopar.cost_models.layer_model import Shards, saved_bytes
from autopar.cost_models.memory import korthikanti_activation_bytes
from autopar.cost_models.templates import build_templates

S, B, H, A = 128, 2, 256, 8


@pytest.fixture(scope="module")
def gpt_block():
    spec = ModelSpec(family="gpt", hidden=H, layers=2, heads=A, ffn_hidden=4 * H, vocab=512, max_seq_len=S,
                     dropout=0.1, attention="eager")
    templates = build_templates(spec, S, "fp16", fuse=False)
    return next(t for t in templates if t.kind == "block")


def small_terms(t: int, sp: bool) -> float:
    # What the paper leaves out: LayerNorm mean and rstd in fp32 (2 norms x 2 x 4 bytes per
    # token, sharded by SP like the norm input) and the s x s bool causal mask (not per batch).
    return 16 * S * B / (t if sp else 1) + S * S


@pytest.mark.parametrize("t,sp,recompute", [
    (1, False, "none"),        # s·b·h·(34 + 5·a·s/h)
    (4, False, "none"),        # s·b·h·(10 + 24/t + 5·a·s/(h·t))
    (4, True, "none"),         # s·b·h/t·(34 + 5·a·s/h)
    (4, False, "selective"),   # s·b·h·(10 + 24/t)
    (4, True, "selective"),    # 34·s·b·h/t
    (8, False, "selective"),
    (8, True, "none"),
])
def test_korthikanti_table2(gpt_block, t, sp, recompute):
    got = saved_bytes(gpt_block, Shards(tokens=B, tp=t, sp=sp, expert_div=t), recompute)
    paper = korthikanti_activation_bytes(S, B, H, A, t, sp, recompute)
    assert got == paper + small_terms(t, sp)


@pytest.mark.parametrize("t,sp", [(1, False), (4, False), (4, True)])
def test_full_recompute_keeps_the_layer_input(gpt_block, t, sp):
    # Korthikanti et al. 2022 Sec. 5: full recompute keeps only the input, 2·s·b·h (sharded by SP).
    got = saved_bytes(gpt_block, Shards(tokens=B, tp=t, sp=sp, expert_div=t), "full")
    assert got == 2 * S * B * H / (t if sp else 1)


def test_optimizer_step_shards_experts_over_the_group_the_program_uses():
    """Without expert parallel under tp > 1, autopar's program shards the routed experts' ZeRO-1 states
    over dp*cp (memory.expert_shard_group), so the optimizer step updates that share, not 1/edp."""
    from autopar.core.strategy import Strategy
    from autopar.cost_models.estimate import OPTIMIZER_BYTES_PER_PARAM
    from autopar.cost_models.session import Inputs, build_cost_model

    cm, *_ = build_cost_model(Inputs(model="moe-tiny", gpu="cpu", gpus_per_node=4, seq_len=64))
    s = Strategy.parse("dp=2,tp=2,zero=1,gbs=8").resolve(4, 8)
    est = cm.estimate(s)
    costs = cm.layer_costs(s)
    seen = []
    cm.timer.membound = lambda b: seen.append(b) or 0.0  # record the bytes the step moves
    dense = sum(costs[i].params_dense for i in est.ranks[0].layers)
    expert = sum(costs[i].params_expert for i in est.ranks[0].layers)
    assert expert > 0 and s.edp == 4
    cm.optimizer_step_time(s, est.ranks[0], costs)  # the step alone (FSDP2 copies price their own bytes)
    assert seen[-1] == pytest.approx((dense + expert) / 2 * OPTIMIZER_BYTES_PER_PARAM)
