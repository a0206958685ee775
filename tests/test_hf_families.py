"""Catalog families against transformers: for each public config fixture (tests/fixtures/hf),
the built-in module has exactly the parameters of the transformers module built from the same
config on the meta device, and autopar's capture of it has the FLOPs per token of autopar's
capture of the transformers module itself (within 2%)."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("transformers")

from autopar.profiles.graph import capture  # noqa: E402
from autopar.profiles.hf_capture import build_hf_model  # noqa: E402
from autopar.profiles.intake import from_hf_config, resolve_model  # noqa: E402
from autopar.profiles.models import build_model  # noqa: E402

FIXTURES = sorted((Path(__file__).resolve().parent / "fixtures" / "hf").glob("*.json"))
SEQ = 32


def _params(module) -> int:
    return sum(p.numel() for p in module.parameters())


def _fwd_flops(mg, skip: str | None = None) -> int:
    nodes = mg.graph.nodes
    return sum(nodes[n]["fwd_flops"] for n in mg.order if not (skip and skip in nodes[n]["module"]))


@pytest.mark.parametrize("path", FIXTURES, ids=lambda p: p.stem)
def test_parameter_count_equals_transformers(path):
    catalog = from_hf_config(path)
    assert catalog.family != "custom", f"{path.stem} should be a catalog family"
    hf = resolve_model(f"hf:{path}")
    assert _params(build_model(catalog)) == _params(build_hf_model(hf))


@pytest.mark.parametrize("path", [p for p in FIXTURES if p.stem != "llama4_text"], ids=lambda p: p.stem)
def test_flops_match_the_transformers_capture(path):
    ours = capture(from_hf_config(path), SEQ, 1, "bf16")
    theirs = capture(resolve_model(f"hf:{path}"), SEQ, 1, "bf16")
    assert len(ours.block_indices) == len(theirs.block_indices)
    assert _fwd_flops(ours) == pytest.approx(_fwd_flops(theirs), rel=0.02)


def test_llama4_flops_besides_the_dense_expert_loop():
    """transformers' Llama 4 experts run every token through every expert (bmm over all E,
    pre-scaled by the router); the catalog prices routed top-k. Everything else within 2%, and
    the expert GEMMs differ by exactly E / k."""
    path = next(p for p in FIXTURES if p.stem == "llama4_text")
    spec = from_hf_config(path)
    ours, theirs = capture(spec, SEQ, 1, "bf16"), capture(resolve_model(f"hf:{path}"), SEQ, 1, "bf16")
    experts = "feed_forward.experts"
    assert _fwd_flops(ours, experts) == pytest.approx(_fwd_flops(theirs, experts), rel=0.02)
    routed = _fwd_flops(ours) - _fwd_flops(ours, experts)
    dense = _fwd_flops(theirs) - _fwd_flops(theirs, experts)
    assert dense == pytest.approx(routed * spec.num_experts / spec.topk, rel=0.02)


def test_structure_is_read(tmp_path):
    """The structural fields that change cost or memory come from the configs."""
    spec = {p.stem: from_hf_config(p) for p in FIXTURES}
    assert spec["gpt_neox"].block_layout == "parallel_two_norms" and spec["gpt_neox"].rotary_fraction == 0.25
    assert spec["cohere"].block_layout == "parallel" and spec["cohere"].qk_norm == "per_head"
    assert spec["falcon"].block_layout == "parallel" and spec["falcon"].kv_heads == 1
    assert spec["falcon_40b"].block_layout == "parallel_two_norms" and spec["falcon_40b"].kv_heads == 8
    assert spec["gemma2"].block_layout == "sandwich" and spec["gemma2"].logit_softcap == 30.0
    assert spec["gemma2"].layer_attention == ["sliding", "full"]
    assert spec["gemma3_text"].layer_attention == ["sliding"] * 5 + ["full"]
    assert spec["mistral"].sliding_window == 4096 and spec["mistral"].is_sliding_layer(1)
    assert spec["qwen3"].qk_norm == "head" and spec["olmo2"].qk_norm == "full"
    assert spec["olmo2"].block_layout == "post_norm" and spec["olmo"].norm_kind == "nonparametric"
    assert spec["phi3"].rotary_fraction == 0.75 and spec["qwen2_moe"].shared_expert_gate
    assert spec["deepseek_v3"].first_dense_layers == 3 and spec["llama4_text"].moe_layer_step == 2
    assert [spec["llama4_text"].is_moe_layer(i) for i in range(4)] == [False, True, False, True]


def test_presets_of_other_families_read_like_their_configs():
    """Each shipped preset (profiles/hf_presets.json) builds; the ones whose fixture is the same
    model with fewer layers have that fixture's parameters per layer."""
    from autopar.profiles.intake import hf_presets, preset

    for name in hf_presets():
        spec = preset(name)
        assert spec.family != "custom" and spec.layers > 0, name
    full, small = preset("qwen3-30b-a3b"), from_hf_config(next(p for p in FIXTURES if p.stem == "qwen3_moe"))
    one = small.model_copy(update={"layers": 1})
    per_layer = _params(build_model(small)) - _params(build_model(one))
    assert _params(build_model(full)) == _params(build_model(one)) + per_layer * (full.layers - 1)


def test_tp_over_head_spanning_qk_norms_is_refused():
    """q/k norm weights over all heads (Cohere per-head, OLMo-2 full) are not sharded by tensor
    parallel: the planner's rules refuse tp > 1 for them; Qwen3's shared per-head norm is fine."""
    from autopar import techniques
    from autopar.core.strategy import Strategy

    s = Strategy.parse("tp=2,dp=4").resolve(8, 64)
    spec = {p.stem: from_hf_config(p) for p in FIXTURES if p.stem in ("cohere", "olmo2", "qwen3")}
    assert any("qk_norm=per_head" in m for m in techniques.violations(s, spec["cohere"], 8, 64))
    assert any("qk_norm=full" in m for m in techniques.violations(s, spec["olmo2"], 8, 64))
    assert any("post_norm" in m for m in techniques.violations(s, spec["olmo2"], 8, 64))
    assert not any("qk_norm" in m for m in techniques.violations(s, spec["qwen3"], 8, 64))
