"""The llm-foundry terms and mappings of issue 12 (F3): FSDP1 under Composer's ``mixed_precision: DEFAULT``
reduce-scatters fp32 gradients (``cost_models.fsdp.reduce_bytes``), and MPT-30B runs 64 heads of dim 112
(``benchmarks/published_foundry_rows.py``). autopar's own program (FSDP2, bf16 reduce) is untouched."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from autopar.cost_models import fsdp

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
MODERN = Path(__file__).resolve().parents[2] / "shared" / "validation" / "published_modern.yaml"


@pytest.fixture(scope="module")
def pfr():
    sys.path.insert(0, str(BENCH))
    import published_foundry_rows

    return published_foundry_rows


def test_reduce_bytes_by_program():
    """fp32 reduce-scatter for torchtitan and for FSDP1 under DEFAULT; the gradient dtype otherwise."""
    assert fsdp.reduce_bytes("torch", 2) == 2                        # autopar's FSDP2 program: bf16
    assert fsdp.reduce_bytes("torch", 2, "fsdp2") == 2
    assert fsdp.reduce_bytes("torch", 2, "fsdp1_pure") == 2          # Composer PURE: reduce_dtype bf16
    assert fsdp.reduce_bytes("torch", 2, "fsdp1_fp32_params") == 4   # Composer DEFAULT: reduce_dtype fp32
    assert fsdp.reduce_bytes("torchtitan", 2) == 4
    assert fsdp.reduce_bytes("torch", 4, "fsdp1_fp32_params") == 4   # fp32 training: nothing to widen


def _zero3_layer(tmp_path: Path, impl: str | None) -> tuple[float, float, float]:
    """(forward gather, backward gather, reduce-scatter) seconds of one layer of a small GPT on 8 A100-80GB,
    ZeRO-3, under FSDP implementation ``impl`` (None: the CostModel's default, autopar's program)."""
    from autopar.core.strategy import Strategy
    from autopar.cost_models.fsdp import FSDP1_IMPLS
    from autopar.cost_models.memory import bytes_per_param
    from autopar.cost_models.session import Inputs, build_cost_model

    cfg = tmp_path / "gpt.json"
    cfg.write_text(json.dumps(dict(model_type="gpt2", n_embd=2048, n_layer=4, n_head=16, vocab_size=1024,
                                   n_positions=1024)))
    cm, _, cluster, _ = build_cost_model(Inputs(model=str(cfg), gpu="a100-80g", seq_len=1024,
                                                runtime="llm-foundry" if impl in FSDP1_IMPLS else "torch",
                                                **({} if impl is None else {"fsdp_impl": impl})))
    s = Strategy.parse("dp=8,zero=3,mbs=1,gbs=16").resolve(cluster.world)
    costs = cm.layer_costs(s)
    return cm._zero3_layer(s, costs[cm.estimate(s).ranks[0].layers[0]], bytes_per_param(cm.dtype)[1])


def test_default_mixed_precision_reduce_scatters_twice_the_bytes(tmp_path):
    """Under DEFAULT the reduce-scatter moves fp32 gradients (twice the bf16 bytes: the ring's time is
    bandwidth-bound at this size), the gathers stay bf16; PURE and autopar's own FSDP2 program match."""
    own = _zero3_layer(tmp_path, None)
    pure = _zero3_layer(tmp_path, "fsdp1_pure")
    default = _zero3_layer(tmp_path, "fsdp1_fp32_params")
    assert own == pure
    assert default[:2] == pure[:2]
    assert default[2] == pytest.approx(2 * pure[2], rel=0.05)
    assert default[2] > 1.9 * pure[2]


def test_mpt_30b_runs_64_heads(pfr):
    """MPT-30B: d_model 7168, n_heads 64 (head dim 112); every other name keeps the row's count."""
    assert pfr.foundry_heads({"name": "MPT-30b", "hidden": 7168, "heads": 56}) == 64
    assert pfr.foundry_heads({"name": "MPT-13b", "hidden": 5120, "heads": 40}) == 40
    assert pfr.foundry_heads({"name": None, "hidden": 768, "heads": 12}) == 12


def test_fsdp_impl_by_mixed_precision(pfr):
    def case(stack, mode):
        return SimpleNamespace(stack=stack, run={"parallel": {"mp_mode": mode}})

    assert pfr.fsdp_impl(case("llm-foundry", "PURE")) == "fsdp1_pure"
    assert pfr.fsdp_impl(case("llm-foundry", "DEFAULT")) == "fsdp1_fp32_params"
    assert pfr.fsdp_impl(case("torchtitan", None)) == "fsdp2"
    assert pfr.fsdp_impl(case("meta", None)) == "meta"


@pytest.mark.skipif(not MODERN.is_file(), reason="shared/validation/published_modern.yaml absent")
def test_mpt_rows_price_the_yaml_head_dim(pfr):
    """Every MPT-30B row's model runs head dim 112; the other sizes the row's hidden / heads."""
    import published_rows as pr

    runs = [r for r in pr.load_runs(MODERN) if pr.source_key(r) == "llm-foundry"]
    thirty = [r for r in runs if r["model"]["name"] == "MPT-30b"]
    assert len(thirty) == 10
    for run in runs:
        cfg = pr.model_config(run)
        head_dim = cfg["n_embd"] // cfg["n_head"]
        assert head_dim == (112 if run in thirty else run["model"]["hidden"] // run["model"]["heads"]), run["id"]
