"""Rules that were written in several places and now live in one function each (every caller reads it):
``layer_model.terms_bytes`` (a saved term's bytes on a rank), ``layer_model.tied_copy_params`` (a pipeline's tied
output weight), ``fsdp.zero1_ends`` (ZeRO-1's end order), ``techniques.stack_violations`` (what a stack refuses of
the knobs ``plan`` fixes)."""

from __future__ import annotations

from types import SimpleNamespace

from autopar.core.strategy import Strategy
from autopar.cost_models import fsdp
from autopar.cost_models.layer_model import LayerTemplate, SavedTerm, Shards, saved_bytes, terms_bytes, tied_copy_params


def test_terms_bytes_scales_sharded_terms_and_keeps_constant_ones():
    sh = Shards(tokens=2, tp=4, sp=False, expert_div=4, etp=2)
    terms = [SavedTerm("a", 8.0, "tp"), SavedTerm("r", 8.0, "rep"), SavedTerm("mask", 10.0, "rep", const=True),
             SavedTerm("x", 8.0, "expert", etp_gathered=True)]
    # tp: 8*2/4; rep without sp: 8*2; const: as it is; expert gathered over etp: 8*2/(4/2)
    assert terms_bytes(terms, sh) == 4.0 + 16.0 + 10.0 + 8.0
    assert terms_bytes([], sh) == 0.0
    block = LayerTemplate("b", "block", [0], saved=terms[:3] + [SavedTerm("core", 6.0, "tp", attn_core=True)])
    assert saved_bytes(block, sh, "none") == 30.0 + 3.0 and saved_bytes(block, sh, "selective") == 30.0


def test_sp_only_terms_count_only_under_tensor_and_sequence_parallel():
    block = LayerTemplate("b", "block", [0], op_saved=[SavedTerm("rs", 8.0, "rep", sp_only=True),
                                                       SavedTerm("a", 8.0, "tp")])
    assert saved_bytes(block, Shards(tokens=1, tp=2, sp=True, expert_div=2), "op") == 4.0 + 4.0
    assert saved_bytes(block, Shards(tokens=1, tp=2, sp=False, expert_div=2), "op") == 4.0


def test_tied_copy_is_a_second_copy_on_a_pipelines_last_stage_only():
    out = LayerTemplate("out", "output", [0], params_tied=100.0)
    assert tied_copy_params(out, pp=2, tp=4) == 25.0
    assert tied_copy_params(out, pp=1, tp=4) == 0.0
    assert tied_copy_params(None, pp=2, tp=1) == 0.0
    assert tied_copy_params(LayerTemplate("out", "output", [0], params_vocab=100.0), pp=2, tp=1) == 0.0


def _cm(tied: bool):
    emb = LayerTemplate("emb", "embedding", [0], params_vocab=100.0)
    out = LayerTemplate("out", "output", [1], params_tied=100.0 if tied else 0.0, params_vocab=0.0 if tied else 100.0)
    return SimpleNamespace(embedding=emb, output=out)


def test_zero1_ends_puts_an_untied_head_first_and_the_embedding_and_a_tied_copy_last():
    pp2, one = Strategy.build(pp=2, dp=4), Strategy.build(dp=8)
    assert fsdp.zero1_ends(_cm(False), pp2, False, True) == (True, False, False)     # untied head: first span
    assert fsdp.zero1_ends(_cm(False), pp2, True, False) == (False, True, False)     # embedding: last span
    assert fsdp.zero1_ends(_cm(True), pp2, False, True) == (False, False, True)      # tied copy: a late span
    assert fsdp.zero1_ends(_cm(True), one, True, True) == (False, True, False)       # no pipeline: no copy


def test_stack_violations_say_the_stacks_own_rule_for_the_fixed_knobs():
    from autopar import techniques

    msgs = techniques.stack_violations("deepspeed", {"pp": 2, "zero_stage": 2}, 8)
    assert msgs and "zero=2 with pp=2" in msgs[0] and "deepspeed" in msgs[0]
    assert techniques.stack_violations("torch", {"pp": 2, "zero_stage": 2}, 8) == []
    assert techniques.stack_violations("deepspeed", {"pp": 0}, 8) == []   # not a strategy: the caller's error


def test_plan_refuses_a_fixed_knob_by_the_stacks_model_rule(run_cli):
    """The stack's model rules (torchtitan's tied embeddings under pp) fire on the knobs plan fixes: before, plan
    gpt2-124m --runtime torchtitan --strategy pp=2 said "no configuration satisfies pp=2 ... relax them"."""
    code, _, err = run_cli("plan", "gpt2-124m", "--runtime", "torchtitan", "--strategy", "pp=2")
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "pp=2 with tied embeddings" in err and "torchtitan" in err and "no configuration" not in err, err


def test_zero1_end_bytes_sit_on_the_end_ranks():
    """``fsdp.rank_sync_bytes`` reads ``pipeline.end_ranks``, the ranks the estimate runs the embedding and the
    output layer on: with stages (0, 32), (32, 32) rank 1 runs the output layer and syncs its gradient. Before, the
    output's bytes went to the rank holding block 31 (rank 0), the rule restated."""
    from autopar.cost_models.session import Inputs, build_cost_model

    cm = build_cost_model(Inputs(model="llama3-8b", gpu="h100-sxm"))[0]
    s = Strategy.parse("pp=2,zero=1,mbs=1").resolve(8)
    costs = cm.layer_costs(s)
    blocks = sum(costs[i].params_dense for i in range(32)) * 2
    dense0, _, edge0 = fsdp.rank_sync_bytes(cm, s, SimpleNamespace(rank=0, layers=list(range(32))), costs, 2)
    dense1, _, edge1 = fsdp.rank_sync_bytes(cm, s, SimpleNamespace(rank=1, layers=[]), costs, 2)
    assert (dense0, edge0) == (blocks, costs["embedding"].params_dense * 2)
    assert (dense1, edge1) == (costs["output"].params_dense * 2, 0.0)
