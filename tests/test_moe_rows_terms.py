"""How the MoE rows of published_modern.yaml are read (benchmarks/published_moe_rows.py): the FLOP count behind
MoE Parallel Folding's published TFLOP/s and MFU is Megatron-LM's logged one."""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
SHARED = Path(__file__).resolve().parents[2] / "shared" / "validation" / "published_modern.yaml"

MIXTRAL = dict(model_type="mixtral", hidden_size=6144, num_hidden_layers=56, num_attention_heads=48,
               num_key_value_heads=8, intermediate_size=16384, vocab_size=32768, num_local_experts=8,
               num_experts_per_tok=2)


def _bench():
    sys.path.insert(0, str(BENCH))
    import mcore_readme_rows
    import published_moe_rows

    return published_moe_rows, mcore_readme_rows


def test_mcore_flops_counts_routed_experts_gemms_and_full_attention():
    """12·T·L·h²·((1 + g/a + s/h)·q/h + f·k/h·3/2 + V/(2·L·h)) by hand for Mixtral-8x22B at 4,096 tokens."""
    moe, _ = _bench()
    run = {"model": {"seq_len": 4096}, "parallel": {"tp": 2}}
    tokens, h, layers = 4096.0, 6144, 56
    by_hand = 12 * tokens * layers * h * h * ((1 + 8 / 48 + 4096 / h) + 16384 * 2 / h * 1.5 + 32768 / (2 * layers * h))
    assert moe.mcore_flops(MIXTRAL, run, tokens) == pytest.approx(by_hand, rel=1e-12)
    # the vocabulary is padded to 128 x tp as Megatron-LM pads it (151,936 -> 152,064 at tp 2)
    qwen = dict(MIXTRAL, vocab_size=151936)
    padded = dict(MIXTRAL, vocab_size=152064)
    assert moe.mcore_flops(qwen, run, tokens) == pytest.approx(moe.mcore_flops(padded, run, tokens), rel=1e-12)
    assert moe.mcore_flops(qwen, {**run, "parallel": {"tp": 1}}, tokens) < moe.mcore_flops(qwen, run, tokens)


def test_mcore_flops_of_one_routed_expert_is_the_dense_readme_count():
    """One expert routed to is the dense SwiGLU MLP: the same count as the README rows' form."""
    moe, readme = _bench()
    cfg = dict(MIXTRAL, num_experts_per_tok=1, num_local_experts=1)
    run = {"model": {"seq_len": 4096, "layers": 56, "hidden": 6144, "heads": 48, "kv_heads": 8, "vocab": 32768,
                     "ffn_hidden": 16384, "arch": "SwiGLU"}, "parallel": {"tp": 1}}
    assert moe.mcore_flops(cfg, run, 8192.0) == pytest.approx(readme.megatron_model_flops(run, 8192.0), rel=1e-12)
    shared = dict(cfg, shared_expert_intermediate_size=16384)   # a shared expert adds its own MLP
    assert moe.mcore_flops(shared, run, 1.0) > moe.mcore_flops(cfg, run, 1.0)


def test_folding_rows_convert_their_throughput_with_megatrons_count():
    """A Folding row's published step is Megatron-LM's FLOPs over its TFLOP/s: autopar's graph FLOPs (which also
    count norms, router, softmax) no longer enter; other sources keep them."""
    if not SHARED.is_file():
        pytest.skip("shared/validation is not next to the repository")
    moe, _ = _bench()
    import published_rows as pr

    runs = {r["id"]: r for r in pr.load_runs(SHARED)}
    run = runs["moe_folding_table2_Mixtral-8x22B_fp8_folding"]
    est = SimpleNamespace(tokens=256 * 4096.0, world=128, model_flops=1.0)
    want = moe.mcore_flops(pr.model_config(run), run, est.tokens) / (631.7e12 * 128)
    assert pr.published_step_s(run, est) == pytest.approx(want, rel=1e-12)
    assert pr.published_step_s(run, SimpleNamespace(tokens=est.tokens, world=128, model_flops=9e30)) == \
        pytest.approx(want, rel=1e-12)
    other = runs["llama3_405b_16384gpu_seq131072"]   # an MFU in autopar's own model FLOPs
    assert pr.published_step_s(other, SimpleNamespace(tokens=1e6, world=8, model_flops=2.0)) != \
        pr.published_step_s(other, SimpleNamespace(tokens=1e6, world=8, model_flops=4.0))
