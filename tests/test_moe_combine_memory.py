"""The single-process MoE layer (``GroupedExperts``, ep = etp = 1) keeps for backward what its price counts.

Its gate-weighted combine was ``torch.zeros_like(x).index_add(0, token, y)``, whose backward keeps the source ``y``
(rows x hidden, PyTorch derivatives.yaml: ``expand_as(source)``) for its shape alone; the captured expert terms
(``profiles.graph``: dispatched rows, w1 / silu / w3 outputs, w2 input and output, gate weights, token and slot
indices) count no such tensor, and the expert-parallel path had already dropped it (``WeightedSum``). Now both paths
run ``layers.WeightedSum``. Measured here with saved-tensor hooks (once per storage, parameters left out); the
gradients equal the old combine's."""

from __future__ import annotations

import pytest
import torch

from autopar.cost_models.session import Inputs, build_cost_model
from autopar.profiles.models import layers
from autopar.profiles.models.layers import GroupedExperts

TOKENS = 128


def _moe_tiny_block():
    cm = build_cost_model(Inputs(model="moe-tiny", seq_len=TOKENS, gpus_per_node=8))[0]
    return cm.spec, next(t for t in cm.templates if t.is_moe)


def _inputs(spec, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(TOKENS, spec.hidden, generator=gen, requires_grad=True)
    idx = torch.stack([torch.randperm(spec.num_experts, generator=gen)[:spec.topk] for _ in range(TOKENS)])
    weight = torch.rand(TOKENS, spec.topk, generator=gen, requires_grad=True)
    return x, idx, weight


def _layer(spec) -> GroupedExperts:
    torch.manual_seed(0)
    layer = GroupedExperts(spec.hidden, spec.moe_ffn_hidden, spec.num_experts)
    for p in layer.parameters():
        torch.nn.init.normal_(p, std=0.1)
    return layer


def _saved_bytes(layer, x, idx, weight) -> int:
    params = {p.untyped_storage().data_ptr() for p in layer.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in params:
            seen[st.data_ptr()] = max(seen.get(st.data_ptr(), 0), st.nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        layer(x, idx, weight)
    return sum(seen.values())


def _index_add_forward(self, x, idx, weight):
    """The combine before WeightedSum (the reference for the gradients)."""
    k, flat = idx.shape[1], idx.reshape(-1)
    order = torch.argsort(flat, stable=True)
    counts = layers.expert_counts(flat, self.w1.shape[0]).tolist()
    token, gate = order // k, weight.reshape(-1).index_select(0, order)
    y = self.run_sorted(x.index_select(0, token), counts) * gate.unsqueeze(-1)
    return torch.zeros_like(x).index_add(0, token, y)


def test_single_process_layer_saves_the_captured_expert_terms():
    spec, block = _moe_tiny_block()
    experts = [t for t in block.saved if t.shard == "expert"]
    d = next(t for t in experts if t.name.endswith(":dispatched_x"))
    fp32 = 4 / (d.bytes / (TOKENS * spec.topk * spec.hidden))   # the program runs fp32 on CPU
    priced = sum(t.bytes * (1 if t.name.endswith("_index") else fp32) for t in experts)
    got = _saved_bytes(_layer(spec), *_inputs(spec))
    # beyond the captured terms only the int64 sort order (rows x 8 bytes); the old combine kept rows x hidden more
    assert priced <= got <= priced + TOKENS * spec.topk * 8, (got, priced)


def test_combine_gradients_equal_the_index_add_combine(monkeypatch):
    spec, _ = _moe_tiny_block()
    grads = []
    for forward in (GroupedExperts.forward, _index_add_forward):
        monkeypatch.setattr(GroupedExperts, "forward", forward)
        layer, (x, idx, weight) = _layer(spec), _inputs(spec, seed=1)
        y = layer(x, idx, weight)
        y.backward(torch.randn(y.shape, generator=torch.Generator().manual_seed(2)))
        grads.append([y.detach(), x.grad, weight.grad] + [p.grad for p in layer.parameters()])
    for new, old in zip(*grads):
        torch.testing.assert_close(new, old, rtol=0, atol=0)


@pytest.mark.parametrize("bucket", [1, 16])
def test_padded_rows_get_zero_gate_gradient_only(monkeypatch, bucket):
    """Pad rows (CUDA's row bucket, forced here) carry a zero gate weight: the combine's gradients equal the unpadded
    layer's."""
    spec, _ = _moe_tiny_block()
    monkeypatch.setattr(GroupedExperts, "row_bucket", {"cpu": bucket})
    layer, (x, idx, weight) = _layer(spec), _inputs(spec, seed=3)
    layer(x, idx, weight).sum().backward()
    monkeypatch.setattr(GroupedExperts, "row_bucket", {})
    ref, (x0, _, w0) = _layer(spec), _inputs(spec, seed=3)
    ref(x0, idx, w0).sum().backward()
    torch.testing.assert_close(x.grad, x0.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(weight.grad, w0.grad, rtol=1e-5, atol=1e-6)
