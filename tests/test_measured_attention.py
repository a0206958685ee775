"""A measured attention time priced by what each layer kind performs (``layer_cost._measured_attention``).

Capture groups GPT-OSS's alternating window and full layers into one template and the profile times its first
layer's call: torch SDPA with the window's mask, which computes every score block. The window layers (masked SDPA
under autopar's programs) take that time as measured; the full layers run ``is_causal`` and compute the causal
triangle, so their measured time is scaled by it. A kernel that skips the window (Megatron) performs the band. A
captured ``is_causal`` call on a model without windows keeps its measured time exactly."""

from __future__ import annotations

import copy
import json

import pytest

from autopar.core.strategy import Strategy
from autopar.cost_models.compute import OpTimer, causal_block_fraction
from autopar.cost_models.layer_cost import _attention_performed, _op_time, shards_for
from autopar.cost_models.session import Inputs, build_cost_model

SEQ, MEASURED = 2048, (1e-3, 2.5e-3)
TOY_OSS = dict(model_type="mixtral", hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
               num_key_value_heads=2, head_dim=64, intermediate_size=256, vocab_size=512, num_local_experts=8,
               num_experts_per_tok=2, attention_bias=True, mlp_bias=True, sliding_window=128,
               layer_types=["sliding_attention", "full_attention"] * 2, max_position_embeddings=2048)


def _measured_attention(model: str, runtime: str) -> dict[int, tuple[float, float]]:
    """{first layer of each block template: its attention (forward, backward)} at the captured shape (mbs 1, no
    tp / cp), the profile holding ``MEASURED`` for the captured attention call."""
    cm = build_cost_model(Inputs(model=model, gpu="h100-sxm", nodes=1, gpus_per_node=8, seq_len=SEQ,
                                 runtime=runtime))[0]
    s = Strategy.parse("dp=8,mbs=1,gbs=8").resolve(8)
    out = {}
    for t in (t for t in cm.templates if t.kind == "block"):
        op = next(o for o in t.ops if o.kind == "attention")
        ctx = copy.copy(cm.ctx)
        ctx.timer = OpTimer(gpu=cm.gpu, dtype=cm.dtype, measured={op.sig: MEASURED}, source="fit")
        out[t.indices[0]] = _op_time(op, s, shards_for(s, t), ctx, _attention_performed(t, s, ctx))
    return out


@pytest.fixture(scope="module")
def oss(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("oss") / "config.json"
    path.write_text(json.dumps(TOY_OSS))
    return str(path)


def test_full_layers_scale_the_masked_measurement_by_the_causal_triangle(oss):
    got = _measured_attention(oss, "torch")
    tri = causal_block_fraction(SEQ)
    assert got[0] == MEASURED   # the window layers' masked call is the one measured
    assert got[1] == pytest.approx((MEASURED[0] * tri, MEASURED[1] * tri)) and tri < 0.6


def test_a_kernel_skipping_the_window_performs_the_band(oss):
    got = _measured_attention(oss, "megatron")
    band, tri = causal_block_fraction(SEQ, 1, 128), causal_block_fraction(SEQ)
    assert got[0] == pytest.approx((MEASURED[0] * band, MEASURED[1] * band)) and band < 0.2
    assert got[1] == pytest.approx((MEASURED[0] * tri, MEASURED[1] * tri))


def test_a_causal_capture_keeps_its_measured_time():
    got = _measured_attention("llama-tiny", "torch")
    assert got and all(v == MEASURED for v in got.values())
