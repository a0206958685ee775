"""Do the published runs fit? Megatron-Core memory terms (cost_models/memory.py) and the
benchmarks/published_fit.py check that every published run, which ran, fits its GPU."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from autopar.core.strategy import Strategy
from autopar.cost_models.memory import (
    fused_block_activation_bytes,
    korthikanti_activation_bytes,
    megatron_pipeline_buffer_bytes,
)
from autopar.cost_models.session import Inputs, build_cost_model

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(__file__).resolve().parents[2] / "shared"
MODERN = SHARED / "validation" / "published_modern.yaml"


def test_fused_block_reproduces_korthikanti_and_megatrons_estimate():
    # GPT-3 175B shapes (Korthikanti et al. 2022 Table 2): MHA, GeLU MLP 4h, dropout; flash attention keeps no
    # s^2 term, so the fused block is their selective-recompute row: 34·sbh/t with SP, sbh·(10 + 24/t) without.
    s, b, h, a, t = 2048, 1, 12288, 96, 8
    fused = lambda tp, sp: fused_block_activation_bytes(s * b, h, h, h, 4 * h, False, True, tp, sp)  # noqa: E731
    assert fused(t, True) == pytest.approx(korthikanti_activation_bytes(s, b, h, a, t, True, "selective"))
    assert fused(t, False) == pytest.approx(korthikanti_activation_bytes(s, b, h, a, t, False, "selective"))
    # Megatron-LM theoretical_memory_usage.compute_activation_memory: s·b·h·(18 + 4·ffn/h), divided by t
    ffn = 3 * h
    assert fused_block_activation_bytes(s, h, h, h, ffn, False, True, t, True) == pytest.approx(
        s * h * (18 + 4 * ffn / h) / t)


def test_fused_block_keeps_grouped_kv_and_the_gated_fc1_output():
    # Llama 3 70B at s 8192, t 4, SP: q 8192 wide, k/v 1024 (8 of 64 heads), SwiGLU 28672, no dropout:
    # norms 8h, q 2h, k+v 4·1024, output 2h, fc1 output 4f, SwiGLU output 2f bytes per token, all / t
    h, kv, f, tok = 8192, 1024, 28672, 8192
    want = tok * (8 * h + 2 * h + 4 * kv + 2 * h + 4 * f + 2 * f) / 4
    assert fused_block_activation_bytes(tok, h, h, kv, f, True, False, 4, True) == pytest.approx(want)
    # q and the attention output are heads x head_dim wide (Qwen3: 4096 against h 2048), not h
    assert fused_block_activation_bytes(1, 2048, 4096, 512, 0, True, False, 1, False) == 8 * 2048 + 4 * 4096 + 4 * 512


def test_megatron_pipeline_keeps_receive_buffers_only():
    # deallocate_pipeline_outputs: outputs freed once sent; p2p tensors [s/(cp·tp), b, h] under SP
    assert megatron_pipeline_buffer_bytes(1000.0, 9, 4, True) == pytest.approx(9 * 250.0)
    assert megatron_pipeline_buffer_bytes(1000.0, 9, 4, False) == pytest.approx(9000.0)


def _rank0(runtime: str, text: str, seq: int = 128):
    cm, _, cluster, _ = build_cost_model(Inputs(model="llama-tiny", gpu="h100-sxm", seq_len=seq, runtime=runtime,
                                                gpus_per_node=8))
    s = Strategy.parse(text).resolve(cluster.world)
    return cm, s, cm.estimate(s)


def test_megatron_rank_memory_uses_the_fused_block_and_receive_buffers():
    from autopar.cost_models.memory import megatron_block_bytes

    cm, s, e = _rank0("megatron", "tp=2,sp=1,pp=2,vpp=2,dp=2,mbs=1,gbs=8,schedule=interleaved")
    r = e.ranks[-1]
    blocks = len(r.layers)
    out = cm.layer_costs(s)["output"].act_bytes["none"]
    assert r.memory["activations"] == pytest.approx(r.in_flight * (blocks * megatron_block_bytes(
        cm.spec, s, cm.seq_len, "megatron") + out))
    # the layer costs carry it, so the recompute choice and the stage partition see what the estimate sees
    assert cm.layer_costs(s)[0].act_bytes["none"] == megatron_block_bytes(cm.spec, s, cm.seq_len, "megatron")
    hidden = cm.seq_len * cm.spec.hidden * 2  # mbs 1, bf16
    assert r.memory["pipeline_buffers"] == pytest.approx((2 * s.vpp - 1) * hidden / 2)
    # autopar's own program (torch.distributed.pipelining) keeps its stage outputs and the captured tensors
    _, _, et = _rank0("torch", "tp=2,sp=1,pp=2,vpp=2,dp=2,mbs=1,gbs=8,schedule=interleaved")
    assert et.ranks[-1].memory["pipeline_buffers"] > r.memory["pipeline_buffers"]


@pytest.mark.skipif(not MODERN.is_file(), reason="shared/validation absent")
def test_megatron_llama3_70b_row_fits_its_h100(tmp_path):
    """Megatron-Bridge Llama 3 70B fp8 on 64 H100 (tp4 pp8 vp5, no recompute) ran: it fits. Before the
    Megatron terms autopar priced its last stage at 136 GiB (43 GiB of kept stage outputs and logits)."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import published_fit as pf
    import published_rows as pr

    run = next(r for r in pr.load_runs(MODERN) if r["id"] == "megatron_bridge_26.04.01_h100_LLAMA3_70B_64gpu_FP8_4")
    case = pr.case_for(run)
    cm, s = pr.build(case, tmp_path)
    e = cm.estimate(s)
    fit = pf.fit_of(pr.Priced(case, e.step_time_s, pr.published_step_s(run, e), e))
    assert fit.memory["pipeline_buffers"] < 1 * 2**30
    assert fit.fits  # since its fp8 linears' inputs are saved in 1 byte (memory.fp8_linear_inputs_delta_bytes)


def test_megatron_moe_block_swaps_only_its_norms_and_attention(tmp_path):
    """An MoE block under Megatron keeps its captured expert and router tensors but the SiLU output its fused
    bias-SwiGLU re-runs (``runtime_memory.fused_swiglu_unsaved_bytes``) and counts its norms and attention the
    fused way; with shared experts (no closed form here) it keeps every other captured tensor."""
    import json

    from autopar.cost_models.memory import megatron_block_bytes
    cfg = dict(model_type="mixtral", hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
               intermediate_size=96, num_local_experts=8, num_experts_per_tok=2, vocab_size=512,
               max_position_embeddings=128)
    path = tmp_path / "moe.json"
    path.write_text(json.dumps(cfg))
    costs = {}
    for rt in ("torch", "megatron"):
        cm, _, cluster, _ = build_cost_model(Inputs(model=str(path), gpu="h100-sxm", seq_len=128, runtime=rt,
                                                    gpus_per_node=8))
        s = Strategy.parse("tp=2,sp=1,ep=4,dp=4,mbs=2,gbs=8").resolve(cluster.world)
        costs[rt] = cm.layer_costs(s)[0]
    t = next(t for t in cm.templates if t.kind == "block")
    attn = sum(x.bytes * s.micro_batch / s.tp for x in t.saved if x.shard in ("rep", "tp") and not x.const)
    fused = megatron_block_bytes(cm.spec, s, 128, "megatron", moe=True)
    silu = sum(x.bytes * s.micro_batch / s.tp for x in t.saved if x.name.endswith(":silu_out"))  # fused SwiGLU
    assert costs["megatron"].act_bytes["none"] == pytest.approx(costs["torch"].act_bytes["none"] - attn + fused - silu)
    assert fused < attn
    assert megatron_block_bytes(cm.spec.model_copy(update={"shared_experts": 1}), s, 128, "megatron", moe=True) is None
