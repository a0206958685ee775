"""Fused attention rate by the keys a query tile reads and by head dim (cost_models/attention_rate.py)."""

from __future__ import annotations

import pytest

from autopar.core.gpu import HeadDimRate
from autopar.cost_models.attention_rate import head_dim_factor, keys_per_query_tile, knee_eff, knee_fit
from autopar.cost_models.compute import OpTimer, causal_block_fraction, measured_kernel_points
from autopar.profiles.hw import load_gpu_profile

HOPPER = ("h100-sxm", "h100-96g", "h200", "h800")


def _rate(gpu, runtime: str, seq: int, window: int = 0, head_dim: int = 128, heads: int = 32) -> float:
    """Priced forward + backward TFLOP/s on the blocks the kernel computes (b 1)."""
    full = 4.0 * heads * seq * seq * head_dim
    perf = causal_block_fraction(seq, 1, window)
    f, b = OpTimer(gpu, "bf16", stack=gpu.stack(runtime)).attention_fb(
        full, 8.0 * heads * seq * head_dim, perf, 2.5, runtime, seq, 1, head_dim)
    return 3.5 * full * perf / (f + b) / 1e12


def test_keys_per_query_tile():
    """Full causal: half the row of blocks plus the diagonal; a 128-token window: about two blocks."""
    assert keys_per_query_tile(4096, causal_block_fraction(4096)) == pytest.approx(33 / 2 * 128)
    assert keys_per_query_tile(4096, causal_block_fraction(4096, 1, 128)) == pytest.approx((3 + 30 * 2) / 32 * 128)
    assert keys_per_query_tile(4096, 1.0) == 4096  # SDPA with a boolean mask computes every block


def test_knee_fit_recovers_a_knee_and_falls_below_the_points():
    pts = [(k, 0.7 / (1 + 1500 / k)) for k in (2000.0, 4000.0, 8000.0)]
    e_max, k0 = knee_fit(tuple(pts))
    assert (e_max, k0) == (pytest.approx(0.7), pytest.approx(1500))
    assert knee_eff(pts, 250) == pytest.approx(0.7 / (1 + 1500 / 250)) and knee_eff(pts, 250) < pts[0][1]
    assert knee_eff(pts, 64000) == pytest.approx(pts[-1][1])  # held above the longest measured point


@pytest.mark.parametrize("name", HOPPER)
def test_knee_reproduces_the_measured_points(name):
    """Every measured kernel: the fitted knee within 5% of each measured forward + backward rate."""
    gpu = load_gpu_profile(name)
    for kernel in gpu.attention_kernels.values():
        runtime = kernel.stacks[0]
        for seq, _, rate in kernel.measured:
            causal_half = _rate(gpu, runtime, seq) * 0.5 / causal_block_fraction(seq)  # kernel_rates' FLOPs
            assert causal_half == pytest.approx(rate, rel=0.05)
        pts = measured_kernel_points(kernel, gpu.peak_tflops["bf16"])
        assert all(k == pytest.approx(keys_per_query_tile(s, causal_block_fraction(s)))
                   for (k, _), (s, _, _) in zip(pts, kernel.measured))


@pytest.mark.parametrize("runtime", ["megatron", "torchtitan"])
def test_a_window_layer_never_cheaper_than_its_flops_at_the_short_sequence_rate(runtime):
    """A 128-token window's tiles read ~2 blocks: its rate on the blocks computed is below the rate at the
    shortest measured sequence, and the layer costs more than its share of blocks of the full causal layer."""
    gpu = load_gpu_profile("h100-sxm")
    shortest = gpu.attention_kernel(runtime).measured[0][0]
    win, full = _rate(gpu, runtime, 4096, 128), _rate(gpu, runtime, 4096)
    assert win < _rate(gpu, runtime, shortest) and win < full
    t_win = causal_block_fraction(4096, 1, 128) / win
    t_full = causal_block_fraction(4096) / full
    assert causal_block_fraction(4096, 1, 128) / causal_block_fraction(4096) * t_full < t_win < t_full


def test_rate_rises_with_keys_per_tile():
    gpu = load_gpu_profile("h100-sxm")
    rates = [_rate(gpu, "megatron", s) for s in (512, 1024, 2048, 4096, 8192, 16384)]
    assert rates == sorted(rates)


@pytest.mark.parametrize("name", HOPPER)
def test_head_dim_64_slower_than_128(name):
    """Every kernel family of every Hopper profile: head dim 64 slower per FLOP than 128, by the profile's ratio
    (the A100 profiles carry none: their published rows show no d64 penalty, docs/validation.md)."""
    gpu = load_gpu_profile(name)
    rates = [gpu.attention_head_dim_rate] + [k.head_dim_rate for k in gpu.attention_kernels.values()]
    assert all(r is not None and r.source for r in rates)
    for r in rates:
        assert head_dim_factor(64, 128, r) == pytest.approx(r.d64_ratio) and r.d64_ratio < 1
    for runtime in [k.stacks[0] for k in gpu.attention_kernels.values()] + ["torch"]:
        assert _rate(gpu, runtime, 4096, head_dim=64) < _rate(gpu, runtime, 4096, head_dim=128)


def test_head_dim_factor_pads_and_holds_above_the_reference():
    r = HeadDimRate(d64_ratio=0.82, round_to=32, source="test")
    assert head_dim_factor(128, 128, r) == 1.0
    assert head_dim_factor(112, 128, r) == pytest.approx(112 / 128)  # computed in the 128 tile
    assert head_dim_factor(96, 128, r) < 1.0 and head_dim_factor(96, 128, r) > r.d64_ratio
    assert head_dim_factor(256, 128, r) == 1.0 and head_dim_factor(160, 128, r) == 1.0
    assert head_dim_factor(64, 128, None) == 1.0 and head_dim_factor(0, 128, r) == 1.0
    beta = 0.5 * (1 - 0.82) / (0.82 - 0.5)  # rate(d) ∝ d / (a d + c): the ratio at 96 from the one at 64
    assert head_dim_factor(96, 128, r) == pytest.approx(0.75 * (1 + beta) / (0.75 + beta))


def test_torch_runtime_keeps_every_block_but_slows_at_head_dim_64():
    """The emitted program's SDPA (boolean window mask: every block computed, the fitted curve) moves with head
    dim too, and its window layers cost what full layers cost."""
    gpu = load_gpu_profile("h100-sxm")
    t = OpTimer(gpu, "bf16", stack=gpu.stack("torch"))
    d128 = t.attention_fb(1e12, 1e6, 1.0, 2.5, "torch", 4096, 1, 128)
    d64 = t.attention_fb(1e12, 1e6, 1.0, 2.5, "torch", 4096, 1, 64)
    assert d64[0] == pytest.approx(d128[0] / gpu.attention_head_dim_rate.d64_ratio)
    assert t.attention_fb(1e12, 1e6, 1.0, 2.5, "torch", 4096) == d128  # no head dim: as quoted (128)


def test_gpt_oss_row_maps_its_window_on_alternate_layers(tmp_path):
    """GPT-OSS-120B (Megatron-Bridge GPTOSSProvider window_size (128, 0), window_attn_skip_freq 2): the published
    rows' mapping builds 18 sliding layers of 128 tokens, the even ones, at head dim 64."""
    import json
    import sys
    from pathlib import Path

    from autopar.profiles.intake import from_hf_config

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import published_rows as pr

    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps(pr.ARCHS["GPT-OSS-120B"]))
    spec = from_hf_config(cfg)
    assert spec.sliding_window == 128 and spec.head_dim == 64
    assert [i for i in range(spec.layers) if spec.is_sliding_layer(i)] == list(range(0, 36, 2))


def test_llm_foundry_triton_tile_pads_head_dim_112_on_every_gpu():
    """llm-foundry's kernels compute head dim 112 (MPT-30B) in a 128 tile (``stack_tile_factor``): on the A100
    profiles (no ``HeadDimRate``) the stack's own padding prices it, on Hopper the profile's round_to already
    does (no double count); powers of two and other stacks pay nothing."""
    from autopar.cost_models.attention_rate import stack_tile_factor

    hopper = load_gpu_profile("h100-sxm").attention_head_dim_rate
    assert stack_tile_factor(112, "llm-foundry", None) == pytest.approx(112 / 128)
    assert stack_tile_factor(112, "llm-foundry", hopper) == 1.0          # round_to 32 priced 112 -> 128 already
    assert stack_tile_factor(80, "llm-foundry", hopper) == pytest.approx(96 / 128)   # Triton: next power of two
    assert stack_tile_factor(64, "llm-foundry", None) == stack_tile_factor(128, "llm-foundry", None) == 1.0
    assert stack_tile_factor(112, "torch", None) == stack_tile_factor(112, "megatron", None) == 1.0
    t = OpTimer(load_gpu_profile("a100-80g"), "bf16")
    padded, plain = t.attention(1e13, 1e9, 0.5, 112, "llm-foundry"), t.attention(1e13, 1e9, 0.5, 112, "torch")
    assert padded == pytest.approx(plain * 128 / 112)                  # compute-bound: time x tile / head dim
