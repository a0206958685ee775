"""Graph capture: grouping of repeated blocks, measured saved activations against
Korthikanti et al. 2022 Table 2, tags, leaf MoE pricing and custom modules."""

from __future__ import annotations

import pytest

from autopar.core.model_spec import ModelSpec
from autopar.errors import InputError
from autopar.profiles.graph import capture
from autopar.profiles.intake import preset, resolve_model
from autopar.profiles.layer_stats import summarize


def test_llama3_70b_is_one_group_of_80():
    stats = summarize(capture(preset("llama3-70b"), 512, 1, "bf16"))
    assert [(g.kind, g.count) for g in stats.groups] == [("embedding", 1), ("block", 80), ("output", 1)]
    assert stats.blocks[0].indices == list(range(80))


def test_deepseek_v3_dense_and_moe_groups():
    stats = summarize(capture(preset("deepseek-v3"), 512, 1, "bf16"))
    blocks = stats.blocks
    assert [(g.name, g.count, g.is_moe) for g in blocks] == [("dense_block", 3, False), ("moe_block", 58, True)]
    assert blocks[0].indices == [0, 1, 2] and blocks[1].indices == list(range(3, 61))
    assert blocks[1].params_expert == 3 * 256 * 7168 * 2048
    assert stats.params == 671_026_404_352


# ----- Korthikanti et al. 2022, Table 2 ------------------------------------------------------
S, B, H, A = 128, 2, 256, 8  # s, b, h, a: h != s so no [b, s, h] tensor looks like s x s scores


@pytest.fixture(scope="module")
def gpt_layer():
    """A GPT layer as the paper assumes it: eager attention, dropout 0.1, fp16 (2-byte
    activations, 1-byte dropout masks)."""
    spec = ModelSpec(family="gpt", hidden=H, layers=2, heads=A, ffn_hidden=4 * H, vocab=512,
                     max_seq_len=S, dropout=0.1, attention="eager")
    stats = summarize(capture(spec, S, B, "fp16"))
    assert len(stats.blocks) == 1 and stats.blocks[0].count == 2
    return stats.blocks[0]


# Small terms the paper omits, counted exactly here:
LN_STATS = 2 * 2 * 4 * S * B   # two LayerNorms save mean and rstd, fp32, one value per token each
CAUSAL_MASK = S * S            # the s x s bool mask masked_fill keeps (batch-independent: tagged const)


def test_saved_bytes_per_gpt_layer_match_table_2(gpt_layer):
    """s*b*h*(34 + 5*a*s/h) bytes per layer (no parallelism) plus the small terms."""
    paper = S * B * H * 34 + 5 * A * S * S * B
    assert gpt_layer.saved_bytes == paper + LN_STATS + CAUSAL_MASK


def test_tp_split_matches_table_2(gpt_layer):
    """With tensor parallel t: s*b*h*(10 + 24/t + 5*a*s/(h*t)): the tp-tagged tensors are the
    24*sbh + 5*a*s^2*b part, the rest 10*sbh (plus the small terms)."""
    tp = gpt_layer.saved_where("tp")
    assert tp == S * B * H * 24 + 5 * A * S * S * B
    assert gpt_layer.saved_bytes - tp == 10 * S * B * H + LN_STATS + CAUSAL_MASK
    assert gpt_layer.saved_where("replicated") == 10 * S * B * H + LN_STATS + CAUSAL_MASK


def test_attention_core_is_the_quadratic_part(gpt_layer):
    """Selective recompute drops 5*a*s^2*b (softmax output 2, dropout mask 1, dropout output 2)."""
    core = {t.name: t.bytes for t in gpt_layer.saved if "attn_core" in t.tags}
    assert sum(core.values()) == 5 * A * S * S * B
    quadratic = [t for t in gpt_layer.saved if {"attn_core", "quadratic"} & set(t.tags) and "const" not in t.tags]
    assert sum(t.bytes for t in quadratic) == 5 * A * S * S * B
    assert gpt_layer.saved_where("const") == CAUSAL_MASK
    assert gpt_layer.saved_where("stat") == LN_STATS
    # Q, K and V (their contiguous copies for the batched matmuls) are tp but not attn_core
    copies = [t for t in gpt_layer.saved if t.name.endswith(":copy")]
    assert len(copies) == 3 and all("tp" in t.tags and "attn_core" not in t.tags for t in copies)


def test_gpt_layer_ops_and_flops(gpt_layer):
    """Forward GEMM FLOPs per layer: 24*b*s*h^2 + 4*b*s^2*h (Narayanan et al. 2021, Sec. 5.1)."""
    gemm = sum(op.fwd_flops for op in gpt_layer.ops if op.gemm_mnk)
    bias = B * S * (3 * H + 4 * H + H + H)  # bias adds of q, k, v, w1, wo, w2
    assert gemm == 24 * B * S * H * H + 4 * B * S * S * H + bias
    wq = next(op for op in gpt_layer.ops if op.module.endswith("attention.wq"))
    assert wq.gemm_mnk == (B * S, H, H) and "column_parallel" in wq.tags
    wo = next(op for op in gpt_layer.ops if op.module.endswith("attention.wo"))
    assert "row_parallel" in wo.tags and wo.bwd_flops == 2 * (wo.fwd_flops - B * S * H) + B * S * H


def test_sdpa_saves_no_quadratic_tensor():
    stats = summarize(capture(preset("llama-tiny"), 96, 2, "bf16"))
    block = stats.blocks[0]
    assert not any("quadratic" in t.tags or "attn_core" in t.tags for t in block.saved)
    lse = [t for t in block.saved if t.name.endswith(":logsumexp")]
    assert len(lse) == 1 and lse[0].dtype == "float32" and "stat" in lse[0].tags


def test_moe_experts_priced_for_uniform_topk():
    spec = preset("moe-tiny")
    s, b = 64, 2
    stats = summarize(capture(spec, s, b, "bf16"))
    moe = next(g for g in stats.blocks if g.is_moe)
    rows, h, f = s * b * spec.topk, spec.hidden, spec.moe_ffn_hidden
    expert_ops = [op for op in moe.ops if op.kind == "matmul" and "expert" in op.tags]
    assert sum(op.fwd_flops for op in expert_ops) == 3 * 2 * rows * h * f
    assert {op.gemm_batch for op in expert_ops} == {spec.num_experts}
    # dispatched rows (h) + w1 out, silu out, w3 out, w2 in (4f) + w2 out (h), 2 bytes each;
    # gate weights (2 bytes) and token / slot indices (8 bytes each) per row
    assert moe.saved_where("expert") == rows * (2 * (2 * h + 4 * f) + 2 + 16)
    router = [t for t in moe.saved if "router" in t.tags]
    assert router and all("replicated" in t.tags for t in router)
    assert moe.params_expert == 3 * spec.num_experts * h * f
    assert moe.params_replicated == 2 * h + spec.num_experts * h  # two norms + router gate


def test_output_temporaries_and_loss():
    spec = preset("gpt-tiny")
    stats = summarize(capture(spec, 32, 2, "bf16"))
    out = stats.group("output")
    tokens = 64
    assert sorted(t.bytes for t in out.temporaries) == [2 * tokens * spec.vocab, 4 * tokens * spec.vocab]
    # cross-entropy keeps its fp32 log-softmax (vocab-parallel: tp) and the int64 labels
    assert out.saved_where("tp") == 4 * tokens * spec.vocab
    assert out.saved_where("input") == 8 * tokens


def test_tied_embeddings_counted_once():
    stats = summarize(capture(preset("gpt2-124m"), 64, 1, "bf16"))
    spec = preset("gpt2-124m")
    assert stats.group("output").params_tied == spec.vocab * spec.hidden
    assert stats.group("embedding").params_embedding == spec.vocab * spec.hidden
    assert stats.model_dump_json()  # JSON-serialisable


def test_custom_factory_groups_its_block_list():
    spec = resolve_model("conftest:stack_model", input_shape=[2, 16, 32], input_dtype="float32")
    stats = summarize(capture(spec, 16, 2, "fp32"))
    assert [(g.kind, g.count) for g in stats.groups] == [("embedding", 1), ("block", 3), ("output", 1)]
    block = stats.blocks[0]
    assert block.params == 2 * 32 * 128 + 128 + 32
    m = 2 * 16  # tokens
    assert sum(op.fwd_flops for op in block.ops if op.gemm_mnk) == 2 * (2 * m * 32 * 128) + m * 128 + m * 32


def test_untraceable_factory_is_an_input_error():
    spec = resolve_model("conftest:branchy_model", input_shape=[2, 8], input_dtype="float32")
    with pytest.raises(InputError, match="cannot trace factory 'conftest:branchy_model'"):
        capture(spec, 8, 2, "fp32")


def test_seq_len_beyond_max_is_an_input_error():
    with pytest.raises(InputError, match="max_seq_len"):
        capture(preset("gpt-tiny"), 4096, 1, "bf16")
