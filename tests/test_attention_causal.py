"""Causal attention priced at the score blocks the kernel performs (issue 12)."""

from pathlib import Path

import pytest

from autopar.core.gpu import StackConstants
from autopar.core.strategy import Strategy
from autopar.cost_models.compute import OpTimer, causal_block_fraction
from autopar.cost_models.layer_cost import PricingContext, _attention_performed
from autopar.cost_models.layer_model import LayerTemplate
from autopar.profiles.hw import load_cluster, load_gpu_profile

CPU_JSON = Path(__file__).resolve().parents[1] / "profiles" / "hardware" / "cpu.json"


def _hand_count(seq: int, block: int, window_blocks: int | None = None) -> float:
    """Count the computed blocks of the block grid one by one."""
    nb = -(-seq // block)
    done = 0
    for r in range(nb):
        for c in range(nb):
            if c <= r and (window_blocks is None or r - c <= window_blocks):
                done += 1
    return done / nb ** 2


@pytest.mark.parametrize("seq,block", [(128, 128), (1024, 128), (4096, 128), (1000, 64)])
def test_fraction_matches_hand_count(seq, block):
    assert causal_block_fraction(seq, block=block) == pytest.approx(_hand_count(seq, block))


def test_window_fraction_matches_hand_count():
    assert causal_block_fraction(8192, window=1024, block=128) == pytest.approx(_hand_count(8192, 128, 8))
    assert causal_block_fraction(8192, window=1024, kernel_skips_window=False) == 1.0


def test_context_parallel_zigzag_per_rank():
    # cp=2, s=1024, block 128: 4 chunks of 2 blocks; rank 0 holds chunks 0 and 3: chunk 0 sees its
    # diagonal (3 of 4 blocks), chunk 3 sees chunks 0-2 (12 blocks) and its diagonal (3): 18 of 32.
    assert causal_block_fraction(1024, cp=2, block=128) == pytest.approx(18 / 32)
    assert causal_block_fraction(131072, cp=16) == pytest.approx(0.5, abs=0.02)


def test_gpu_profile_prices_causal_about_half():
    # the shipped GPU profiles count full FLOPs (the fit prefers it: docs/validation.md); a profile
    # whose attention_eff is in the FlashAttention papers' performed-FLOPs convention halves causal
    gpu = load_gpu_profile("h100-sxm").model_copy(update={"attention_eff_counts": "performed"})
    t = OpTimer(gpu=gpu, stack=StackConstants())
    flops = 4 * 8 * 32 * 8192 ** 2 * 128  # b=8, h=32, s=8192, d=128
    full, causal = t.attention(flops, 1e8), t.attention(flops, 1e8, causal_block_fraction(8192))
    assert 0.45 < causal / full < 0.55


def test_cpu_profile_prices_unchanged():
    if not CPU_JSON.exists():
        pytest.skip("no measured CPU profile")
    gpu = load_gpu_profile(CPU_JSON)
    assert gpu.attention_eff_counts == "full"
    t = OpTimer(gpu=gpu, dtype="fp32", stack=StackConstants())
    assert t.attention(1e9, 1e7, causal_block_fraction(512)) == t.attention(1e9, 1e7)


@pytest.mark.parametrize("runtime,expect", [("torch", 1.0), ("megatron", _hand_count(8192, 128, 8))])
def test_sliding_layer_performed_share_follows_the_kernel(runtime, expect):
    ctx = PricingContext(load_cluster("cluster-dgx-h100"), OpTimer(gpu=load_gpu_profile("h100-sxm")), 2, 4096, 8192,
                         stack_name=runtime, sliding_window=1024, sliding_layers=frozenset({0}))
    s = Strategy.parse("dp=1").resolve(1, 1)
    local, full = LayerTemplate("l", "block", [0]), LayerTemplate("g", "block", [1])
    assert _attention_performed(local, s, ctx) == pytest.approx(expect)
    assert _attention_performed(full, s, ctx) == pytest.approx(_hand_count(8192, 128))
