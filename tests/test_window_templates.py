"""Layers that alternate a sliding window with full attention (GPT-OSS) are priced apart
(``attention_rate.split_by_window``): capture groups them into one template, whose first layer decided the
attention of all of them."""

from __future__ import annotations

import json
import pickle
from dataclasses import replace

import pytest

# GPT-OSS's layout (benchmarks/published_rows.py ARCHS["GPT-OSS-120B"]) at toy size: window 128, alternate layers
TOY_OSS = dict(model_type="mixtral", hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
               num_key_value_heads=2, head_dim=64, intermediate_size=256, vocab_size=512, num_local_experts=8,
               num_experts_per_tok=2, attention_bias=True, mlp_bias=True, sliding_window=128,
               layer_types=["sliding_attention", "full_attention"] * 2, max_position_embeddings=2048)


def test_split_by_window_separates_window_layers_and_is_idempotent():
    from autopar.cost_models.attention_rate import split_by_window
    from autopar.cost_models.layer_model import LayerTemplate

    block = LayerTemplate(name="b", kind="block", indices=[0, 1, 2, 3])
    out = split_by_window([block], frozenset({0, 2}))
    assert [t.indices for t in out] == [[0, 2], [1, 3]]
    assert out[0].ops is block.ops                                  # the same captured ops, other layers
    assert [t.indices for t in split_by_window(out, frozenset({0, 2}))] == [[0, 2], [1, 3]]
    assert split_by_window([block], frozenset(range(4))) == [block]   # all windowed (Mistral): as it was
    assert split_by_window([block], frozenset()) == [block]


@pytest.fixture(scope="module")
def toy_oss(tmp_path_factory):
    from autopar.cost_models.session import Inputs, build_cost_model

    path = tmp_path_factory.mktemp("oss") / "config.json"
    path.write_text(json.dumps(TOY_OSS))
    return build_cost_model(Inputs(model=str(path), gpu="h100-sxm", nodes=1, gpus_per_node=8, seq_len=2048,
                                   runtime="megatron"))[0]


def test_megatron_prices_full_layers_above_window_layers(toy_oss):
    """The window layers' kernel reads ~2 key blocks per query tile (Megatron / TE skip the masked ones), the full
    layers' all causal ones: before the split every layer took layer 0's window price."""
    from autopar.core.strategy import Strategy

    cm = toy_oss
    blocks = [t for t in cm.templates if t.kind == "block"]
    assert sorted(t.indices for t in blocks) == [[0, 2], [1, 3]]
    costs = cm.layer_costs(Strategy.parse("dp=8,ep=8,mbs=1,gbs=8").resolve(8))
    assert costs[1].fwd_s > costs[0].fwd_s and costs[3].fwd_s == costs[1].fwd_s and costs[2].fwd_s == costs[0].fwd_s


def test_a_cost_model_pickled_before_the_split_splits_on_load(toy_oss):
    merged = [t for t in toy_oss.templates if t.kind != "block"]
    first = next(t for t in toy_oss.templates if t.kind == "block")
    old = pickle.loads(pickle.dumps(toy_oss))
    old.__dict__["templates"] = merged + [replace(first, indices=[0, 1, 2, 3])]
    state = old.__dict__.copy()
    loaded = object.__new__(type(toy_oss))
    loaded.__setstate__(state)
    assert sorted(t.indices for t in loaded.templates if t.kind == "block") == [[0, 2], [1, 3]]
    assert sorted(loaded.blocks) == [0, 1, 2, 3] and loaded.blocks[1].indices == [1, 3]
