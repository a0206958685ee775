"""Per-op selective checkpointing (``recompute=op``): what the cost model says a block keeps is what
torch's selective-checkpoint policy keeps when the emitted runtime runs it.

Predicted: ``LayerGroup.op_saved`` from the captured graph (``profiles.layer_stats.op_policy``).
Measured: a real CPU forward of the model after ``runtime_ac.apply_ac(model, {i: "op"})``: the
checkpoint's own inputs through ``torch.autograd.graph.saved_tensors_hooks`` (model buffers such as
the RoPE tables are shared by every block and left out) plus the tensors the policy's caching mode
stores (its ``storage``: every op output it was told to save), counted once per storage.
"""

from __future__ import annotations

import pytest
import torch

from autopar.codegen import runtime_ac
from autopar.cost_models.layer_model import Shards, saved_bytes, working_bytes
from autopar.cost_models.templates import build_templates
from autopar.profiles.graph import capture
from autopar.profiles.intake import resolve_model
from autopar.profiles.layer_stats import summarize
from autopar.profiles.models import build_model

MBS, SEQ = 2, 32


def _predicted(spec, dtype: str) -> list[tuple[int, list[int]]]:
    """Per block: (bytes, sorted tensor sizes) of the op-policy set, without tp+sp-only tensors."""
    stats = summarize(capture(spec, SEQ, MBS, dtype))
    out = []
    for g in stats.blocks:
        kept = [t.bytes for t in g.op_saved if "sp_collective" not in t.tags]
        out += [(sum(kept), sorted(kept))] * g.count
    return out


def _measured(spec, dtype: torch.dtype) -> list[tuple[int, list[int]]]:
    torch.manual_seed(0)
    model = build_model(spec, "cpu").to(dtype)
    model.train()
    modes = []

    def recording_context():
        fwd, rec = runtime_ac.op_context()
        modes.append(fwd)
        return fwd, rec

    orig = runtime_ac.op_context
    runtime_ac.op_context = recording_context
    try:
        runtime_ac.apply_ac(model, {i: "op" for i in range(spec.layers)})
    finally:
        runtime_ac.op_context = orig
    buffers = {b.untyped_storage()._cdata for b in model.buffers()}
    current = {"block": None}
    inputs: dict[int, dict[int, int]] = {}
    for i, block in enumerate(model.layers.values()):
        block.register_forward_pre_hook(lambda m, a, i=i: current.update(block=i))
        block.register_forward_hook(lambda m, a, o: current.update(block=None))

    def pack(t):
        sid = t.untyped_storage()._cdata
        if current["block"] is not None and sid not in buffers:
            inputs.setdefault(current["block"], {})[sid] = t.untyped_storage().nbytes()
        return t

    tokens = torch.randint(0, spec.vocab, (MBS, SEQ))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(tokens).float().logsumexp(-1).mean()
    assert len(modes) == spec.layers  # one policy context per block forward
    out = []
    for i, mode in enumerate(modes):
        kept = dict(inputs.get(i, {}))
        for entries in mode.storage.values():
            for val in entries.values():
                for w in val if isinstance(val, (tuple, list)) else [val]:
                    t = getattr(w, "val", None)
                    if isinstance(t, torch.Tensor) and t.numel():
                        kept[t.untyped_storage()._cdata] = t.untyped_storage().nbytes()
        out.append((sum(kept.values()), sorted(kept.values())))
    loss.backward()  # the recompute replays the policy's choices (a mismatch raises)
    return out


@pytest.mark.parametrize("name,dtype", [("llama-tiny", "bf16"), ("llama-tiny", "fp32"), ("gpt-tiny", "fp32")])
def test_op_policy_keeps_what_the_graph_predicts(name, dtype):
    spec = resolve_model(name)
    predicted = _predicted(spec, dtype)
    measured = _measured(spec, {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype])
    assert len(predicted) == len(measured) == spec.layers
    for p, m in zip(predicted, measured):
        assert p == m  # same tensor count, same sizes, same bytes


def test_op_pricing_lies_between_selective_and_full():
    """llama3-8b at s=8192: per layer and micro-batch of 1, op keeps the block input, wq, wv, the
    attention output + logsumexp, w1 and w2 outputs (497 MiB), far below no recompute and above full."""
    spec = resolve_model("llama3-8b")
    block = next(t for t in build_templates(spec, 8192, "bf16") if t.kind == "block")
    sh = Shards(tokens=1, tp=1, sp=False, expert_div=1)
    op, none, full = (saved_bytes(block, sh, m) for m in ("op", "none", "full"))
    assert op == pytest.approx(497 * 2**20)
    assert full < op < none
    assert working_bytes(block, sh, "op") == pytest.approx(none - op)
    # tp=4 with sequence parallel: column outputs and attention split by 4, the block input too,
    # the row-parallel partial sum (w2) stays full size, two reduce-scatter outputs join
    sp = Shards(tokens=1, tp=4, sp=True, expert_div=4)
    mib = 2**20
    expected = (64 / 4 + (64 + 16 + 64 + 1 + 224) / 4 + 64 + 2 * 64 / 4) * mib
    assert saved_bytes(block, sp, "op") == pytest.approx(expected)


def _grads_with_dropout(spec, mode: str) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    model = build_model(spec, "cpu")
    model.train()
    runtime_ac.apply_ac(model, {i: mode for i in range(spec.layers)})
    tokens = torch.randint(0, spec.vocab, (MBS, SEQ + 1), generator=torch.Generator().manual_seed(1))
    torch.manual_seed(2)  # the same dropout masks in every mode's forward
    logits = model(tokens[:, :-1])
    torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), tokens[:, 1:].flatten()).backward()
    return {n.replace("._checkpoint_wrapped_module", ""): p.grad for n, p in model.named_parameters()}


def test_recompute_replays_the_forward_dropout_masks():
    """A model with dropout: the recompute draws the forward's masks again (preserve_rng_state is
    on where a block has dropout, off otherwise), so full and op give the gradients of no recompute."""
    spec = resolve_model("gpt-tiny").model_copy(update={"dropout": 0.2})  # attention, residual dropout
    assert runtime_ac.has_dropout(next(iter(build_model(spec, "meta").layers.values())))
    assert not runtime_ac.has_dropout(next(iter(build_model(resolve_model("llama-tiny"), "meta").layers.values())))
    ref = _grads_with_dropout(spec, "none")
    for mode in ("full", "op", "selective"):
        got = _grads_with_dropout(spec, mode)
        assert got.keys() == ref.keys()
        for name, g in ref.items():
            torch.testing.assert_close(got[name], g, msg=f"{mode}: {name}")
