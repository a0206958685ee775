"""llm-foundry's memory as its program runs (``cost_models.loss_memory.fused_loss``; the rows' headroom:
``benchmarks/published_fit.py``, docs/validation.md)."""

from __future__ import annotations

import pytest

from autopar.core.strategy import Strategy
from autopar.cost_models import loss_memory
from autopar.cost_models.session import Inputs, build_cost_model


def _output(runtime: str, **ctx):
    cm, _spec, _cluster, _ = build_cost_model(Inputs(model="llama-tiny", gpu="h100-sxm", nodes=1, gpus_per_node=8,
                                                     seq_len=64, dtype="bf16", runtime=runtime))
    for k, v in ctx.items():
        setattr(cm.ctx, k, v)
    s = Strategy.parse("dp=8,mbs=2,zero=3").resolve(8)
    return cm, cm.layer_costs(s)["output"]


def test_foundry_loss_keeps_16_bit_logits_and_writes_a_16_bit_gradient():
    """flash-attn's fused cross-entropy (MPT's default loss): the saved fp32 log-probabilities become the
    16-bit logits and the loss backward's two fp32 logit-sized tensors one 16-bit gradient, as a compiled loss."""
    cm, eager = _output("torch")
    _, foundry = _output("llm-foundry")
    _, compiled = _output("torch", compile="model+loss")
    lsm = sum(t.bytes for t in cm.output.saved if t.shard in ("tp", "vocab") and not t.const) * 2  # fp32, mbs 2
    assert foundry.temp_bytes == pytest.approx(lsm / 2) == pytest.approx(compiled.temp_bytes)
    assert eager.temp_bytes == pytest.approx(2 * lsm)
    assert eager.act_bytes["none"] - foundry.act_bytes["none"] == pytest.approx(lsm / 2)


def test_foundry_loss_leaves_the_step_price_alone(monkeypatch):
    """Memory only: the same job priced with the eager loss's bytes takes the same step time."""
    s = Strategy.parse("dp=8,mbs=2,zero=3").resolve(8)
    fused = _output("llm-foundry")[0].estimate(s)
    monkeypatch.setattr(loss_memory, "FUSED_LOSS_STACKS", ())
    eager = _output("llm-foundry")[0].estimate(s)
    assert fused.peak_bytes < eager.peak_bytes
    assert fused.step_time_s == eager.step_time_s


def test_foundry_attention_output_is_the_projection_input():
    """MPT reads flash-attention's [b, s, h, d] output as a view: one attention-output copy fewer per block than
    the captured graph keeps, in the modes that keep it (none, selective), none less under full recompute."""
    cm_t, _ = _output("torch")
    cm_f, _ = _output("llm-foundry")
    s = Strategy.parse("dp=8,mbs=2,zero=3").resolve(8)
    torch_block, foundry_block = cm_t.layer_costs(s)[0], cm_f.layer_costs(s)[0]
    out = next(t for t in cm_t.templates if t.kind == "block")
    sdpa = next(t.bytes for t in out.saved if t.name == "scaled_dot_product_attention") * 2  # mbs 2
    for mode in ("none", "selective"):
        assert torch_block.act_bytes[mode] - foundry_block.act_bytes[mode] == pytest.approx(sdpa)
    assert torch_block.act_bytes["full"] == foundry_block.act_bytes["full"]


@pytest.mark.parametrize("runtime,dtype,model", [
    ("llm-foundry", "bf16", "llama-tiny"), ("megatron", "fp8", "llama-tiny"), ("torch", "bf16", "llama-tiny"),
    ("megatron", "bf16", "moe-tiny"), ("megatron", "fp8", "moe-tiny"), ("torch", "bf16", "moe-tiny")])
def test_search_floor_stays_under_the_priced_activations(runtime, dtype, model):
    """The search prunes on its memory floor before pricing (``planner.bounds.floor_terms``): with the stacks'
    own saved bytes (fused loss, attention view, Megatron's closed form and fp8 inputs) its activations and loss
    phase must stay under the priced ones (``runtime_memory.floor_block_saved`` / ``floor_output_bytes``)."""
    from autopar.planner import search as S

    cm, _spec, _cluster, _ = build_cost_model(Inputs(model=model, gpu="h100-sxm", nodes=1, gpus_per_node=8,
                                                     seq_len=512, dtype=dtype, runtime=runtime))
    moe = ("dp=8,ep=4,mbs=8,zero=1", "dp=4,tp=2,sp=1,ep=2,mbs=8,zero=1") if cm.spec.is_moe else ()
    for text in ("dp=8,mbs=8,zero=3", "dp=4,tp=2,sp=1,mbs=8,zero=1", *moe):
        s = Strategy.parse(text).resolve(8)
        sh = S.Sharding(s.tp, s.cp, s.pp, s.dp, s.ep, s.etp, s.sequence_parallel, s.micro_batch)
        floor = S.floor_terms(cm, sh, ("none",))
        mem = cm.estimate(s, None, ["none"] * cm.num_layers).worst_rank.memory
        assert floor.act + floor.temps <= mem["activations"] + mem["logits_and_temporaries"] + 1e-6
