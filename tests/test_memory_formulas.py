"""Model-state and activation formulas, each test writing its source formula."""

import pytest

from autopar.core.strategy import Strategy
from autopar.cost_models.memory import (
    busiest_rank_expert_excess,
    grads_freed_before_activation_peak,
    host_grads_at_device_peak,
    korthikanti_activation_bytes,
    model_state_bytes,
    offload_grad_shard_bytes,
    pooled_peak_bytes,
)
from autopar.cost_models.session import Inputs, build_cost_model


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_zero_model_states(stage):
    # ZeRO (Rajbhandari et al. 2020) Sec. 5: 2Ψ + 2Ψ + KΨ with K = 12; stage 1 divides KΨ by
    # N_d, stage 2 also the gradients, stage 3 also the parameters.
    psi, nd = 7.5e9, 64
    s = model_state_bytes(psi, "bf16", stage, nd)
    assert s.params == 2 * psi / (nd if stage >= 3 else 1)
    assert s.grads == 2 * psi / (nd if stage >= 2 else 1)
    assert s.optimizer == 12 * psi / (nd if stage >= 1 else 1)
    expected_total = {0: 16 * psi, 1: 4 * psi + 12 * psi / nd, 2: 2 * psi + 14 * psi / nd, 3: 16 * psi / nd}
    assert s.total == pytest.approx(expected_total[stage])


def test_korthikanti_table2_closed_forms():
    # Korthikanti et al. 2022 Table 2 with s=2048, b=1, h=12288, a=96 (GPT-3 175B), t=8.
    s, b, h, a, t = 2048, 1, 12288, 96, 8
    assert korthikanti_activation_bytes(s, b, h, a) == s * b * h * (34 + 5 * a * s / h)
    assert korthikanti_activation_bytes(s, b, h, a, t) == s * b * h * (10 + 24 / t + 5 * a * s / (h * t))
    assert korthikanti_activation_bytes(s, b, h, a, t, sp=True) == s * b * h / t * (34 + 5 * a * s / h)
    assert korthikanti_activation_bytes(s, b, h, a, t, recompute="selective") == s * b * h * (10 + 24 / t)
    assert korthikanti_activation_bytes(s, b, h, a, t, sp=True, recompute="selective") == 34 * s * b * h / t
    assert korthikanti_activation_bytes(s, b, h, a, t, recompute="full") == 2 * s * b * h


def test_offload_gradient_shards_are_fp32():
    # FSDP2 CPUOffloadPolicy: the sharded gradient has the fp32 shard's dtype, 4 of the 16 host bytes
    assert offload_grad_shard_bytes(1000.0) == 4000.0


@pytest.mark.parametrize("text,runtime,live", [
    ("dp=4,mbs=2,gbs=8,offload=1", "torch", False),                # one micro-batch: shards come after the loss
    ("dp=4,mbs=1,gbs=8,offload=1", "torch", True),                 # accumulation: micro-batch 1's shards stay
    ("tp=2,pp=2,vpp=2,mbs=2,gbs=8,schedule=zbv,offload=1", "torch", False),  # FSDP2 reduces after the step's last
    ("tp=2,pp=2,vpp=2,mbs=2,gbs=8,schedule=zbv,offload=1", "megatron", True),
    ("tp=2,pp=2,mbs=2,gbs=8,schedule=1f1b,offload=1", "torch", True),  # apply_dp reduces each micro-batch
])
def test_host_gradient_shards_at_the_device_peak(text, runtime, live):
    s = Strategy.parse(text).resolve(4, 8)
    assert host_grads_at_device_peak(s, runtime) is live


def test_pooled_peak_is_the_larger_phase_not_the_sum():
    device = {"parameters": 10.0, "activations": 50.0, "comm_buffers": 5.0}
    # at the loss: device peak + host without the 25 shard bytes not yet written
    assert pooled_peak_bytes(device, 100.0, 25.0, grads_at_peak=False) == 65 + 100 - 25
    assert pooled_peak_bytes(device, 100.0, 25.0, grads_at_peak=True) == 65 + 100
    # shards larger than the activations: the end of the backward (host peak + parameters + one block) wins
    assert pooled_peak_bytes(device, 100.0, 80.0, grads_at_peak=False) == 100 + 10 + 5


def test_estimate_reports_the_pooled_peak():
    cm = build_cost_model(Inputs(model="moe-tiny", gpu="h100-sxm", gpus_per_node=4, seq_len=32, dtype="bf16"))[0]
    plain = cm.estimate(Strategy.parse("dp=4,mbs=2,gbs=8,zero=2").resolve(4, 8))
    assert plain.pooled_peak_bytes == plain.peak_bytes   # nothing on the host
    s = Strategy.parse("dp=4,mbs=2,gbs=8,zero=2,offload=1").resolve(4, 8)
    e = cm.estimate(s)
    shards = offload_grad_shard_bytes(sum(cm.layer_costs(s)[k].params_dense + cm.layer_costs(s)[k].params_expert
                                          for k in [*range(cm.num_layers), "embedding", "output"]) / 4)
    assert e.host_peak_bytes > shards > 0
    assert e.pooled_peak_bytes == pytest.approx(e.peak_bytes + e.host_peak_bytes - shards)


@pytest.mark.parametrize("text,runtime,freed", [
    ("dp=4,mbs=4,gbs=16", "torch", True),             # one micro-batch: zero_grad(set_to_none) ran before it
    ("dp=4,mbs=4,gbs=16,zero=3", "torchtitan", True),  # torchtitan's optimizers.zero_grad() sets None too
    ("dp=4,mbs=1,gbs=16", "torch", False),            # accumulation: micro-batch 1's gradients are live
    ("dp=4,mbs=4,gbs=16", "megatron", False),         # persistent contiguous gradient buffer
    ("pp=2,dp=2,mbs=1,gbs=8,schedule=gpipe", "torch", True),
    ("pp=2,dp=2,mbs=1,gbs=8,schedule=zbv,vpp=2", "torch", False),
])
def test_gradients_freed_before_the_activation_peak(text, runtime, freed):
    s = Strategy.parse(text).resolve(4, 8)
    assert grads_freed_before_activation_peak(s, runtime) is freed


def test_one_micro_batch_peak_does_not_add_the_gradients():
    """gpt-small dp4 mbs4 on 4 CPU ranks (docs/validation.md closed loop): the activation peak of a
    one-micro-batch step holds no gradient; with mbs1 (4 micro-batches) it holds all of them."""
    cm = build_cost_model(Inputs(model="gpt-small", gpu="cpu", gpus_per_node=4, seq_len=128, dtype="fp32"))[0]
    one = cm.estimate(Strategy.parse("dp=4,mbs=4,gbs=16").resolve(4, 1)).ranks[0].memory
    acc = cm.estimate(Strategy.parse("dp=4,mbs=1,gbs=16").resolve(4, 1)).ranks[0].memory
    per_mb_acc = acc["activations"]  # one micro-batch of 1 sequence
    assert one["activations"] == pytest.approx(4 * per_mb_acc - one["gradients"])
    assert acc["gradients"] == one["gradients"] > 0


def test_busiest_expert_rank_holds_its_share_of_routed_tokens():
    """Dropless routing: the busiest ep rank saves ``load`` x the mean rank's expert activations;
    a balanced trace adds nothing, and without ep no rank is busier."""
    assert busiest_rank_expert_excess(100.0, 1.5) == 50.0
    assert busiest_rank_expert_excess(100.0, 0.9) == 0.0
    cm = build_cost_model(Inputs(model="moe-tiny", gpu="cpu", gpus_per_node=4, seq_len=128, dtype="fp32"))[0]
    moe = next(t for t in cm.templates if t.is_moe)
    s = Strategy.parse("dp=4,ep=4,mbs=1,gbs=16").resolve(4, 1)
    base = cm.layer_costs(s)[moe.indices[0]].act_bytes
    cm2 = build_cost_model(Inputs(model="moe-tiny", gpu="cpu", gpus_per_node=4, seq_len=128, dtype="fp32"))[0]
    cm2.moe_load = lambda ep: (1.5, 0.75)
    busy = cm2.layer_costs(s)[moe.indices[0]].act_bytes
    expert = sum(t.bytes for t in moe.saved if t.shard == "expert")
    assert busy["none"] - base["none"] == pytest.approx(0.5 * expert)
    assert busy["full"] == base["full"]  # full recompute saves only the block input
    dp = Strategy.parse("dp=4,mbs=1,gbs=16").resolve(4, 1)
    assert cm2.layer_costs(dp)[moe.indices[0]].act_bytes == cm.layer_costs(dp)[moe.indices[0]].act_bytes
