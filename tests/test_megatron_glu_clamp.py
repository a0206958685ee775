"""GPT-OSS clamps its gated activation's inputs (config ``swiglu_limit`` 7); Megatron-Core runs that clamp eagerly
before its fused activation kernel (``megatron_ops.glu_clamp_bytes``), priced under ``--runtime megatron`` only."""

from __future__ import annotations

import json

import pytest

TOY = dict(model_type="mixtral", hidden_size=256, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
           intermediate_size=384, vocab_size=512, num_local_experts=8, num_experts_per_tok=2, mlp_bias=True,
           max_position_embeddings=512)


def _cost_model(tmp_path, runtime: str, **extra):
    from autopar.cost_models.session import Inputs, build_cost_model

    path = tmp_path / f"{runtime}_{len(extra)}.json"
    path.write_text(json.dumps({**TOY, **extra}))
    return build_cost_model(Inputs(model=str(path), gpu="h100-sxm", nodes=1, gpus_per_node=8, seq_len=512,
                                   runtime=runtime))[0]


def test_clamp_bytes_count_the_eager_clamps_cat_and_their_gradients():
    from autopar.cost_models.megatron_ops import glu_clamp_bytes

    fwd, bwd = glu_clamp_bytes(1000, 64, 2)
    assert fwd == 1000 * 64 * (2 * 2 + 2 * 2 + 4 * 2)          # two clamps (read + write a half each), one cat
    assert bwd == 1000 * 64 * ((2 + 1 + 1 + 2 * 2) + (2 * (2 + 1) + 3 + 1 + 2 * 2) + 4 * 2)   # clamp_max, clamp, cat
    assert glu_clamp_bytes(1000, 0, 2) == (0.0, 0.0)


def test_config_swiglu_limit_reaches_the_spec_and_the_published_gpt_oss_row(tmp_path):
    import sys
    from pathlib import Path

    from autopar.profiles.intake import from_hf_config

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import published_rows as pr

    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps({**TOY, "swiglu_limit": 7.0}))
    assert from_hf_config(cfg).glu_clamp == 7.0
    cfg.write_text(json.dumps(TOY))
    assert from_hf_config(cfg).glu_clamp == 0.0
    cfg.write_text(json.dumps(pr.ARCHS["GPT-OSS-120B"]))
    assert from_hf_config(cfg).glu_clamp == 7.0


@pytest.mark.parametrize("ep,etp,rows", [(8, 1, 1024), (4, 2, 2048)])
def test_megatron_prices_the_clamp_on_the_ranks_received_rows(tmp_path, ep, etp, rows):
    """8 ranks: 8 x 512 tokens x top-2 over 8 experts is 1024 rows per expert; a rank runs its 8 / ep experts on
    them (gathered over etp), each the gate half's width (intermediate 384) split by etp, moving ``glu_clamp_bytes``
    beside the experts at the busiest expert's load; the torch programs' price does not clamp (autopar's models run
    no clamp)."""
    from autopar.core.strategy import Strategy
    from autopar.cost_models.layer_cost import _expert_passes, expert_load, shards_for
    from autopar.cost_models.megatron_ops import glu_clamp_bytes

    s = Strategy.parse(f"dp=8,ep={ep},etp={etp},mbs=1,gbs=8").resolve(8)
    plain, clamped = _cost_model(tmp_path, "megatron"), _cost_model(tmp_path, "megatron", swiglu_limit=7.0)
    assert clamped.ctx.glu_clamp == 7.0 and plain.ctx.glu_clamp == 0.0
    moe = next(t for t in clamped.templates if t.is_moe)
    got = [a - b for a, b in zip(_expert_passes(moe, s, shards_for(s, moe), clamped.ctx),
                                 _expert_passes(moe, s, shards_for(s, moe), plain.ctx))]
    f, b = glu_clamp_bytes(rows, 384 / etp, 2)
    timer, load = clamped.ctx.timer, expert_load(clamped.ctx)
    # membound is not linear (its rate curve): compare against the passes priced together, as expert_passes_s does
    assert got[0] > 0 and got[1] > got[0]
    assert got[0] == pytest.approx(load * (timer.membound(f + _bias(rows)) - timer.membound(_bias(rows))), rel=1e-9)
    assert got[1] == pytest.approx(load * (timer.membound(b + _bias(rows)) - timer.membound(_bias(rows))), rel=1e-9)
    torch_plain, torch_clamped = _cost_model(tmp_path, "torch"), _cost_model(tmp_path, "torch", swiglu_limit=7.0)
    moe_t = next(t for t in torch_clamped.templates if t.is_moe)
    sh = shards_for(s, moe_t)
    assert _expert_passes(moe_t, s, sh, torch_clamped.ctx) == _expert_passes(moe_t, s, sh, torch_plain.ctx)


def _bias(rows: float) -> float:
    from autopar.cost_models.megatron_ops import expert_bias_bytes

    return expert_bias_bytes(rows, 256, 2)[0]


@pytest.mark.parametrize("strategy,rows,width", [("ep=8,etp=1", 1024, 384), ("ep=4,etp=2", 2048, 192),
                                                 ("tp=2,sp=1,ep=4,etp=1", 512, 384)])
def test_megatron_saves_the_clamped_copy_of_fc1(tmp_path, strategy, rows, width):
    """Megatron-Core's fused activation saves the concatenated clamped copy beside the fc1 output the clamps keep
    (``megatron_ops.glu_clamp_saved_bytes``): one more [rows, 2 x width] bf16 per MoE block and micro-batch on the
    rank's received rows (dp 8 x 512 tokens x top-2 over 8 experts: 1024 rows per expert; ``tp 2``: the tp group's
    tokens split before dispatch), at the busiest expert rank's load, in every recompute mode but full; neither the
    output layer, nor the torch program, nor an unclamped model moves."""
    from autopar.core.strategy import Strategy
    from autopar.cost_models.megatron_ops import glu_clamp_saved_bytes
    from autopar.cost_models.memory import busiest_rank_expert_excess
    from autopar.cost_models.moe_cost import capped_load

    assert glu_clamp_saved_bytes(1000, 64, 2) == 1000 * 2 * 64 * 2
    s = Strategy.parse(f"dp=-1,{strategy},mbs=1,gbs=8").resolve(8)
    for runtime in ("megatron", "torch"):
        plain, clamped = _cost_model(tmp_path, runtime), _cost_model(tmp_path, runtime, swiglu_limit=7.0)
        got, base = clamped.layer_costs(s), plain.layer_costs(s)
        load = capped_load(clamped.ctx.expert_load_ratio, clamped.ctx.moe_capacity_factor)
        copy = (rows * 2 * width * 2) * (1 + busiest_rank_expert_excess(1.0, load)) if runtime == "megatron" else 0.0
        for i, t in clamped.blocks.items():
            extra = copy if t.is_moe else 0.0
            for mode, b in base[i].act_bytes.items():
                assert got[i].act_bytes[mode] - b == pytest.approx(extra if mode != "full" else 0.0, abs=1e-3), mode
        assert got["output"].act_bytes == base["output"].act_bytes
