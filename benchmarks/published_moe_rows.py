"""MoE routing and dispatch of a published row, as its text and its software state them (for
``published_rows.case_for``; kept apart so that module stays short).

- ``capacity_factor_of``: the expert capacity the row's router ran with.
- ``a2a_overlap_of``: whether the row's Megatron-Core could overlap its all-to-alls at all.
- ``cross_entropy_of``: which fused cross-entropy the row's Megatron-Bridge recipe names.
- ``mcore_flops``: the FLOPs behind a MoE Parallel Folding row's published TFLOP/s and MFU.
"""

from __future__ import annotations

import re

FOLDING = "moe-folding"  # published_rows.source_key of the MoE Parallel Folding rows
FOLDING_CAPACITY_FACTOR = 1.0  # MoE Parallel Folding's training setup (its Table 3 rows: token-drop, capacity 1)


def capacity_factor_of(run: dict, source: str) -> float | None:
    """The expert capacity the row's routing ran with: Megatron-Bridge's MoE benchmarks force-balance
    tokens across experts (``--moe-router-force-load-balancing``: every expert gets its mean share,
    capacity 1); "token-drop ..., capacity factor C" caps each expert at C x its share; unstated:
    dropless (None). MoE Parallel Folding (Liu et al. 2025) states its training setup once, with the
    optimal mappings of Table 3 (token-drop, capacity factor 1); its strong- and context-scaling
    tables (4, 5: "scaling runs reuse the Table 3 parallel configuration") and the fp8 Table 2 (the
    Table 3 optimum) are runs of that setup: capacity 1 too. The published MFU of the same model and
    mapping agrees across the tables (Llama3-8x70B MCore on 256 GPUs: 0.388 in Table 3, 0.401 in
    Table 4 at four times the batch), so the two cannot be priced with different routing."""
    text = " ".join(str(x or "") for x in (run.get("notes"), run["parallel"].get("note"))).lower()
    if "force-balance" in text or "force balance" in text:
        return 1.0
    match = re.search(r"token-drop[^.]*capacity factor (\d+(?:\.\d+)?)", text)
    if match:
        return float(match.group(1))
    return FOLDING_CAPACITY_FACTOR if source == FOLDING else None


def a2a_overlap_of(source: str, pp: int, vpp: int, recompute: str) -> bool:
    """Whether the row's all-to-alls could run beside other work (``--no-a2a-overlap`` when not).
    The MoE Parallel Folding paper's Megatron-Core (early 2025) predates
    ``--overlap-moe-expert-parallel-comm``. Where it exists, Megatron-Core refuses it in two cases
    (``TransformerConfig.__post_init__``, megatron/core/transformer/transformer_config.py, v0.16:
    "If enabling EP A2A overlap, virtual_pipeline_model_parallel_size must be specified when
    pipeline_model_parallel_size > 1" and "disable full recomputation when enabling
    overlap_moe_expert_parallel_comm"): the overlap pairs one micro-batch's forward with another's
    backward of the same model chunk, which a plain 1F1B pipeline stage never runs side by side. So a
    row with a pipeline but no virtual stages, or with full recompute, ran every all-to-all exposed."""
    if source == FOLDING:
        return False
    return not (pp > 1 and vpp <= 1) and recompute != "full"


# Megatron-Bridge pretrain recipes that set ``cross_entropy_fusion_impl = "native"`` (megatron-bridge 0.3.1
# wheel, megatron/bridge/recipes/: gpt_oss/gpt_oss.py "GPT-OSS uses native", llama/llama2.py, gpt/gpt3_175b.py,
# qwen/qwen2.py, nemotronh/); its Llama 3, Qwen3-MoE and DeepSeek recipes set "te".
NATIVE_CE_RECIPES = ("GPT-OSS", "GPT_OSS", "LLAMA2", "Llama-2", "GPT3", "Qwen2", "Nemotron")


def cross_entropy_of(run: dict) -> str:
    """The fused cross-entropy the row ran (``--cross-entropy``): Megatron-Bridge's recipe for the model
    where the row is a Megatron-Bridge benchmark, else Transformer Engine's (the default)."""
    where = str((run.get("source") or {}).get("where") or "")
    name = str((run.get("model") or {}).get("name") or "")
    if "Megatron-Bridge" in where and name.startswith(NATIVE_CE_RECIPES):
        return "native"
    return "te"


def mcore_flops(cfg: dict, run: dict, tokens: float) -> float:
    """Training FLOPs of ``tokens`` tokens of the row's MoE ``cfg`` (an HF-style config) as Megatron-LM counts them for
    the TFLOP/s per GPU its training loop logs (``num_floating_point_operations``, megatron/training/training.py,
    2024-25): GEMMs and full (non-causal) attention scores, forward and backward, no router, norms, activations
    or softmax: 12·B·s·L·h²·((1 + g/a + s/h)·q/h + (f·k + f_shared)/h·3/2 + V/(2·L·h)) with f the expert width,
    k the experts routed to, q = a·d the query width and V the vocabulary padded to 128·tp
    (``make_vocab_size_divisible_by``). MoE Parallel Folding (Liu et al. 2025) is Megatron-Core's own MoE
    benchmark, run with that training loop: its "model TFLOPS" (Table 2) and MFU (Tables 3-5, over 989.5) are
    these FLOPs, as the Megatron-Core README's are (``mcore_readme_rows.megatron_model_flops``, the dense form)."""
    seq, tp = int(run["model"]["seq_len"]), int(run["parallel"].get("tp") or 1)
    h, layers, heads = cfg["hidden_size"], cfg["num_hidden_layers"], cfg["num_attention_heads"]
    groups, d = cfg.get("num_key_value_heads") or heads, cfg.get("head_dim") or h // heads
    expert = cfg.get("moe_intermediate_size") or cfg["intermediate_size"]
    routed = expert * (cfg.get("num_experts_per_tok") or 1) + (cfg.get("shared_expert_intermediate_size") or 0)
    vocab = -(-cfg["vocab_size"] // (128 * tp)) * 128 * tp
    attention = (1 + groups / heads + seq / h) * heads * d / h
    return 12 * tokens * layers * h * h * (attention + routed / h * 1.5 + vocab / (2 * layers * h))


def moe_config(m: dict) -> dict:
    """Llama-style MoE from the row's dims (Llama3-8x70B upcycled: dense FFN width per expert;
    top-k 2 where the row states none, as in Mixtral and the upcycling recipes)."""
    hd = m["hidden"] // m["heads"] if m["hidden"] % m["heads"] == 0 else 64
    return dict(model_type="mixtral", hidden_size=m["hidden"], num_hidden_layers=m["layers"],
                num_attention_heads=m["heads"], num_key_value_heads=m.get("kv_heads") or m["heads"], head_dim=hd,
                intermediate_size=m.get("expert_ffn_hidden") or m["ffn_hidden"], vocab_size=m["vocab"],
                num_local_experts=m["num_experts"], num_experts_per_tok=m.get("topk") or 2)
