"""Expert tensor parallel (etp > 1): each rank keeps the rows its first expert linear reads gathered over the etp
group, ``etp`` times its own share (``layer_model.Shards.div``); the ffn-wide tensors after it are ``etp`` times the
rows at ``1/etp`` of the width, unchanged. Until 2026-11-27 every expert term was priced at the rank's share whatever
etp was.

Measured on autopar's program (``codegen.runtime_moe``, 2 gloo ranks, tests/etp_saved_count.py): one moe-tiny expert
layer saves, summed over the ranks, ``(etp - 1)`` dispatched-row tensors more under etp 2 than under ep 2 (the extra
beyond that: the int64 sort order of the gathered rows), and under either what the captured expert terms price. Two
program fixes made that so (both keep a tensor backward needs only the shape of): the put-back of ``_run_local``'s
outputs (``index_copy`` kept the etp group's rows x hidden) and the gate-weighted sum (``index_add`` kept the
weighted rows). Megatron-Core runs the same gather (stated below)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from autopar.core.strategy import Strategy
from autopar.cost_models.layer_cost import price_layer
from autopar.cost_models.layer_model import Shards, saved_bytes
from autopar.cost_models.runtime_memory import fused_saved
from autopar.cost_models.session import Inputs, build_cost_model

HERE = Path(__file__).parent


def _moe_tiny_block():
    cm = build_cost_model(Inputs(model="moe-tiny", seq_len=128, gpus_per_node=8))[0]
    return cm.spec, next(t for t in cm.templates if t.is_moe)


def _expert_saved(block, etp: int) -> float:
    experts = block.__class__(**{**block.__dict__, "saved": [t for t in block.saved if t.shard == "expert"]})
    return saved_bytes(experts, Shards(tokens=1, tp=1, sp=False, expert_div=1, etp=etp), "none")


def test_only_the_dispatched_rows_are_gathered():
    _, block = _moe_tiny_block()
    gathered = [t.name.split(":")[-1] for t in block.saved if t.etp_gathered]
    assert gathered == ["dispatched_x"]
    d = next(t for t in block.saved if t.etp_gathered).bytes
    assert _expert_saved(block, 4) - _expert_saved(block, 1) == pytest.approx(3 * d)
    # under tp the rank's share is 1/tp of the tokens, gathered back up by etp
    sh = Shards(tokens=2, tp=4, sp=True, expert_div=4, etp=2)
    assert sh.div(next(t for t in block.saved if t.etp_gathered)) == 2
    assert sh.div(next(t for t in block.saved if t.name.endswith(":w1_out"))) == 4


def test_etp_program_saves_what_is_priced(tmp_path):
    spec, block = _moe_tiny_block()
    tokens = 128
    out = tmp_path / "saved.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
           str(HERE / "etp_saved_count.py"), str(out), str(spec.hidden), str(spec.moe_ffn_hidden),
           str(spec.num_experts), str(spec.topk), str(tokens)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    got = json.loads(out.read_text())
    d = next(t for t in block.saved if t.etp_gathered)
    fp32 = 4 / (d.bytes / (128 * spec.topk * spec.hidden))   # the program runs fp32 on CPU
    priced = 2 * (_expert_saved(block, 2) - _expert_saved(block, 1)) * fp32 * tokens / 128   # two ranks
    assert got["etp2"] - got["ep2"] == pytest.approx(priced, rel=0.1)
    # and each whole: the captured expert terms (floats in fp32, the int64 indices as they are); beyond them only
    # the program's int64 sort orders (2-4% at hidden 64)
    for name, etp in (("ep2", 1), ("etp2", 2)):
        whole = sum(t.bytes * tokens / 128 / Shards(tokens=1, tp=1, sp=False, expert_div=1, etp=etp).div(t)
                    * (1 if t.name.endswith("_index") else fp32) for t in block.saved if t.shard == "expert")
        assert got[name] == pytest.approx(2 * whole, rel=0.04), name


def test_megatron_gathers_the_expert_input_over_etp():
    """The rule as Megatron-Core 0.16 states it (read from its source, megatron/core/transformer/moe):
    ``MoEAlltoAllTokenDispatcher.dispatch_postprocess`` runs, when ``self.tp_size > 1`` (the expert tensor-parallel
    group, ``pg_collection.expt_tp``), ``gather_from_sequence_parallel_region(global_input_tokens,
    group=self.tp_group)`` after the all-to-all; ``TEGroupedMLP.forward`` hands those rows to ``linear_fc1`` (TE's
    column-parallel grouped linear, which keeps its input for the weight gradient); ``combine_preprocess``
    reduce-scatters fc2's output back over the same group. So under etp the fc1 input each rank keeps is etp times
    its share, the same rule as autopar's program: one divisor serves both runtimes."""
    cm = build_cost_model(Inputs(model="moe-tiny", seq_len=128, gpus_per_node=8, runtime="megatron"))[0]
    block = next(t for t in cm.templates if t.is_moe)
    d = next(t for t in block.saved if t.etp_gathered).bytes

    def kept(strategy: str) -> float:
        s = Strategy.parse(strategy).resolve(8)
        return fused_saved(price_layer(block, s, cm.ctx), block, s, cm).act_bytes["none"]

    # the same 8 ranks and tp 2; etp 2 instead of ep 4: the fc1 input is kept whole (tp 2 / etp 2), not halved
    assert kept("tp=2,ep=2,etp=2,dp=-1,mbs=1,sp=1") - kept("tp=2,ep=4,etp=1,dp=-1,mbs=1,sp=1") == pytest.approx(d / 2)


def test_megatron_experts_keep_fc1_output_not_the_silu_output():
    """Megatron-Core's grouped MLP runs the fused bias-SwiGLU (``TEGroupedMLP.forward``: ``bias_swiglu_impl`` in
    0.11, ``weighted_bias_swiglu_impl`` in 0.16), whose autograd function saves its input (fc1's output, both
    halves: the captured ``w1_out`` and ``w3_out``) and re-runs the SiLU in backward; fc2 keeps the product
    (``w2_in``). So of the eager loop's captured expert tensors the SiLU output is not kept under ``--runtime
    megatron``, in every mode that keeps the experts' tensors; autopar's own program keeps it."""
    cm = build_cost_model(Inputs(model="moe-tiny", seq_len=128, gpus_per_node=8, runtime="megatron"))[0]
    block = next(t for t in cm.templates if t.is_moe)
    silu = next(t for t in block.saved if t.name.endswith(":silu_out"))
    s = Strategy.parse("tp=2,ep=2,etp=2,dp=-1,mbs=2,sp=1,recompute=selective").resolve(8)
    eager = price_layer(block, s, cm.ctx)
    fused = fused_saved(eager, block, s, cm)
    share = silu.bytes * 2 / 2     # mbs 2, over tp 2
    assert silu.bytes > 0
    for mode in ("none", "selective"):
        assert fused.act_bytes[mode] == pytest.approx(eager.act_bytes[mode] - share), mode
    assert fused.act_bytes["full"] == eager.act_bytes["full"]
