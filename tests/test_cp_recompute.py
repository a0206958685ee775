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

import helpers_collectives
import pytest
import torch
from helpers_plans import tiny_spec

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
    with helpers_collectives.fake_world(4):
        yield


class _Collectives(helpers_collectives.Collectives):
    """Counts (phase, collective) of the ops that run, SDPA calls and GEMM FLOPs (``mm`` / ``addmm``);
    ``phase`` is set by the caller."""

    def other(self, name: str, args: tuple) -> None:
        if name.startswith("_scaled_dot_product") and not name.endswith("_backward"):  # the forward kernel
            self.seen[(self.phase, "sdpa")] += 1
        elif name in ("mm", "addmm"):
            self.seen[(self.phase, "gemm_flops")] += 2 * args[-2].numel() * args[-1].shape[-1]


def _model(spec, cp: int, mode: str, contexts: list, tp: int = 1, sp: bool = False, etp: int = 1):
    """The emitted program's model on this rank: tp, cp over the 4 ranks' mesh (in build()'s order),
    ``mode`` on every block; the checkpoint policies' forward modes are appended to ``contexts``."""
    mesh = rt.build_mesh("cpu", dp=4 // (cp * tp), cp=cp, tp=tp, etp=etp)
    model = rt.build_meta_model(spec)
    if tp > 1:
        rt.apply_tp(model, mesh, sequence_parallel=sp)
    rt.apply_cp(model, mesh, seq_len=SEQ)
    if etp > 1:
        rt.apply_ep(model, mesh, None)
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


def _run(model_name: str, mode: str, cp: int = 1, tp: int = 1, sp: bool = False, etp: int = 1) -> collections.Counter:
    """What one forward and backward of the program runs, by phase (``_Collectives``)."""
    spec = tiny_spec(model_name, SEQ)
    model = _model(spec, cp, mode, [], tp, sp, etp)
    tokens = torch.randint(0, spec.vocab, (MBS, SEQ // cp))
    return _Collectives().step(model, tokens)


def _gathers_in_backward(model_name: str, mode: str) -> int:
    seen = _run(model_name, mode, cp=2)
    assert seen[("forward", "all_gather_into_tensor")] == 2 * tiny_spec(model_name).layers  # K and V per block
    return seen[("backward", "all_gather_into_tensor")]


def _kept_bytes(model_name: str, cp: int, mode: str, local: int) -> int:
    """Bytes of the distinct storages one forward keeps for backward (``MBS`` sequences of ``local``
    tokens on this rank), parameters and buffers left out."""
    spec = tiny_spec(model_name, SEQ)
    contexts: list = []
    model = _model(spec, cp, mode, contexts)
    fixed = {t.untyped_storage()._cdata for t in [*model.parameters(), *model.buffers()]}
    seen: dict[int, int] = {}

    def keep(t):
        t = getattr(t, "_local_tensor", t)  # a DTensor the policy cached: its shard is what the rank holds
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
        torch.manual_seed(0)
        at_cp1 = _kept_bytes(model_name, 1, mode, SEQ // cp)
        extra = _kept_bytes(model_name, cp, mode, SEQ // cp) - at_cp1
        priced = spec.layers * cp_kept_kv_bytes(mode, MBS, SEQ, cp, 1, kv, sdpa)
        # routing differs with the tokens: the experts' saved tensors move by a few hundredths of a percent
        assert extra == pytest.approx(priced, abs=mask + 0.01 * at_cp1), (mode, extra, priced)


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


def _block(cm):
    return next(t for t in cm.templates if t.kind == "block")


def test_full_and_selective_re_run_what_the_price_counts(fake_world):
    """Full recompute re-runs the block's GEMMs but the last linear (torch's checkpoint stops once the
    last saved tensor, w2's input, is rebuilt: ``early_stop_tail``); selective re-runs no GEMM and one
    SDPA per block (its policy saves the projections; ``attention_region``). The price: selective the
    region's forward (it was 0 for an SDPA graph), full the forward less the tail's."""
    from autopar.cost_models.recompute_cost import attention_region, early_stop_tail

    spec, cm = tiny_spec("llama-tiny", SEQ), _cm("llama-tiny")
    block = _block(cm)
    base, full, sel = (_run("llama-tiny", m) for m in ("none", "full", "selective"))
    tail = early_stop_tail(block, block.ops)
    kept = sum(o.fwd_flops for i, o in enumerate(block.ops) if o.kind == "gemm" and i not in tail) * MBS
    assert full["backward", "gemm_flops"] - base["backward", "gemm_flops"] == pytest.approx(spec.layers * kept)
    assert [block.ops[i].name for i in tail] == ["model_layers_0_feed_forward_w2", "add_3"]
    assert sel["backward", "gemm_flops"] == base["backward", "gemm_flops"]
    assert sel["backward", "sdpa"] == spec.layers and base["backward", "sdpa"] == 0
    region = [block.ops[i] for i in attention_region(block.ops)]
    assert sum(o.kind == "attention" for o in region) == 1 and not any(o.kind == "gemm" for o in region)
    c = price_layer(block, Strategy(dp=4, micro_batch=MBS, global_batch=4 * MBS), cm.ctx)
    assert 0 < c.recompute_s["selective"] < c.recompute_s["full"] < c.fwd_s


@pytest.mark.parametrize("sp", [False, True])
def test_tp_collectives_recompute_re_runs(fake_world, sp):
    """tp 2 (fake group): per block, full and op re-run the forward's collectives but the last
    sub-layer's output one (early stop); op keeps reduce-scatters. Without sp the forward holds ``rows``
    of the ``2 rows`` all-reduces (priced half before); with sp 2 all-gathers + 1 reduce-scatter of 4·rows."""
    from autopar.cost_models.layer_cost import _tp_modules

    layers = tiny_spec("llama-tiny").layers
    runs = {m: _run("llama-tiny", m, tp=2, sp=sp) for m in ("none", "op", "full")}
    names = ("all_reduce", "all_gather_into_tensor", "reduce_scatter_tensor")
    rerun = {m: {n: (runs[m]["backward", n] - runs["none"]["backward", n]) / layers for n in names}
             for m in ("op", "full")}
    cm = _cm("llama-tiny")
    block = _block(cm)
    rows, cols, _ = _tp_modules(block, sp)
    c = price_layer(block, Strategy(dp=2, tp=2, sequence_parallel=sp, micro_batch=MBS, global_batch=2 * MBS), cm.ctx)
    if sp:
        assert rerun["full"] == {"all_reduce": 0, "all_gather_into_tensor": rows, "reduce_scatter_tensor": rows - 1}
        assert rerun["op"] == {"all_reduce": 0, "all_gather_into_tensor": rows, "reduce_scatter_tensor": 0}
        assert c.recompute_comm("full") == pytest.approx(c.comm_s["tp"] * (2 * rows - 1) / (4 * rows))
        assert c.recompute_comm("op") == pytest.approx(c.comm_s["tp"] / 4)
    else:
        for m in ("op", "full"):
            assert rerun[m] == {"all_reduce": rows - 1, "all_gather_into_tensor": 0, "reduce_scatter_tensor": 0}
            assert c.recompute_comm(m) == pytest.approx(c.comm_s["tp"] * (rows - 1) / (2 * rows))


@pytest.mark.parametrize("model_name", ["llama-tiny", "gpt-tiny"])
def test_selective_keeps_what_the_price_counts(fake_world, model_name):
    """Selective (no cp, no tp) against no recompute, whole model: the attention module's re-run ops
    save nothing, the policy keeps the projections' outputs (``recompute_cost.selective_bytes``; it was
    priced as keeping all of none's). The price's none set also counts ``reshape``, a view of SDPA's output
    (one storage in the program): the measured gap is the priced one plus that term per block."""
    spec, cm = tiny_spec(model_name, SEQ), _cm(model_name)
    block = _block(cm)
    torch.manual_seed(0)
    measured = _kept_bytes(model_name, 1, "selective", SEQ) - _kept_bytes(model_name, 1, "none", SEQ)
    c = price_layer(block, Strategy(dp=4, micro_batch=MBS, global_batch=4 * MBS), cm.ctx)
    alias = sum(t.bytes * MBS for t in block.saved if t.name == "reshape")
    assert alias > 0 and c.act_bytes["selective"] < c.act_bytes["none"]
    assert measured == pytest.approx(spec.layers * (c.act_bytes["selective"] - c.act_bytes["none"] + alias))


def test_etp_collectives_are_re_run_by_full_and_op(fake_world):
    """moe-tiny, tp 2 and etp 2 (fake group): full and op re-run every forward collective of the expert
    tensor parallelism (the gathers of the received tokens and their reduction, ``dist`` calls the per-op
    policy does not save); the price adds the forward half of the etp time (it added none)."""
    from autopar.cost_models.layer_cost import _tp_modules
    from autopar.cost_models.recompute_cost import early_stop_tail, tp_rerun

    runs = {m: _run("moe-tiny", m, tp=2, etp=2) for m in ("none", "op", "full")}
    for m in ("op", "full"):
        for name in ("allgather_", "allreduce_"):
            assert runs[m]["backward", name] - runs["none"]["backward", name] == runs["none"]["forward", name] > 0
    cm = _cm("moe-tiny")
    block = next(t for t in cm.templates if t.is_moe)
    s = Strategy(dp=2, tp=2, etp=2, micro_batch=MBS, global_batch=2 * MBS)
    c = price_layer(block, s, cm.ctx)
    tail = [block.ops[i] for i in early_stop_tail(block, block.ops)]
    tp_full, tp_op = tp_rerun(block, s, "torch", c.comm_s["tp"], _tp_modules(block, False), tail,
                             cm.ctx.topk)
    assert c.comm_s["etp"] > 0
    assert c.recompute_comm("full") == pytest.approx(tp_full + c.comm_s["etp"] / 2)
    assert c.recompute_comm("op") == pytest.approx(tp_op + c.comm_s["etp"] / 2)


def test_the_search_floor_keeps_no_more_than_selective_keeps():
    """planner.bounds.floor_terms: the activation floor of a fixed selective recompute is no more than the
    price's blocks keep (it read none's set, above the emitted selective's: an inadmissible floor)."""
    from autopar.planner.bounds import floor_terms
    from autopar.planner.space import Sharding

    cm = _cm("llama-tiny")
    sh = Sharding(tp=1, cp=1, pp=1, dp=4, ep=1, etp=1, sp=False, mbs=MBS)
    floor = floor_terms(cm, sh, ("selective",))
    s = Strategy(dp=4, micro_batch=MBS, global_batch=4 * MBS)
    blocks = [t for t in cm.templates if t.kind == "block"]
    priced = sum(len(t.indices) * price_layer(t, s, cm.ctx).act_bytes["selective"] for t in blocks)
    edges = sum(price_layer(t, s, cm.ctx).act_bytes["none"] for t in cm.templates if t.kind != "block")
    assert floor.act_base <= priced + edges
