"""Which tokens Megatron-Core's MoE router reads under sequence parallel: each tp rank's own shard, shared experts
or not, as autopar's torch program does since 2026-11-27 -- one rule, ``techniques.moe_program.moe_tokens_local``
(its docstring cites Megatron-Core), which ``layer_cost.shards_for`` reads for every runtime."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import pytest

QWEN2_MOE = dict(model_type="qwen2_moe", hidden_size=256, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, moe_intermediate_size=128, shared_expert_intermediate_size=512,
                 num_experts=8, num_experts_per_tok=2, vocab_size=512, max_position_embeddings=512)


def _block(runtime: str):
    from autopar.cost_models.session import Inputs, build_cost_model

    path = Path(tempfile.mkdtemp()) / "qwen2_moe_small.json"
    path.write_text(json.dumps(QWEN2_MOE))
    cm = build_cost_model(Inputs(model=str(path), gpu="h100-sxm", nodes=1, gpus_per_node=8, seq_len=512,
                                 runtime=runtime))[0]
    return cm, next(t for t in cm.templates if t.is_moe)


def test_rule_routes_the_shard_under_sp_with_expert_parallel_shared_experts_or_not():
    from autopar.techniques.moe_program import moe_tokens_local

    assert moe_tokens_local(True, 2, 1) and moe_tokens_local(True, 1, 2)
    assert not moe_tokens_local(False, 4, 1)   # no sp: every tp rank holds the whole sequence
    assert not moe_tokens_local(True, 1, 1)    # experts replicated over tp: the whole sequence


@pytest.mark.parametrize("sp", [True, False])
def test_megatron_prices_a_shared_expert_router_on_the_shard(sp):
    """A Qwen2-MoE block (shared expert) on tp 2, ep 2: under sp the Megatron price (and the torch price: the same
    rule) reads the router's GEMM and its elementwise ops on half the tokens; without sp both on all."""
    import dataclasses

    from autopar.core.strategy import Strategy
    from autopar.cost_models.layer_cost import _local_gemm, _op_time, shards_for

    s = Strategy.parse(f"tp=2,sp={int(sp)},ep=2,dp=4,mbs=1,gbs=8").resolve(8)
    cm, block = _block("megatron")
    router = [o for o in block.ops if o.shard == "router"]
    gate = next(o for o in router if o.kind == "gemm")
    assert cm.ctx.runtime == "megatron"
    mega, torch_sh = shards_for(s, block), shards_for(s, _block("torch")[1])
    assert torch_sh.router_div == mega.router_div == (2 if sp else 1)
    torch_sh = dataclasses.replace(mega, router_div=1)   # the router on the whole sequence
    whole = _local_gemm(gate, s, torch_sh)[0]
    assert _local_gemm(gate, s, mega)[0] == whole / mega.router_div
    assert whole == gate.gemm[0] * s.micro_batch
    for op in (o for o in router if o.kind == "membound"):   # softmax / top-k: the shard's bytes
        local = _op_time(op, s, mega, cm.ctx)[0]
        assert local == pytest.approx(cm.ctx.timer.membound(op.bytes_rw * s.micro_batch / mega.router_div,
                                                            op.fwd_flops * s.micro_batch / mega.router_div))


def test_megatron_shared_expert_layer_moves_by_its_router_alone():
    """Routing the shard moves the Megatron price of a shared-expert layer by the router's own ops and nothing
    else: the expert GEMMs, the shared expert and the collectives keep their price."""
    import dataclasses
    from unittest import mock

    from autopar.core.strategy import Strategy
    from autopar.cost_models import layer_cost
    from autopar.cost_models.layer_cost import _op_time, price_layer, runtime_ops, shards_for

    s = Strategy.parse("tp=2,sp=1,ep=2,dp=4,mbs=1,gbs=8").resolve(8)
    cm, block = _block("megatron")
    local = price_layer(block, s, cm.ctx)
    with mock.patch.object(layer_cost, "routes_local_tokens", lambda *a: False):
        whole = price_layer(block, s, cm.ctx)
    assert local.comm_s == whole.comm_s
    router = [o for o in runtime_ops(block, "megatron", 2) if o.shard == "router"]
    local_sh = shards_for(s, block)
    moved = [sum(_op_time(o, s, sh, cm.ctx)[i] for o in router)
             for sh in (dataclasses.replace(local_sh, router_div=1), local_sh) for i in (0, 1)]
    assert whole.fwd_s - local.fwd_s == pytest.approx(moved[0] - moved[2])
    assert whole.bwd_s - local.bwd_s == pytest.approx(moved[1] - moved[3])
    assert moved[2] != moved[0]
