"""Optimizer offload below ZeRO-3 is one program (``techniques.dp_program.dp_mode``: FSDP2 with
``CPUOffloadPolicy``, no resharding after forward, whatever the stage): zero 0, 1 and 2 with offload price
the same (time, device and host memory) on the runtimes that run FSDP2, the search offers it once, as
zero=2 (``techniques.offload.stage_rule``), and emit names that pair for the others."""

from __future__ import annotations

import itertools

import pytest

from autopar.core.strategy import Strategy
from autopar.cost_models.session import Inputs, build_cost_model
from autopar.planner import search as S
from autopar.planner.space import Sharding, knob_options
from autopar.techniques import offload
from autopar.techniques.dp_program import dp_mode

SHAPES = [(tp, pp, dp, sched) for tp, pp, dp, sched in itertools.product((1, 2), (1, 2), (1, 2), ("1f1b", "zbv"))
          if (pp > 1 or sched == "1f1b")]


def _cm(model: str, runtime: str, dtype: str = "bf16"):
    return build_cost_model(Inputs(model=model, gpu="h100-sxm", nodes=1, gpus_per_node=8, seq_len=256, dtype=dtype,
                                   runtime=runtime))[0]


def _priced(cm, text: str) -> tuple:
    s = Strategy.parse(text).resolve(Strategy.parse(text).world)
    if cm.stack_name == "torch":  # torchtitan runs offload at zero 2 | 3 and tp with sp only (its stacks
        cm.check(s)               # declarations refuse the rest: tests/test_stack_space.py); its prices still agree
    e = cm.estimate(s)
    return (e.step_time_s, e.peak_bytes, e.host_peak_bytes, tuple(sorted(e.time.items())),
            tuple(tuple(sorted(r.memory.items())) for r in e.ranks),
            tuple((r.host_bytes, r.pooled_bytes) for r in e.ranks))


@pytest.mark.parametrize("model,runtime,dtype", [("llama-tiny", "torch", "bf16"), ("llama-tiny", "torch", "fp32"),
                                                 ("moe-tiny", "torch", "bf16"), ("llama-tiny", "torchtitan", "bf16"),
                                                 ("moe-tiny", "torchtitan", "bf16")])
def test_offload_prices_the_same_at_zero_0_1_2(model, runtime, dtype):
    """Every shape (tp, pp, dp, full-backward and zero-bubble schedules; ep on the MoE): one price.
    torchtitan's pipeline memory held the ZeRO-2 shards on the device beside the host's before."""
    cm = _cm(model, runtime, dtype)
    eps = (1, 2) if model == "moe-tiny" else (1,)
    for (tp, pp, dp, sched), ep in itertools.product(SHAPES, eps):
        if (tp * dp) % ep:
            continue
        base = f"tp={tp},pp={pp},dp={dp},ep={ep},mbs=1,gbs=16,recompute=full,schedule={sched},offload=1"
        base += ",vpp=2" if sched == "zbv" else ""
        prices = [_priced(cm, f"{base},zero={z}") for z in (0, 1, 2)]
        assert prices[0] == prices[1] == prices[2], base


def test_the_rule_is_dp_modes_single_program():
    """The rule refuses exactly the (zero, offload) pairs dp_mode runs as ZeRO-2's FSDP2 program."""
    for z, dp, cp in itertools.product((0, 1, 2, 3), (1, 2), (1, 2)):
        s = Strategy.parse(f"dp={dp},cp={cp},zero={z},offload=1").resolve(dp * cp)
        assert dp_mode(z, dp * cp, False, False, offload=True) == "fsdp2"
        refused = offload.stage_rule(s, None, s.world, None)
        assert bool(refused) == (z < 2 and dp * cp > 1)
        if refused:
            assert "use zero=2,offload=1" in refused[0] and "\n" not in refused[0]
    folded = Strategy.parse("tp=2,ep=2,zero=1,offload=1").resolve(2)   # dp*cp = 1, experts reduced over edp
    assert folded.edp == 1 and not offload.stage_rule(folded, None, 2, None)
    assert not offload.stage_rule(Strategy.parse("dp=2,zero=0").resolve(2), None, 2, None)


def test_search_offers_offload_once_as_zero_2():
    cm = _cm("llama-tiny", "torch")
    for dp in (1, 2, 4):
        sh = Sharding(tp=1, cp=1, pp=1, dp=dp, ep=1, etp=1, sp=False, mbs=1)
        knobs = knob_options(cm, S.Constraints(), sh, 16)
        pairs = {(k.zero, k.offload) for k in knobs}
        if dp > 1:
            assert pairs == {(0, False), (1, False), (2, False), (3, False), (2, True), (3, True)}
        else:
            assert pairs == {(0, False), (0, True)}   # one rank: every stage is the same configuration
    res = S.search(cm, 16, S.Constraints(fixed={"offload_optimizer": True}), top_k=5)
    assert res.candidates and res.rule_error is None
    assert all(c.strategy.zero_stage >= 2 or c.strategy.dp * c.strategy.cp == 1 for c in res.candidates)
