"""The MoE layer of autopar's torch programs runs what its price counts (plan is program).

- One host sync per MoE layer forward: the token copies are sorted by expert once and their
  counts read with one ``.tolist()``; a per-expert ``nonzero`` blocked the host once per expert.
- The backward writes each stacked expert weight's gradient once (``unbind``'s stack); indexing
  ``w1[e]`` wrote a zero-filled gradient of the whole stack per expert and added them up.
- Numerics: the layer equals a per-token reference (the sum of the token's k experts, gate-weighted),
  experts without tokens included; the expert-parallel program is checked against one process in
  tests/test_codegen_runs.py.
- The price under ``--runtime torch`` adds the loop's output concatenation and gradient stack
  (``moe_cost.expert_loop_bytes``) to the captured ops, and nothing under ``--runtime megatron``.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from autopar.profiles.models.layers import MoE

H, FFN, E, K, T = 32, 48, 8, 2, 40


def _moe(seed: int = 0) -> MoE:
    torch.manual_seed(seed)
    m = MoE(H, FFN, E, K, 0)
    for p in m.parameters():
        torch.nn.init.normal_(p, std=0.1)
    return m


def _skewed_idx(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-2 assignments that leave experts 5..7 without tokens (as a freshly initialised router does)."""
    g = torch.Generator().manual_seed(seed)
    first = torch.randint(0, 3, (T,), generator=g)
    idx = torch.stack([first, 3 + (first + torch.randint(0, 2, (T,), generator=g)) % 2], dim=1)
    weight = torch.softmax(torch.randn(T, K, generator=g), dim=-1)
    return idx, weight


class _HostSyncs(TorchDispatchMode):
    """Ops that block the host on a GPU: data-dependent output shapes (``nonzero``, ``unique``...) and
    reads of tensor values to the host (``item``)."""

    def __init__(self):
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        tags = getattr(func, "tags", ())
        if func is torch.ops.aten.index.Tensor:  # dynamic only with a boolean mask
            blocks = any(i is not None and i.dtype == torch.bool for i in args[1])
        else:
            blocks = torch.Tag.dynamic_output_shape in tags or torch.Tag.data_dependent_output in tags
        if blocks:
            self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


def test_one_host_sync_per_moe_layer(monkeypatch):
    m, x = _moe(), torch.randn(2, T // 2, H)
    reads = []
    tolist = torch.Tensor.tolist
    monkeypatch.setattr(torch.Tensor, "tolist", lambda t: reads.append("tolist") or tolist(t))
    with _HostSyncs() as mode:
        m(x)
    assert len(mode.ops) + len(reads) == 1, (mode.ops, reads)  # was 9: eight nonzero + expert_ids.tolist()


class _StackWrites(TorchDispatchMode):
    """Outputs of the shape of a stacked expert weight, per shape."""

    def __init__(self, shapes):
        super().__init__()
        self.shapes, self.count = shapes, {s: 0 for s in shapes}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in [] if func.is_view else out if isinstance(out, (tuple, list)) else [out]:  # views write nothing
            if isinstance(t, torch.Tensor) and tuple(t.shape) in self.count:
                self.count[tuple(t.shape)] += 1
        return out


def test_backward_writes_each_stacked_gradient_once():
    m, x = _moe(), torch.randn(2, T // 2, H)
    y = m(x)
    ex = m.experts
    with _StackWrites({tuple(ex.w1.shape), tuple(ex.w2.shape)}) as mode:
        y.sum().backward()
    # w1 and w3 share a shape: one stack each; the per-expert w1[e] wrote 8 zero-filled stacks and 7 sums per weight
    assert mode.count == {tuple(ex.w1.shape): 2, tuple(ex.w2.shape): 1}


def _reference(m: MoE, x: torch.Tensor, idx: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Every token through each of its k experts, gate-weighted and summed (no sorting, no loop over experts)."""
    ex = m.experts
    w1, w3, w2 = ex.w1[idx], ex.w3[idx], ex.w2[idx]  # [T, k, ...]
    h = F.silu(torch.einsum("th,tkhf->tkf", x, w1)) * torch.einsum("th,tkhf->tkf", x, w3)
    return torch.einsum("tkf,tkfh,tk->th", h, w2, weight)


def test_experts_equal_the_per_token_reference_with_empty_experts():
    m = _moe()
    idx, weight = _skewed_idx()
    assert set(idx.reshape(-1).tolist()) == {0, 1, 2, 3, 4}
    x1, x2 = (torch.randn(T, H, generator=torch.Generator().manual_seed(1)).requires_grad_() for _ in range(2))
    got = m.experts(x1, idx, weight)
    got.square().sum().backward()
    grads = [p.grad.clone() for p in m.experts.parameters()]
    m.zero_grad()
    want = _reference(m, x2, idx, weight)
    want.square().sum().backward()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(x1.grad, x2.grad, rtol=1e-5, atol=1e-6)
    for g, p in zip(grads, m.experts.parameters()):
        torch.testing.assert_close(g, p.grad, rtol=1e-5, atol=1e-6)
    assert all(float(g[5:].abs().sum()) == 0.0 for g in grads)  # the experts without tokens: zero gradients


# ----- the price -----------------------------------------------------------------------------------
def _priced(runtime: str):
    from autopar.core.strategy import Strategy
    from autopar.cost_models.layer_cost import _op_time, expert_load, price_layer, runtime_ops, shards_for
    from autopar.cost_models.session import Inputs, build_cost_model

    cfg = {"model_type": "mixtral", "hidden_size": 256, "num_hidden_layers": 2, "num_attention_heads": 4,
           "num_key_value_heads": 2, "intermediate_size": 512, "num_local_experts": 8, "num_experts_per_tok": 2,
           "vocab_size": 512, "max_position_embeddings": 512}
    path = Path(tempfile.mkdtemp()) / "moe.json"
    path.write_text(json.dumps(cfg))
    cm = build_cost_model(Inputs(model=str(path), gpu="h100-sxm", gpus_per_node=1, seq_len=512, dtype="bf16",
                                 runtime=runtime))[0]
    s = Strategy.parse("dp=1,mbs=1,gbs=4").resolve(1)
    block = next(t for t in cm.templates if t.is_moe)
    sh = shards_for(s)
    ops_f = ops_b = 0.0
    for op in runtime_ops(block, runtime, 2):
        f, b = _op_time(op, s, sh, cm.ctx)
        load = expert_load(cm.ctx) if op.shard == "expert" else 1.0
        ops_f, ops_b = ops_f + f * load, ops_b + b * load
    from unittest import mock

    from autopar.cost_models import host_bound
    with mock.patch.object(host_bound, "host_launch_s", lambda gpu, runtime="torch": 0.0):  # the loop's terms alone,
        c = price_layer(block, s, cm.ctx)                                                 # not the eager host floor
    return c.fwd_s - ops_f, c.bwd_s - ops_b, cm, block


def test_torch_price_counts_the_expert_loop_and_megatron_does_not():
    from autopar.cost_models.moe_cost import expert_loop_bytes

    extra_f, extra_b, cm, block = _priced("torch")
    rows = 512 * 2  # tokens x top-k copies, one micro-batch
    cat, stack = expert_loop_bytes(rows, 256, block.params_expert, 2)
    assert stack == 2 * 2 * 3 * 8 * 256 * 512  # the three stacked weights' gradients read and written in bf16
    assert extra_f == pytest.approx(cm.ctx.timer.membound(cat)) and extra_f > 0
    assert extra_b == pytest.approx(cm.ctx.timer.membound(stack)) and extra_b > 0
    mf, mb, _, _ = _priced("megatron")  # grouped GEMM writes weight gradients in place: no loop terms (ep=1)
    assert mf == pytest.approx(0.0, abs=1e-12) and mb == pytest.approx(0.0, abs=1e-12)


def test_backward_peak_within_the_priced_gradient_stack():
    """One MoE layer's backward (live tensor bytes, as the closed loop measures on CPU) peaks at most at its
    expert gradients plus the priced stack transient (``moe_cost.expert_grad_stack_bytes``) and the input's
    gradient; indexing ``w1[e]`` per expert peaked about one more copy of the expert weights higher."""
    from autopar.codegen.runtime_mem import LiveTensorBytes
    from autopar.cost_models.moe_cost import expert_grad_stack_bytes

    tracker = LiveTensorBytes()
    with tracker:
        m = _moe()
        x = torch.randn(T, H, requires_grad=True)
        idx, weight = _skewed_idx()
        y = m.experts(x, idx, weight)
        grad = torch.randn_like(y)
        before = tracker.current
        tracker.peak = before
        y.backward(grad)
    expert_bytes = sum(p.numel() * p.element_size() for p in m.experts.parameters())
    allowed = expert_bytes + expert_grad_stack_bytes(expert_bytes) + x.numel() * x.element_size()
    assert tracker.peak - before <= allowed, (tracker.peak - before) / expert_bytes


def test_padded_expert_rows_change_nothing_but_the_gemm_shapes(monkeypatch):
    """On CUDA each expert's rows are padded to a multiple of ``row_bucket`` (cuBLAS then sees a few GEMM
    shapes, whose kernels stay chosen); forced on CPU here: the GEMM row counts are multiples of the bucket
    and the layer still equals the per-token reference, in the single-process and expert-parallel paths."""
    from autopar.codegen.runtime_moe import ExpertParallelGroupedExperts

    m = _moe()
    idx, weight = _skewed_idx()
    x = torch.randn(T, H, generator=torch.Generator().manual_seed(2))
    want = _reference(m, x, idx, weight)
    rows_seen = []
    run_sorted = type(m.experts).run_sorted
    monkeypatch.setattr(type(m.experts), "run_sorted", lambda self, r, c: rows_seen.append(c) or run_sorted(self, r, c))
    monkeypatch.setattr(type(m.experts), "row_bucket", {"cpu": 16})
    torch.testing.assert_close(m.experts(x, idx, weight), want, rtol=1e-5, atol=1e-6)
    counts = torch.bincount(idx.reshape(-1), minlength=E).tolist()
    assert rows_seen[-1] == [-(-c // 16) * 16 for c in counts] and sum(rows_seen[-1]) > T * K
    # expert parallel: this rank holds experts 3, 0, 6 (in that order) and received rows for 0 and 3
    ep = _moe().experts
    ep.local_expert_ids, ep.local_index = [3, 0, 6], torch.tensor([1, -1, -1, 0, -1, -1, 2, -1])
    ep.__class__ = ExpertParallelGroupedExperts
    rows, eids = torch.randn(10, H), torch.tensor([0, 3, 3, 0, 0, 3, 0, 0, 3, 0])
    got = ep._run_local(rows, eids)
    monkeypatch.setattr(type(m.experts), "row_bucket", {})
    torch.testing.assert_close(got, ep._run_local(rows, eids), rtol=1e-5, atol=1e-6)
    assert rows_seen[-2] == [16, 16, 0] and rows_seen[-1] == [4, 6, 0]
