"""Recompute x context parallelism: what each recompute mode of the emitted program re-runs and keeps
under autopar's gathered cp (codegen.runtime_cp, runtime_ac) is what the price counts.

Collectives are counted by a ``TorchDispatchMode`` entered outside the model: torch's selective
checkpointing answers the ops its policy saved from its own cache above it, so only collectives that
really run reach the counter. Saved bytes: saved-tensor hooks (what autograd keeps outside the
checkpoints, and their inputs) plus the checkpoint policy's cache (``storage`` of its forward mode),
as tests/test_recompute_op.py reads them. A fake process group of 4 ranks runs it in one process; the
same counts on real gloo ranks: docs/architecture.md, "Recompute".
"""

from __future__ import annotations

import collections

import pytest
import torch
import torch.distributed as dist
from helpers_plans import tiny_spec
from torch.utils._python_dispatch import TorchDispatchMode

from autopar.codegen import runtime as rt
from autopar.codegen import runtime_ac
from autopar.core.strategy import Strategy
from autopar.cost_models.layer_cost import price_layer
from autopar.cost_models.memory import cp_kept_kv_bytes
from autopar.cost_models.session import Inputs, build_cost_model

SEQ, MBS = 64, 4
MODES = ("none", "selective", "op", "full")


@pytest.fixture(scope="module")
def fake_world():
    from torch.testing._internal.distributed.fake_pg import FakeStore

    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=4)
    yield
    dist.destroy_process_group()


class _Collectives(TorchDispatchMode):
    """Counts (phase, collective) of the ops that run; ``phase`` is set by the caller."""

    def __init__(self):
        super().__init__()
        self.phase, self.seen = "forward", collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace in ("_c10d_functional", "c10d") and "wait" not in func.__name__:
            self.seen[(self.phase, func.__name__.split(".")[0])] += 1
        return func(*args, **(kwargs or {}))


def _model(spec, cp: int, mode: str, contexts: list):
    """The emitted program's model on this rank: cp over the 4 ranks' mesh, ``mode`` on every block;
    the checkpoint policies' forward modes are appended to ``contexts``."""
    mesh = rt.build_mesh("cpu", dp=4 // cp, cp=cp)
    model = rt.build_meta_model(spec)
    rt.apply_cp(model, mesh, seq_len=SEQ)
    originals = {n: getattr(runtime_ac, n) for n in ("_selective_context", "op_context")}

    def recording(fn):
        def context():
            fwd, rec = fn()
            contexts.append(fwd)
            return fwd, rec
        return context

    for name, fn in originals.items():
        setattr(runtime_ac, name, recording(fn))
    try:
        if mode != "none":
            rt.apply_ac(model, {i: mode for i in range(spec.layers)})
    finally:
        for name, fn in originals.items():
            setattr(runtime_ac, name, fn)
    rt.materialize([model], spec, 0, torch.device("cpu"))
    return model


def _gathers_in_backward(model_name: str, mode: str) -> int:
    spec = tiny_spec(model_name, SEQ)
    model = _model(spec, 2, mode, [])
    tokens = torch.randint(0, spec.vocab, (MBS, SEQ // 2))
    count = _Collectives()
    with count:
        loss = rt.lm_loss(model(tokens), tokens)
        count.phase = "backward"
        loss.backward()
    assert count.seen[("forward", "all_gather_into_tensor")] == 2 * spec.layers  # K and V per block
    return count.seen[("backward", "all_gather_into_tensor")]


def _kept_bytes(model_name: str, cp: int, mode: str, local: int) -> int:
    """Bytes of the distinct storages one forward keeps for backward (``MBS`` sequences of ``local``
    tokens on this rank), parameters and buffers left out."""
    spec = tiny_spec(model_name, SEQ)
    contexts: list = []
    model = _model(spec, cp, mode, contexts)
    fixed = {t.untyped_storage()._cdata for t in [*model.parameters(), *model.buffers()]}
    seen: dict[int, int] = {}

    def keep(t):
        if isinstance(t, torch.Tensor) and t.device.type != "meta" and t.numel():
            seen[t.untyped_storage()._cdata] = t.untyped_storage().nbytes()

    tokens = torch.randint(0, spec.vocab, (MBS, local))
    with torch.autograd.graph.saved_tensors_hooks(lambda t: keep(t) or t, lambda t: t):
        rt.lm_loss(model(tokens), tokens)
    for ctx in contexts:  # what the checkpoint policies cached (selective, op)
        for entries in ctx.storage.values():
            for val in entries.values():
                for w in val if isinstance(val, (tuple, list)) else [val]:
                    keep(getattr(w, "val", w))
    return sum(b for k, b in seen.items() if k not in fixed)


def _cm(model_name: str):
    return build_cost_model(Inputs(model=model_name, gpu="cpu", gpus_per_node=4, seq_len=SEQ, dtype="fp32"))[0]


@pytest.mark.parametrize("mode", MODES)
def test_the_price_re_gathers_what_the_program_re_gathers(fake_world, mode):
    """Full and per-op recompute re-run the K/V all-gather in backward (op's policy does not save
    all-gathers); selective's policy saves it and no recompute has none to re-run. The block's
    priced recompute communication holds the gather's time exactly when the program re-runs it."""
    regathers = _gathers_in_backward("llama-tiny", mode)
    cm = _cm("llama-tiny")
    block = next(t for t in cm.templates if t.kind == "block")
    s = Strategy(dp=2, cp=2, micro_batch=MBS, global_batch=2 * MBS)
    priced = price_layer(block, s, cm.ctx).recompute_comm(mode)  # no tp or ep: the gather's time alone
    assert regathers == (2 * tiny_spec("llama-tiny").layers if mode in ("op", "full") else 0)
    assert (priced > 0) == (regathers > 0), (mode, priced)


@pytest.mark.parametrize("cp", [2, 4])
@pytest.mark.parametrize("model_name", ["llama-tiny", "moe-tiny"])
def test_each_mode_keeps_the_gathered_kv_the_price_adds(fake_world, model_name, cp):
    """Per mode, cp over S keeps what cp = 1 over S/cp keeps plus ``memory.cp_kept_kv_bytes`` per block:
    SDPA's repeated K/V (none), the all-gather's whole-sequence K/V (selective, whatever cp), nothing
    (op, full). The position mask (kept once per model, whatever the mode) is priced separately."""
    spec = tiny_spec(model_name, SEQ)
    cm = _cm(model_name)
    kv, sdpa = cm.ctx.kv_bytes_per_token, cm.ctx.sdpa_kv_bytes_per_token
    mask = SEQ / cp * SEQ * 4
    for mode in MODES:
        extra = _kept_bytes(model_name, cp, mode, SEQ // cp) - _kept_bytes(model_name, 1, mode, SEQ // cp)
        priced = spec.layers * cp_kept_kv_bytes(mode, MBS, SEQ, cp, 1, kv, sdpa)
        assert extra == pytest.approx(priced, abs=mask + 0.02 * priced), (mode, extra, priced)


def test_layer_price_keeps_per_mode_and_rebuilds_in_backward():
    """The block's act_bytes add the mode's kept K/V; op and full hold them again while their backward
    re-gathers (work_bytes)."""
    cm = _cm("llama-tiny")
    block = next(t for t in cm.templates if t.kind == "block")
    c2 = price_layer(block, Strategy(dp=1, cp=4, micro_batch=MBS, global_batch=MBS), cm.ctx)
    c1 = price_layer(block, Strategy(dp=4, micro_batch=MBS // 4, global_batch=MBS), cm.ctx)  # same local tokens
    kv, sdpa = cm.ctx.kv_bytes_per_token, cm.ctx.sdpa_kv_bytes_per_token
    for mode in MODES:
        assert c2.act_bytes[mode] - c1.act_bytes[mode] == pytest.approx(
            cp_kept_kv_bytes(mode, MBS, SEQ, 4, 1, kv, sdpa))
        rebuilt = cp_kept_kv_bytes("none", MBS, SEQ, 4, 1, kv, sdpa) if mode in ("op", "full") else 0.0
        assert c2.work_bytes[mode] - c1.work_bytes[mode] == pytest.approx(rebuilt)
