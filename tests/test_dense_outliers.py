"""Terms and mappings behind the dense published rows that autopar mispriced (docs/validation.md,
"Outlier rows, by mechanism"): one test per term."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from autopar.core.strategy import Strategy

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def _gpt_like(tmp_path: Path, parallel: bool) -> Path:
    """A tiny GPT (LayerNorm, GeLU MLP 4h, multi-head attention): sequential (gpt2) or in the
    one-norm parallel layout (the Falcon configuration ``published_rows`` maps MegaScale's PTB to)."""
    if parallel:
        cfg = dict(model_type="falcon", hidden_size=256, num_hidden_layers=2, num_attention_heads=8,
                   multi_query=False, new_decoder_architecture=False, parallel_attn=True, bias=True,
                   ffn_hidden_size=1024, vocab_size=1024, max_position_embeddings=256)
    else:
        cfg = dict(model_type="gpt2", n_embd=256, n_layer=2, n_head=8, n_inner=1024, vocab_size=1024, n_positions=256)
    path = tmp_path / ("ptb.json" if parallel else "gpt.json")
    path.write_text(json.dumps(cfg))
    return path


def _block_tp_comm(model: Path, runtime: str) -> float:
    from autopar.cost_models.layer_cost import price_layer
    from autopar.cost_models.session import Inputs, build_cost_model

    cm, _, cluster, _ = build_cost_model(Inputs(model=str(model), gpu="h100-sxm", seq_len=256, runtime=runtime))
    s = Strategy.parse("tp=8,sp=1").resolve(cluster.world)
    return price_layer(next(iter(cm.blocks.values())), s, cm.ctx).comm_s["tp"]


def test_parallel_block_reduces_once_per_pass_under_megatron_tp(tmp_path):
    """MegaScale's parallel transformer block (Jiang et al. 2024, Sec. 3.1) sums attention and MLP
    before one reduce-scatter and gathers its one norm's output once: half the sequential block's
    tensor-parallel traffic under Megatron-style TP. autopar's emitted programs (DTensor, one
    collective per module) keep theirs."""
    from autopar.cost_models.layer_cost import parallel_block

    seq, par = _gpt_like(tmp_path, False), _gpt_like(tmp_path, True)
    assert _block_tp_comm(par, "megatron") == pytest.approx(_block_tp_comm(seq, "megatron") / 2, rel=1e-9)
    assert _block_tp_comm(par, "torch") == pytest.approx(_block_tp_comm(seq, "torch"), rel=1e-9)
    from autopar.cost_models.session import Inputs, build_cost_model
    for path, want in ((seq, False), (par, True)):
        cm = build_cost_model(Inputs(model=str(path), gpu="h100-sxm", seq_len=256, runtime="megatron"))[0]
        assert parallel_block(next(iter(cm.blocks.values()))) is want


def test_megascale_rows_that_name_ptb_run_the_parallel_block():
    """Only the MegaScale rows whose notes name PTB map to the parallel layout; the Megatron-LM
    baseline rows of the same table (whose arch text mentions MegaScale's PTB) stay sequential."""
    sys.path.insert(0, str(BENCH))
    import published_rows as pr

    ptb = {"id": "x", "notes": "MegaScale rows include algorithmic changes (PTB, SWA, LAMB)",
           "model": {"name": "GPT-175B", "arch": "GPT (dense)", "layers": 96, "hidden": 12288, "heads": 96,
                     "vocab": 64000, "seq_len": 2048}}
    base = dict(ptb, notes=None)
    base["model"] = dict(ptb["model"], arch="GPT (dense); MegaScale rows also use parallel transformer block")
    assert pr.parallel_block(ptb) and not pr.parallel_block(base)
    assert pr.model_config(ptb)["model_type"] == "falcon" and pr.model_config(ptb)["parallel_attn"]
    assert pr.model_config(base)["model_type"] == "gpt2"


def test_grad_sync_hides_behind_one_micro_batch_not_a_share_of_it(tmp_path):
    """DDP / ZeRO-1/2 reduce the gradients during the step's last micro-batch backward (the others
    run under no_sync, as the emitted programs do: codegen/runtime.py): the window is one micro-batch's
    backward whatever the number of micro-batches, so the exposed sync does not grow with it (it did
    when the window was a 1/m share of that backward)."""
    from autopar.cost_models.session import Inputs, build_cost_model

    cfg = dict(model_type="llama", hidden_size=2048, num_hidden_layers=8, num_attention_heads=16,
               intermediate_size=8192, vocab_size=32000, max_position_embeddings=128)
    (tmp_path / "m.json").write_text(json.dumps(cfg))
    cm, _, cluster, _ = build_cost_model(Inputs(model=str(tmp_path / "m.json"), gpu="h100-sxm", nodes=4, seq_len=128))
    exposed, bwd = [], []
    for m in (1, 2, 8):
        e = cm.estimate(Strategy.parse(f"dp={cluster.world},mbs=1,gbs={m * cluster.world}").resolve(cluster.world))
        exposed.append(e.time["dp_comm"])
        bwd.append(e.ranks[0].bwd_s)
    total = cm.dp_comm_total(cm.estimate(Strategy.parse(f"dp={cluster.world}").resolve(cluster.world)).strategy,
                             e.ranks[0], cm.layer_costs(e.strategy), 1)
    assert total > bwd[0] > 0  # the sync outlasts one backward: part of it is exposed
    assert exposed[1] == pytest.approx(exposed[0]) and exposed[2] == pytest.approx(exposed[0])


def test_megatron_param_gather_hides_behind_the_next_first_forward():
    """Megatron-Core's distributed optimizer with --overlap-param-gather: the reduce-scatter half of
    the sync hides behind the last backward, the all-gather half behind the next step's first forward."""
    from autopar.cost_models.overlap import grad_sync_exposed

    assert grad_sync_exposed(1.0, 0.25, 0.1, gather_ahead=False) == pytest.approx(0.75)
    assert grad_sync_exposed(1.0, 0.25, 0.1, gather_ahead=True) == pytest.approx(0.25 + 0.4)
    assert grad_sync_exposed(1.0, 0.6, 0.6, gather_ahead=True) == 0.0
    assert grad_sync_exposed(1.0, 0.6, 0.6, gather_ahead=False) == pytest.approx(0.4)
