"""Megatron-Core's dense block under fp8 saves its Transformer Engine linears' inputs in 1 byte
(``memory.fp8_linear_inputs_delta_bytes``; the rows' headroom: ``benchmarks/published_fit.py``)."""

from __future__ import annotations

import pytest

from autopar.core.strategy import Strategy
from autopar.cost_models.memory import fp8_linear_inputs_delta_bytes, fused_block_activation_bytes, megatron_block_bytes
from autopar.cost_models.session import Inputs, build_cost_model


def test_fp8_halves_the_norm_outputs_and_the_fc2_input_and_adds_the_projection_copy():
    tok, h, q, kv, f, tp = 8192, 8192, 8192, 1024, 28672, 4
    bf16 = fused_block_activation_bytes(tok, h, q, kv, f, True, False, tp, True)
    fp8 = bf16 + fp8_linear_inputs_delta_bytes(tok, h, q, f, tp, True)
    # per token: norms' inputs 2 x 2h and outputs 2 x 1h (sequence-split), q + out 4q, k + v 4kv, fc1 out 4f,
    # fc2 in 1f, the projection's fp8 copy 1q; all over tp
    assert fp8 == pytest.approx(tok * (6 * h + 5 * q + 4 * kv + 5 * f) / tp)
    assert fp8_linear_inputs_delta_bytes(tok, h, q, 0, 1, False) == tok * (q - h)  # MoE attention half: one norm


def test_megatron_fp8_block_reads_it():
    cm, _spec, cluster, _ = build_cost_model(Inputs(model="llama-tiny", gpu="h100-sxm", nodes=1, gpus_per_node=8,
                                                    seq_len=128, dtype="fp8", runtime="megatron"))
    s = Strategy.parse("tp=2,sp=1,dp=4,mbs=2").resolve(8)
    bf16 = megatron_block_bytes(cm.spec, s, 128, "megatron")
    fp8 = megatron_block_bytes(cm.spec, s, 128, "megatron", fp8=True)
    head = cm.spec.head_dim or cm.spec.hidden // cm.spec.heads
    assert fp8 - bf16 == pytest.approx(fp8_linear_inputs_delta_bytes(
        256, cm.spec.hidden, cm.spec.heads * head, cm.spec.ffn_hidden, 2, True))
    assert cm.layer_costs(s)[0].act_bytes["none"] == pytest.approx(fp8)
