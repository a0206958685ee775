"""MoE and context-parallel terms (cost_models/moe_cost.py): each formula against a hand computation,
and the stack switches (grouped GEMM, all-to-all overlap) through the layer pricing."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from autopar.core.gpu import StackConstants
from autopar.cost_models.compute import OpTimer
from autopar.cost_models.moe_cost import ep_exposed, grouped_expert_time, ring_exposed, tile_fill
from autopar.profiles.hw import load_gpu_profile


def test_tile_fill_pads_each_expert_to_whole_row_tiles():
    assert tile_fill(256) == 1.0
    assert tile_fill(200) == pytest.approx(200 / 256)       # two 128-row tiles, 56 rows of padding
    assert tile_fill(1) == pytest.approx(1 / 128)
    assert tile_fill(0) == 1.0


def test_grouped_gemm_pays_the_group_once_and_never_exceeds_the_loop():
    # 16 experts, 10 us each as separate kernels; one grouped kernel of all their FLOPs 120 us
    assert grouped_expert_time(10e-6, 16, 120e-6, 256) == pytest.approx(120e-6)
    # padding: 200 rows per expert compute 256: 120 us / (200/256)
    assert grouped_expert_time(10e-6, 16, 120e-6, 200) == pytest.approx(120e-6 * 256 / 200)
    # a group slower than the loop (tiny experts, heavy padding): the loop's 160 us
    assert grouped_expert_time(10e-6, 16, 150e-6, 64) == pytest.approx(160e-6)
    assert grouped_expert_time(10e-6, 1, 5e-6, 256) == pytest.approx(10e-6)  # one local expert: no group


def test_grouped_timer_reads_the_curve_at_the_group_flops():
    """H100 curve eff(x) = 1/(1/0.75 + 4.95e9/x) (profile comment): 16 GEMMs of 2048x768x2048
    (6.44 GFLOP each) as one group run at eff(103 GFLOP) instead of eff(6.44 GFLOP)."""
    gpu = load_gpu_profile("h100-sxm")
    t = OpTimer(gpu, "bf16")
    m, n, k, calls = 2048, 768, 2048, 16
    one = 2.0 * m * n * k
    loop_f, _ = t.gemm_fb(m, n, k, calls, 2.0)
    group_f, group_b = t.grouped_gemm_fb(m, n, k, calls, 2.0)
    assert loop_f == pytest.approx(calls * one / (989.4e12 * gpu.eff("matmul", one)))
    assert group_f == pytest.approx(calls * one / (989.4e12 * gpu.eff("matmul", calls * one)))
    assert group_b == pytest.approx(2.0 * group_f)
    assert group_f < 0.8 * loop_f  # the launch / tail floor paid once, not 16 times


def test_ep_overlap_hides_a_share_within_the_compute_window():
    assert ep_exposed(4.0, 10.0, 0.0) == 4.0                     # neutral: all exposed (as before)
    assert ep_exposed(4.0, 10.0, 0.75) == pytest.approx(1.0)     # a quarter runs alone
    assert ep_exposed(4.0, 1.0, 0.75) == pytest.approx(1.0 + 2.0)  # the window holds only 1 s of the 3


def test_ring_exposes_only_what_outlasts_the_attention_step():
    # cp=4, K,V step 1 ms, attention forward 8 ms -> 2 ms per step hides 1 ms forward and the 2 ms backward
    assert ring_exposed(4, 1e-3, 8e-3) == 0.0
    # attention 2 ms -> 0.5 ms per step: forward 0.5 ms, backward 2 - 1.25 = 0.75 ms exposed, x 3 steps
    assert ring_exposed(4, 1e-3, 2e-3) == pytest.approx(3 * (0.5e-3 + 0.75e-3))
    assert ring_exposed(4, 1e-3, 0.0) == pytest.approx(3 * 3e-3)  # nothing to hide behind
    assert ring_exposed(1, 1e-3, 0.0) == 0.0


def test_new_stack_fields_are_neutral_by_default():
    st = StackConstants()
    assert st.expert_grouped_gemm is False and st.ep_overlap == 0.0
    assert load_gpu_profile("cpu").stack("torch") == st


def _moe_layer_cost(stack: StackConstants, strategy: str, seq: int = 4096):
    """One Qwen3-30B-A3B-like MoE block (128 experts of 768 columns, top-8) priced on H100."""
    from autopar.core.strategy import Strategy
    from autopar.cost_models.layer_cost import price_layer
    from autopar.cost_models.session import Inputs, build_cost_model

    cm = _qwen_moe_cost_model(Inputs, build_cost_model, seq)
    cm.timer.stack = cm.stack = stack
    s = Strategy.parse(strategy).resolve(16)
    block = next(t for t in cm.templates if t.is_moe)
    return price_layer(block, s, cm.ctx)


_CACHE: dict = {}


def _qwen_moe_cost_model(inputs_cls, build, seq: int):
    import json
    import tempfile
    from pathlib import Path

    if seq not in _CACHE:
        cfg = dict(model_type="qwen2_moe", hidden_size=2048, num_hidden_layers=2, num_attention_heads=32,
                   num_key_value_heads=4, head_dim=128, moe_intermediate_size=768, vocab_size=1024,
                   num_experts=128, num_experts_per_tok=8, max_position_embeddings=seq)
        path = Path(tempfile.mkdtemp()) / "qwen3_moe_small.json"
        path.write_text(json.dumps(cfg))
        _CACHE[seq] = build(inputs_cls(model=str(path), gpu="h100-sxm", nodes=2, gpus_per_node=8, seq_len=seq,
                                       runtime="megatron"))[0]
    return _CACHE[seq]


def test_grouped_gemm_and_ep_overlap_through_the_layer():
    base = StackConstants()
    plain = _moe_layer_cost(base, "tp=1,pp=1,dp=16,ep=16,mbs=1")
    grouped = _moe_layer_cost(base.model_copy(update={"expert_grouped_gemm": True}), "tp=1,pp=1,dp=16,ep=16,mbs=1")
    assert grouped.fwd_s < plain.fwd_s and grouped.bwd_s < plain.bwd_s   # 8 local experts, one launch
    assert grouped.comm_s["ep"] == pytest.approx(plain.comm_s["ep"])
    hidden = _moe_layer_cost(base.model_copy(update={"ep_overlap": 0.5}), "tp=1,pp=1,dp=16,ep=16,mbs=1")
    a2a = plain.comm_s["ep"]
    window = plain.fwd_s + plain.bwd_s
    assert hidden.comm_s["ep"] == pytest.approx(0.5 * a2a + max(0.0, 0.5 * a2a - window))
    assert hidden.fwd_s == pytest.approx(plain.fwd_s)


def test_cp_ring_hides_behind_the_fused_attention_kernel():
    """The ring's window is the attention kernel's forward (SDPA / flash), not only the eager
    attention ops that selective recompute re-runs. At 32k tokens, cp=2 on one node, one ring step
    moves 16k tokens x 2 KiB of K,V (32 MiB, ~0.1 ms on NVLink) beside half of a 32k-token attention
    forward (milliseconds), so nothing shows; with the old window (no eager attention ops) all of it did."""
    cost = _moe_layer_cost(StackConstants(), "tp=1,pp=1,dp=8,cp=2,ep=8,mbs=1", seq=32768)
    assert cost.comm_s["cp"] == 0.0


def test_torch_programs_get_neither_grouped_gemm_nor_all_to_all_overlap():
    """autopar's emitted programs loop over experts and block on the all-to-alls
    (codegen/runtime_moe.py): the fit never offers the two to the torch stack, and no profile has them."""
    import sys
    from pathlib import Path
    from types import SimpleNamespace as NS

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import calibrate_modern as cal

    row = NS(strategy=NS(tp=1, ep=8, zero_stage=1, world=16, cp=1), case=NS(dtype="bf16"),
             cm=NS(spec=NS(is_moe=True), cluster=NS(gpus_per_node=8), gpu=load_gpu_profile("h100-sxm")))
    assert not {"expert_grouped_gemm", "ep_overlap"} & set(cal.fields_for([row], "torch"))
    assert {"expert_grouped_gemm", "ep_overlap"} <= set(cal.fields_for([row], "megatron"))
    assert {"expert_grouped_gemm", "ep_overlap"} <= set(cal.LAYER_FIELDS)  # per-layer prices are re-derived
    for gpu in ("a100-80g", "h100-sxm", "h200"):
        torch = load_gpu_profile(gpu).stack("torch")
        assert torch.expert_grouped_gemm is False and torch.ep_overlap == 0.0


def test_capacity_factor_caps_the_busiest_expert():
    """Switch Transformer (Fedus et al. 2022, Sec. 2.1): an expert takes at most capacity factor x its
    mean share; forced balancing is capacity 1; dropless (None) keeps the load as it comes."""
    from autopar.cost_models.moe_cost import capped_load

    assert capped_load(1.3, None) == 1.3
    assert capped_load(1.3, 1.0) == 1.0
    assert capped_load(1.3, 1.25) == 1.25
    assert capped_load(1.1, 1.25) == 1.1   # under the cap: nothing is dropped
    assert capped_load(1.0, 0.5) == 0.5    # capacity under the mean: every expert drops half


def test_capacity_factor_through_the_layer_and_its_input_errors():
    from autopar.errors import InputError

    imbalanced = StackConstants(moe_imbalance=1.3)
    dropless = _moe_layer_cost(imbalanced, "tp=1,pp=1,dp=16,ep=16,mbs=1")
    from autopar.cost_models.session import Inputs, _capacity_factor, build_cost_model

    cm = _qwen_moe_cost_model(Inputs, build_cost_model, 4096)
    cm.ctx.moe_capacity_factor = 1.0
    try:
        capped = _moe_layer_cost(imbalanced, "tp=1,pp=1,dp=16,ep=16,mbs=1")
    finally:
        cm.ctx.moe_capacity_factor = None
    neutral = _moe_layer_cost(StackConstants(), "tp=1,pp=1,dp=16,ep=16,mbs=1")
    assert capped.fwd_s == pytest.approx(neutral.fwd_s) and capped.comm_s["ep"] == pytest.approx(neutral.comm_s["ep"])
    assert dropless.fwd_s > 1.05 * capped.fwd_s   # the 1.3x straggler expert is capped at its mean share

    moe, dense = cm.spec, cm.spec.model_copy(update={"num_experts": 0, "topk": 0})
    assert _capacity_factor(Inputs(model="x", moe_capacity_factor=1.25, runtime="megatron"), moe) == 1.25
    with pytest.raises(InputError, match="--moe-capacity-factor=0.0: must be positive"):
        _capacity_factor(Inputs(model="x", moe_capacity_factor=0.0), moe)
    with pytest.raises(InputError, match="needs a mixture-of-experts model; fix"):
        _capacity_factor(Inputs(model="x", moe_capacity_factor=1.0), dense)


def _published_rows():
    import sys
    from pathlib import Path

    shared = Path(__file__).resolve().parents[2] / "shared" / "validation" / "published_modern.yaml"
    if not shared.is_file():
        pytest.skip("shared/validation is not next to the repository")
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import published_rows as pr

    return pr, {r["id"]: r for r in pr.load_runs(shared)}


def test_published_moe_rows_map_routing_and_expert_tp_as_their_text_states():
    """Plain Megatron-Core (MoE Parallel Folding's "MCore" rows, ETP blank) shards experts over the
    attention's TP group; the Folding rows state ETP; Megatron-Bridge's MoE benchmarks force-balance
    tokens (capacity 1); the Folding paper's Table 3 rows train token-drop at capacity factor 1."""
    pr, runs = _published_rows()
    mcore = pr.case_for(runs["moe_folding_table4_Mixtral-8x22B-G8T8_mcore_512gpu"])
    assert "tp=2," in mcore.strategy and "etp=2," in mcore.strategy
    folded = pr.case_for(runs["moe_folding_table3_Mixtral-8x22B-G8T8_folding"])
    assert "tp=4," in folded.strategy and "etp=1," in folded.strategy and folded.moe_capacity_factor == 1.0
    bridge = pr.case_for(runs["megatron_bridge_26.04_h100_Qwen3_30B_a3B_16gpu_FP8_12"])
    assert bridge.moe_capacity_factor == 1.0
    dense = pr.case_for(runs["megatron_bridge_26.04.01_h100_LLAMA3_70B_64gpu_FP8_4"])
    assert dense.moe_capacity_factor is None and "etp=1," in dense.strategy


def test_folding_rows_run_interleaved_with_the_smallest_even_split():
    """The Folding paper's strong scaling (Mixtral-8x22B 0.507 -> 0.449 MFU from 64 to 16 micro-batches
    per pipeline) is out of reach of 1F1B's bubble (ratio 0.77): its rows run interleaved, V the
    smallest > 1 that splits each stage's layers evenly (Megatron-Core's rule)."""
    pr, runs = _published_rows()
    assert (1 + 7 / 64) / (1 + 7 / 16) < 0.449 / 0.507   # the 1F1B bound the published ratio beats
    want = {"moe_folding_table4_Mixtral-8x22B_folding_1024gpu": 7,     # 56 layers / pp 8 = 7 per stage
            "moe_folding_table4_Qwen2-57B-A14B_mcore_512gpu": 7,       # 28 / 4
            "moe_folding_table4_Llama3-8x70B_folding_1024gpu": 5,      # 80 / 16
            "moe_folding_table4_Llama3-8x70B_mcore_256gpu": 2}         # 80 / 8 = 10 per stage
    for rid, v in want.items():
        assert f"vpp={v},schedule=interleaved" in pr.case_for(runs[rid]).strategy
    assert "vpp" not in pr.case_for(runs["megatron_bridge_26.04_h100_Qwen3_30B_a3B_16gpu_FP8_12"]).strategy


def test_2021_megatron_rows_run_without_sequence_parallelism():
    """Sequence parallelism came with Korthikanti et al. 2022: Narayanan et al. 2021 and MT-NLG (2021)
    run plain tensor parallel, as the calibration rows of the same paper are mapped."""
    pr, runs = _published_rows()
    for rid in ("mt_nlg_530b_2800gpu", "narayanan21_table2_PTD-P_174.6B_384gpu"):
        assert "tp=8," in pr.case_for(runs[rid]).strategy and pr.case_for(runs[rid]).strategy.endswith("sp=0")
    assert "sp=1" in pr.case_for(runs["megatron_bridge_26.04.01_h100_LLAMA3_70B_64gpu_FP8_4"]).strategy


def test_megatron_runs_rope_fused_and_gqa_unexpanded():
    """Megatron-Core: one fused RoPE kernel per q and k in bf16 (TE fused_apply_rotary_pos_emb) and no
    K/V expansion (FlashAttention takes GQA heads as they are): the captured fp32 RoPE, its casts and
    repeat_interleave become one op reading and writing q and k once."""
    from autopar.cost_models.layer_cost import runtime_ops
    from autopar.cost_models.megatron_ops import fused_rope_bytes, megatron_rope
    from autopar.cost_models.session import Inputs, build_cost_model

    cm = _qwen_moe_cost_model(Inputs, build_cost_model, 4096)
    block = next(t for t in cm.templates if t.is_moe)
    assert runtime_ops(block, "torch", 2) is block.ops and runtime_ops(block, "torchtitan", 2) is block.ops
    ops = megatron_rope(block.ops, 2)  # the RoPE step of runtime_ops (its fused linears: test_dense_outliers)
    attn = next(i for i, o in enumerate(ops) if o.kind == "attention")
    assert ops[attn - 1].name == "fused_rope" and ops[attn - 2].kind == "gemm"
    assert ops[attn - 1].bytes_rw == fused_rope_bytes(4096, 32 * 128, 4 * 128, 2) == 2 * 2 * 4096 * 4608
    dropped = [o for o in block.ops if o not in ops]
    assert dropped and all(o.kind == "membound" for o in dropped)
    assert sum(o.bytes_rw for o in dropped) > 3 * ops[attn - 1].bytes_rw   # fp32 round trips, K/V copies
    assert ops[attn:] == block.ops[block.ops.index(ops[attn]):]             # the rest as captured
    # YaRN's attention factor on cos / sin: Megatron-Core's unfused RoPE, 22 element passes of q and k forward +
    # backward where the fused kernel's op is priced 6 (megatron_ops.ROPE_PASSES); the rest of the block as before
    yarn = megatron_rope(block.ops, 2, 1.35)
    assert yarn[attn - 1].name == "unfused_rope" and yarn[attn - 1].bytes_rw == pytest.approx(
        ops[attn - 1].bytes_rw * 22 / 6)
    assert [o.name for o in yarn if "rope" not in o.name] == [o.name for o in ops if "rope" not in o.name]


def test_yarn_attention_factor_from_the_hf_config():
    """transformers / megatron-core YaRN: attention_factor as given, else mscale / mscale_all_dim, else
    0.1 ln(factor) + 1 (GPT-OSS: factor 32 -> 1.347); plain RoPE and other scalings 1."""
    from autopar.profiles.hf_families import HFReader, rope_scaling

    def factor(**cfg) -> float:
        return rope_scaling(HFReader(cfg, Path("config.json"))).cos_sin_factor

    assert factor(rope_scaling={"rope_type": "yarn", "factor": 32.0}) == pytest.approx(0.1 * math.log(32) + 1)
    assert factor(rope_parameters={"rope_type": "yarn", "factor": 40.0, "mscale": 1.0, "mscale_all_dim": 1.0}) == 1.0
    assert factor(rope_scaling={"type": "yarn", "factor": 4.0, "attention_factor": 1.2}) == 1.2
    assert factor() == factor(rope_scaling={"rope_type": "linear", "factor": 8.0}) == 1.0


def test_a2a_overlap_off_exposes_every_all_to_all_and_folding_rows_run_without_it():
    """A run without Megatron-Core's all-to-all overlap (the MoE Parallel Folding paper's MCore of early
    2025 predates --overlap-moe-expert-parallel-comm) pays every all-to-all whatever the stack's fit."""
    from autopar.cost_models.session import Inputs, build_cost_model

    stack = StackConstants(ep_overlap=0.6)
    hidden = _moe_layer_cost(stack, "tp=1,pp=1,dp=16,ep=16,mbs=1")
    cm = _qwen_moe_cost_model(Inputs, build_cost_model, 4096)
    cm.ctx.a2a_overlap = False
    try:
        blocking = _moe_layer_cost(stack, "tp=1,pp=1,dp=16,ep=16,mbs=1")
    finally:
        cm.ctx.a2a_overlap = True
    neutral = _moe_layer_cost(StackConstants(), "tp=1,pp=1,dp=16,ep=16,mbs=1")
    assert blocking.comm_s["ep"] == pytest.approx(neutral.comm_s["ep"]) and hidden.comm_s["ep"] < blocking.comm_s["ep"]
    pr, runs = _published_rows()
    assert not pr.case_for(runs["moe_folding_table4_Mixtral-8x22B-G8T8_mcore_512gpu"]).a2a_overlap
    assert pr.case_for(runs["megatron_bridge_26.04_h100_Qwen3_30B_a3B_16gpu_FP8_12"]).a2a_overlap


def test_megatron_ranks_with_several_experts_resort_their_tokens():
    """Megatron-Core's all-to-all dispatcher reorders a rank's received tokens expert-major
    (``sort_chunks_by_idxs``) and back before the combine when the rank holds more than one expert:
    two more reads and writes of every received token copy per direction; one local expert: none."""
    from autopar.core.strategy import Strategy
    from autopar.cost_models.layer_cost import _expert_passes, expert_load, shards_for
    from autopar.cost_models.moe_cost import expert_loop_bytes, local_sort_bytes
    from autopar.cost_models.session import Inputs, build_cost_model

    assert local_sort_bytes(8192, 6144, 2, 8) == 2 * 2 * 8192 * 6144 * 2
    assert local_sort_bytes(8192, 6144, 2, 1) == 0.0
    cm = _qwen_moe_cost_model(Inputs, build_cost_model, 4096)
    block = next(t for t in cm.templates if t.is_moe)
    s = Strategy.parse("tp=1,pp=1,dp=16,ep=16,mbs=1").resolve(16)
    # 16 ranks x 4096 tokens x top-8 over 128 experts: 4096 rows per expert, 8 experts per rank
    want = cm.ctx.timer.membound(local_sort_bytes(8 * 4096, 2048, 2, 8))
    assert want > 0 and _expert_passes(block, s, shards_for(s), cm.ctx) == pytest.approx((want, want))
    cm.ctx.stack_name = "torch"   # autopar's programs sort each layer's rows once: no re-sort, its expert loop's terms
    try:
        cat, stack = (cm.ctx.timer.membound(b) for b in expert_loop_bytes(8 * 4096, 2048, block.params_expert / 16, 2))
        assert _expert_passes(block, s, shards_for(s), cm.ctx) == pytest.approx((cat * expert_load(cm.ctx), stack))
    finally:
        cm.ctx.stack_name = "megatron"


def test_folding_scaling_rows_run_the_papers_token_drop_setup():
    """MoE Parallel Folding's Table 3 states token-drop at capacity factor 1; its scaling (Table 4, 5) and
    fp8 (Table 2) runs reuse that setup, so they are priced with the same routing."""
    pr, runs = _published_rows()
    for rid in ("moe_folding_table4_Mixtral-8x22B_folding_256gpu", "moe_folding_table5_Mixtral-8x22B_mcore_seq65536",
                "moe_folding_table2_Mixtral-8x22B_fp8_folding", "moe_folding_table3_Llama3-8x70B_mcore"):
        assert pr.case_for(runs[rid]).moe_capacity_factor == 1.0
    assert pr.case_for(runs["megatron_bridge_26.04.01_h100_LLAMA3_70B_64gpu_FP8_4"]).moe_capacity_factor is None


def test_qwen3_rows_build_qwen3_blocks():
    """Qwen3 MoE (Qwen/Qwen3-30B-A3B config.json, model_type qwen3_moe): per-head q/k RMSNorm, no q/k/v
    bias and no shared expert, unlike the Qwen2-MoE family the rows were first mapped to."""
    pr, runs = _published_rows()
    for rid in ("megatron_bridge_26.04_h100_Qwen3_30B_a3B_16gpu_FP8_12",
                "megatron_bridge_26.04_h100_Qwen3_235B_a22B_256gpu_FP8_13"):
        assert pr.case_for(runs[rid]).config["model_type"] == "qwen3_moe"


def test_expert_tp_gathers_every_received_token_of_the_group():
    """Megatron-Core's all-to-all dispatcher (v0.11: "permute -> A2A(EP) -> AG(TP) -> sort_chunk", then
    "sort_chunk -> RS(TP) -> A2A(EP)") and autopar's runtime_moe gather a rank's received tokens over
    the etp group before the experts and reduce-scatter the outputs after: both collectives move etp
    times the rank's own received bytes (the old all-reduce of one rank's share priced 1/etp of it)."""
    from autopar.cost_models.comm import collective_time
    from autopar.cost_models.moe_cost import etp_gathered_bytes
    from autopar.cost_models.session import Inputs, build_cost_model

    assert etp_gathered_bytes(100.0, 2) == 200.0 and etp_gathered_bytes(100.0, 4) == 400.0
    assert etp_gathered_bytes(100.0, 1) == 0.0
    cm = _qwen_moe_cost_model(Inputs, build_cost_model, 4096)
    cost = _moe_layer_cost(StackConstants(), "tp=2,pp=1,dp=8,ep=4,etp=2,mbs=1,sp=1")
    # a rank's 2048 tokens (sequence-parallel share) x top-8 x 2048 hidden x 2 bytes reach its experts;
    # the pair of experts' shards needs both ranks' tokens: 2 x that gathered, then reduce-scattered
    gathered = 2 * 2048 * 8 * 2048 * 2
    one_way = sum(collective_time(k, gathered, 2, 1, cm.cluster, fits=cm.ctx.fits).time_s
                  for k in ("all_gather", "reduce_scatter"))
    assert cost.comm_s["etp"] == pytest.approx(2 * one_way)
    assert one_way > collective_time("all_reduce", gathered / 2, 2, 1, cm.cluster, fits=cm.ctx.fits).time_s


def test_megatron_refuses_the_all_to_all_overlap_on_a_plain_pipeline_or_full_recompute():
    """Megatron-Core (v0.16 TransformerConfig) asserts virtual pipeline stages for
    --overlap-moe-expert-parallel-comm when pp > 1, and refuses it under full recompute: GPT-OSS-120B
    (pp 4, no VP) ran its all-to-alls exposed; Qwen3-235B (pp 8, VP 4) and Qwen3-30B (pp 1) could hide them."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from published_moe_rows import a2a_overlap_of

    assert a2a_overlap_of("megatron-bridge", 1, 1, "none") and a2a_overlap_of("megatron-bridge", 8, 4, "none")
    assert not a2a_overlap_of("megatron-bridge", 4, 1, "none")
    assert not a2a_overlap_of("megatron-bridge", 1, 1, "full")
    assert not a2a_overlap_of("moe-folding", 1, 1, "none")   # the paper's MCore predates the overlap
    pr, runs = _published_rows()
    assert not pr.case_for(runs["megatron_bridge_26.02_h100_GPT_OSS_120B_64gpu_BF16_22"]).a2a_overlap
    for rid in ("megatron_bridge_26.04_h100_Qwen3_235B_a22B_256gpu_FP8_13",
                "megatron_bridge_26.02_h100_Qwen3_30B_a3B_16gpu_FP8_23"):
        assert pr.case_for(runs[rid]).a2a_overlap


def test_megatron_loss_moves_the_fused_cross_entropy_bytes_of_its_kernel():
    """Megatron-Core's fused vocab-parallel cross-entropy per logit element: Transformer Engine's
    Triton kernel 6 B forward (two bf16 reads, the gradient written in place) + 4 B backward; the
    native fp32 one 22 + 10 (megatron_ops.cross_entropy_bytes). One elementwise op replaces the
    captured upcast and loss, carrying a third of the total (its backward is priced at twice its
    forward); the torch runtimes run the captured loss."""
    from autopar.cost_models.layer_cost import runtime_ops
    from autopar.cost_models.megatron_ops import cross_entropy_bytes
    from autopar.cost_models.session import Inputs, build_cost_model

    assert cross_entropy_bytes("te") == (6, 4) and cross_entropy_bytes("native") == (22, 10)
    with pytest.raises(ValueError, match="cross_entropy"):
        cross_entropy_bytes("liger")
    cm = _qwen_moe_cost_model(Inputs, build_cost_model, 4096)
    out = next(t for t in cm.templates if t.kind == "output")
    assert runtime_ops(out, "torch", 2) is out.ops
    m, n, _ = next(o for o in out.ops if o.kind == "gemm").gemm
    assert (m, n) == (4096, 1024)
    for impl, per_element in (("te", 10), ("native", 32)):
        ops = runtime_ops(out, "megatron", 2, impl)
        assert ops[-1].name == f"{impl}_cross_entropy" and ops[-1].kind == "membound"
        assert ops[-1].bytes_rw == pytest.approx(m * n * per_element / 3)
        assert ops[:-1] == out.ops[:len(ops) - 1] and ops[-2].kind == "gemm"


def test_cross_entropy_option_prices_the_megatron_loss_only():
    """--cross-entropy native costs the output layer more than te under --runtime megatron, by the
    kernels' byte difference at the memory-bound rate; blocks do not move; bad input names the field."""
    from autopar.core.strategy import Strategy
    from autopar.cost_models.layer_cost import price_layer
    from autopar.cost_models.session import Inputs, build_cost_model
    from autopar.errors import InputError

    cm = _qwen_moe_cost_model(Inputs, build_cost_model, 4096)
    s = Strategy.parse("tp=1,pp=1,dp=16,ep=16,mbs=1").resolve(16)
    out = next(t for t in cm.templates if t.kind == "output")
    block = next(t for t in cm.templates if t.is_moe)
    priced = {}
    try:
        for impl in ("te", "native"):
            cm.ctx.cross_entropy = impl
            priced[impl] = (price_layer(out, s, cm.ctx), price_layer(block, s, cm.ctx))
    finally:
        cm.ctx.cross_entropy = "te"
    (te_out, te_block), (nat_out, nat_block) = priced["te"], priced["native"]
    assert nat_block.fwd_s == te_block.fwd_s and nat_block.bwd_s == te_block.bwd_s
    extra = cm.timer.membound(4096 * 1024 * 32 / 3) - cm.timer.membound(4096 * 1024 * 10 / 3)
    assert nat_out.fwd_s - te_out.fwd_s == pytest.approx(extra)
    assert nat_out.bwd_s - te_out.bwd_s == pytest.approx(2 * extra)
    with pytest.raises(InputError, match="--cross-entropy=liger"):
        build_cost_model(Inputs(model="gpt-tiny", gpu="h100-sxm", runtime="megatron", cross_entropy="liger"))


def test_megatron_bridge_rows_run_the_cross_entropy_their_recipe_names():
    """Megatron-Bridge's GPT-OSS recipe sets cross_entropy_fusion_impl "native", its Llama 3, Qwen3-MoE
    and DeepSeek recipes "te" (megatron-bridge 0.3.1 recipes/); rows of other sources keep te."""
    pr, runs = _published_rows()
    assert pr.case_for(runs["megatron_bridge_26.02_h100_GPT_OSS_120B_64gpu_BF16_22"]).cross_entropy == "native"
    for rid in ("megatron_bridge_26.04_h100_Qwen3_235B_a22B_256gpu_FP8_13",
                "megatron_bridge_25.09_h100_LLAMA3_8B_8gpu_FP8_31", "nemo_24.07_h100_fp8_LLAMA2-7B_8gpu",
                "moe_folding_table3_Llama3-8x70B_mcore"):
        assert pr.case_for(runs[rid]).cross_entropy == "te"


def test_megatron_adds_expert_biases_apart_from_the_grouped_gemm():
    """Megatron-Core (0.16 TEGroupedMLP._apply_bias) adds each expert's fc2 bias, weighted by the routing
    probability, after the grouped GEMM and concatenates the pieces: 6 passes over the rank's received
    [rows, hidden] output each way (megatron_ops.expert_bias_bytes). Only an MoE whose config states
    MLP biases (GPT-OSS) pays it, only under --runtime megatron."""
    import json
    import tempfile
    from pathlib import Path

    from autopar.core.strategy import Strategy
    from autopar.cost_models.layer_cost import _expert_passes, expert_load, price_layer, shards_for
    from autopar.cost_models.megatron_ops import expert_bias_bytes
    from autopar.cost_models.moe_cost import expert_loop_bytes, local_sort_bytes
    from autopar.cost_models.session import Inputs, build_cost_model

    assert expert_bias_bytes(1024, 2880, 2) == (6 * 2 * 1024 * 2880, 6 * 2 * 1024 * 2880)
    cm = _qwen_moe_cost_model(Inputs, build_cost_model, 4096)
    assert cm.ctx.expert_bias is False
    s = Strategy.parse("tp=1,pp=1,dp=16,ep=16,mbs=1").resolve(16)
    block = next(t for t in cm.templates if t.is_moe)
    base = price_layer(block, s, cm.ctx)
    cm.ctx.expert_bias = True
    try:
        biased = price_layer(block, s, cm.ctx)
    finally:
        cm.ctx.expert_bias = False
    rows = 16 * 4096 * 8 / 128 * 8   # 16 ranks' tokens x top-8 over 128 experts, 8 of them on this rank
    f, b = expert_bias_bytes(rows, 2048, 2)
    load = expert_load(cm.ctx)
    assert biased.fwd_s - base.fwd_s == pytest.approx(cm.timer.membound(f) * load)
    assert biased.bwd_s - base.bwd_s == pytest.approx(cm.timer.membound(b) * load)
    cfg = dict(model_type="mixtral", hidden_size=256, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, intermediate_size=256, vocab_size=512, num_local_experts=8,
               num_experts_per_tok=2, mlp_bias=True, max_position_embeddings=512)
    path = Path(tempfile.mkdtemp()) / "biased_moe.json"
    path.write_text(json.dumps(cfg))
    for runtime in ("megatron", "torch"):
        cm2 = build_cost_model(Inputs(model=str(path), gpu="h100-sxm", nodes=1, gpus_per_node=8, seq_len=512,
                                      runtime=runtime))[0]
        assert cm2.ctx.expert_bias is True
        s2 = Strategy.parse("tp=1,pp=1,dp=8,ep=8,mbs=1").resolve(8)
        moe = next(t for t in cm2.templates if t.is_moe)
        got = _expert_passes(moe, s2, shards_for(s2), cm2.ctx)[0]
        if runtime == "megatron":
            assert got > cm2.timer.membound(local_sort_bytes(8 * 512 * 2 / 8, 256, 2, 1))
        else:  # autopar's programs have no expert biases: the expert loop's output concatenation alone
            cat = expert_loop_bytes(8 * 512 * 2 / 8, 256, 0, 2)[0]
            assert got == pytest.approx(cm2.timer.membound(cat) * expert_load(cm2.ctx))
