"""Context parallelism's memory: what the emitted cp program keeps for backward is what the price
counts (cost_models.memory.cp_gathered_kv_bytes, layer_cost.shards_for).

The program's saved tensors are read with ``torch.autograd.graph.saved_tensors_hooks`` (every
storage a forward keeps for backward, counted once) on a fake process group of 2 ranks: the same
model at cp=2 over sequence S and at cp=1 over S/2 hold the same local tokens, so the difference
of their saved bytes is what context parallelism adds (the all-gathered K/V). The closed loop on
real gloo ranks: docs/validation.md, "Context parallelism and large micro-batches on CPU ranks".
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from helpers_plans import tiny_spec

from autopar.codegen import runtime as rt
from autopar.core.strategy import Strategy
from autopar.cost_models.layer_cost import price_layer
from autopar.cost_models.memory import cp_gathered_kv_bytes, cp_mask_bytes
from autopar.cost_models.session import Inputs, build_cost_model

SEQ, MBS = 64, 4


@pytest.fixture
def fake_world():
    from torch.testing._internal.distributed.fake_pg import FakeStore

    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=2)
    yield
    dist.destroy_process_group()


def _saved_bytes(model_name: str, cp: int) -> int:
    """Bytes of the distinct storages one forward of the whole model keeps for backward, on this
    rank: ``MBS`` sequences of ``SEQ / 2`` tokens each (cp=2: half of every sequence of SEQ)."""
    spec = tiny_spec(model_name, SEQ)
    mesh = rt.build_mesh("cpu", dp=2 // cp, cp=cp)
    model = rt.build_meta_model(spec)
    rt.apply_cp(model, mesh, seq_len=SEQ)
    rt.materialize([model], spec, 0, torch.device("cpu"))
    seen: dict[int, int] = {}

    def pack(t):
        if t.device.type != "meta" and not isinstance(t, torch.nn.Parameter):
            st = t.untyped_storage()
            seen[st._cdata] = st.nbytes()
        return t

    tokens = torch.randint(0, spec.vocab, (MBS, SEQ // 2))
    params = {p.untyped_storage()._cdata for p in model.parameters()}
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        rt.lm_loss(model(tokens), tokens)
    return sum(b for k, b in seen.items() if k not in params)


def _cm(model_name: str, seq: int):
    return build_cost_model(Inputs(model=model_name, gpu="cpu", gpus_per_node=2, seq_len=seq, dtype="fp32"))[0]


@pytest.mark.parametrize("model_name", ["llama-tiny", "moe-tiny"])
def test_cp_keeps_the_gathered_kv_the_price_adds(fake_world, model_name):
    """cp=2 over S keeps (cp - 1) more copies of the local K/V per block than cp=1 over S/2 (SDPA
    saves the all-gathered [mbs, heads, S, d]; the local ones are freed) and one position mask that
    every block shares: the price's terms, to 1% (the rest: RoPE tables, sliced as views at cp=1)."""
    extra = _saved_bytes(model_name, 2) - _saved_bytes(model_name, 1)
    cm = _cm(model_name, SEQ)
    layers = cm.spec.layers
    priced = layers * cp_gathered_kv_bytes(MBS, SEQ, 2, 1, cm.ctx.sdpa_kv_bytes_per_token) + cp_mask_bytes(SEQ, 2, 4)
    assert priced > 0 and extra == pytest.approx(priced, rel=0.01), (extra, priced)


def test_expert_activations_are_divided_by_cp_once():
    """A MoE block at cp=2, mbs 2m holds the tokens of cp=1, mbs m (same sequence): the same saved
    bytes but the gathered K/V (the expert terms were once divided by cp twice)."""
    cm = _cm("moe-tiny", SEQ)
    block = next(t for t in cm.templates if t.is_moe)
    at_cp2 = price_layer(block, Strategy(dp=1, cp=2, micro_batch=2 * MBS, global_batch=2 * MBS), cm.ctx)
    at_cp1 = price_layer(block, Strategy(dp=2, micro_batch=MBS, global_batch=2 * MBS), cm.ctx)
    kv = cp_gathered_kv_bytes(2 * MBS, SEQ, 2, 1, cm.ctx.sdpa_kv_bytes_per_token)
    assert at_cp2.act_bytes["none"] - kv == pytest.approx(at_cp1.act_bytes["none"])
    assert at_cp2.act_bytes["full"] == pytest.approx(at_cp1.act_bytes["full"])  # full recompute keeps the input
    assert at_cp2.work_bytes["full"] - kv == pytest.approx(at_cp1.work_bytes["full"])  # ... and rebuilds them


def test_other_runtimes_and_no_cp_unchanged():
    """The gathered K/V are autopar's all-gather attention: none without cp, none for Megatron's ring."""
    assert cp_gathered_kv_bytes(4, 1024, 1, 1, 512.0) == cp_mask_bytes(1024, 1, 2) == 0.0
    cm = build_cost_model(Inputs(model="moe-tiny", gpu="h100-sxm", seq_len=SEQ, runtime="megatron"))[0]
    block = next(t for t in cm.templates if t.is_moe)
    s = Strategy(dp=1, cp=2, micro_batch=2 * MBS, global_batch=2 * MBS)
    assert price_layer(block, s, cm.ctx).act_bytes["none"] == pytest.approx(
        price_layer(block, Strategy(dp=2, micro_batch=MBS, global_batch=2 * MBS), cm.ctx).act_bytes["none"])
