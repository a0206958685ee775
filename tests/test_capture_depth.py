"""Capture at reduced depth (``profiles.depth``) gives the full-depth capture's statistics and
templates, field by field, for every built-in family; and falls back to full depth where the
reduction cannot see the layer kinds."""

from __future__ import annotations

from pathlib import Path

import pytest

from autopar.core.model_spec import ModelSpec
from autopar.cost_models.templates import templates_from_stats
from autopar.profiles import depth, layer_stats
from autopar.profiles.graph import capture
from autopar.profiles.intake import preset, resolve_model

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "hf"
SMALL = dict(hidden=64, heads=4, kv_heads=2, head_dim=16, vocab=512, max_seq_len=128)


def _spec(base: ModelSpec, **changes) -> ModelSpec:
    return ModelSpec.model_validate({**base.model_dump(), **changes})


def _gemma3_like() -> ModelSpec:
    """Sandwich norms, q/k head norms, GeGLU, tied and scaled embeddings, and five sliding-window
    layers to one global, with the window shorter than the captured sequence."""
    layers = 14
    pattern = ["full" if (i + 1) % 6 == 0 else "sliding" for i in range(layers)]
    return _spec(preset("gemma3-1b"), **{**SMALL, "kv_heads": 1}, ffn_hidden=96, layers=layers, sliding_window=16,
                 layer_attention=pattern, embed_scale=8.0)


CASES = {
    "gpt-small": lambda: preset("gpt-small"),
    "llama (tied)": lambda: _spec(preset("llama3-8b"), **SMALL, ffn_hidden=96, layers=6, tie_embeddings=True),
    "mixtral-like": lambda: _spec(preset("mixtral-8x7b"), **SMALL, moe_ffn_hidden=48, layers=5),
    "deepseek-like (dense first, MoE, MLA)": lambda: _spec(preset("deepseek-tiny"), layers=7, first_dense_layers=2),
    "interleaved MoE": lambda: _spec(preset("moe-tiny"), layers=8, first_dense_layers=0, moe_layer_step=2),
    "gemma3-like": _gemma3_like,
    "qwen3-moe config.json": lambda: _spec(resolve_model(str(FIXTURES / "qwen3_moe.json")), **SMALL,
                                            ffn_hidden=96, moe_ffn_hidden=32, num_experts=8, topk=2, layers=5),
}


def _full(spec: ModelSpec, seq: int):
    return layer_stats.summarize(capture(spec, seq, 1, "bf16"))


def _spy(monkeypatch) -> list:
    """Record the depth plan of every capture ``capture_stats`` makes."""
    plans = []
    real = layer_stats.capture

    def spy(spec, seq_len, micro_batch=1, dtype="bf16", plan=None):
        plans.append(plan)
        return real(spec, seq_len, micro_batch, dtype, plan)

    monkeypatch.setattr(layer_stats, "capture", spy)
    return plans


def _same(a, b, spec: ModelSpec, seq: int) -> None:
    assert a.model_dump(exclude={"capture_time_s"}) == b.model_dump(exclude={"capture_time_s"})
    assert templates_from_stats(a, spec, seq, "bf16") == templates_from_stats(b, spec, seq, "bf16")


@pytest.mark.parametrize("case", list(CASES))
def test_reduced_capture_equals_full_depth(case, monkeypatch):
    spec, seq = CASES[case](), 32
    plans = _spy(monkeypatch)
    reduced = layer_stats.capture_stats(spec, seq, 1, "bf16")
    assert len(plans) == 1 and plans[0] is not None, "the reduced capture fell back to full depth"
    assert len(plans[0].kept) < spec.layers
    monkeypatch.undo()
    _same(reduced, _full(spec, seq), spec, seq)


def test_plans_for_the_big_presets():
    """Which layers stand for the rest: a uniform stack keeps its first three and its last; DeepSeek-V3
    its three dense layers, the first MoE layer after them, one more and the last."""
    assert depth.layer_plan(preset("llama3-8b")).kept == [0, 1, 2, 31]
    assert depth.layer_plan(preset("llama3-70b")).kept == [0, 1, 2, 79]
    plan = depth.layer_plan(preset("deepseek-v3"))
    assert plan.kept == [0, 1, 2, 3, 4, 5, 60]
    assert plan.stands_for[30] == 4 and plan.stands_for[3] == 3 and plan.stands_for[1] == 1
    assert depth.layer_plan(preset("gpt-tiny")) is None  # 4 layers: nothing to leave out


def test_unseen_layer_kinds_fall_back_to_full_depth(monkeypatch):
    """Told that every layer is alike, the reduction keeps [0, 1, 2, 7] of a model whose layers
    alternate dense and MoE; layer 2 then traces unlike layer 1, so the capture is redone at full
    depth, and the result is the full-depth one."""
    spec, seq = CASES["interleaved MoE"](), 32
    monkeypatch.setattr(depth, "layer_kind", lambda spec, index: ())
    plans = _spy(monkeypatch)
    stats = layer_stats.capture_stats(spec, seq, 1, "bf16")
    assert plans[0] is not None and plans[0].kept == [0, 1, 2, 7] and plans[1:] == [None]
    monkeypatch.undo()
    _same(stats, _full(spec, seq), spec, seq)
    assert [len(g.indices) for g in stats.blocks] == [4, 4]


def test_factories_and_transformers_modules_are_captured_at_full_depth():
    spec = preset("llama-tiny")
    assert depth.layer_plan(_spec(spec, layers=12, family="custom", factory="pkg.mod:fn")) is None
    assert depth.layer_plan(_spec(spec, layers=12, hf_config={"model_type": "llama"})) is None
    assert depth.layer_plan(_spec(spec, layers=12)) is not None
