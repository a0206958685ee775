"""Tensor parallel (Megatron column/row linears over heads and FFN width, vocabulary-parallel
embedding and output) and sequence parallel (norms and dropout split over the sequence).

Fields ``tp``, ``sequence_parallel``; applied by ``codegen.runtime_parallel.apply_tp``
(DTensor ``parallelize_module``), priced per layer by ``layer_cost.price_layer``.
"""

from __future__ import annotations

from autopar.core.model_spec import ModelSpec
from autopar.core.strategy import Strategy
from autopar.techniques.base import Runs, Technique, custom, custom_refusal

SP_VALUES = (False, True)


def width_rule(s: Strategy, spec: ModelSpec | None, world: int, seq_len: int | None) -> list[str]:
    """tp splits heads, key/value heads (not MLA), the FFN width and the vocabulary."""
    if custom(spec) and s.tp > 1 and "tp" not in spec.hf_parallel:  # a transformers module: its own plan
        return [custom_refusal("tp", s.tp, spec)]
    if spec is None or s.tp == 1 or (custom(spec) and "tp" not in spec.hf_parallel):
        return []
    out = []
    if spec.heads % s.tp:
        out.append(f"tp={s.tp} does not divide heads={spec.heads}; use a tp that divides it")
    if spec.family != "deepseek_v3" and spec.kv_heads % s.tp:
        out.append(f"tp={s.tp} does not divide kv_heads={spec.kv_heads} (grouped-query attention splits key/value "
                   f"heads too); use tp <= {spec.kv_heads} dividing it")
    if spec.ffn_hidden and spec.ffn_hidden % s.tp:
        out.append(f"tp={s.tp} does not divide ffn_hidden={spec.ffn_hidden}")
    if spec.vocab % s.tp:
        out.append(f"tp={s.tp} does not divide vocab={spec.vocab}; pad the vocabulary to a multiple of tp")
    if custom(spec):  # the rest concerns the catalog's structures
        return out
    if spec.block_layout == "post_norm":  # apply_tp's plan places the norms before attention / MLP
        out.append(f"tp={s.tp} with block_layout=post_norm (OLMo-2) is not supported by the emitted tensor "
                   "parallel plan; use tp=1")
    if spec.qk_norm in ("per_head", "full"):  # their weights span the heads tp splits (not sharded by apply_tp)
        out.append(f"tp={s.tp} with qk_norm={spec.qk_norm} (q/k norm weights over all heads) is not supported; "
                   "use tp=1")
    return out


def sp_rule(s: Strategy, spec: ModelSpec | None, world: int, seq_len: int | None) -> list[str]:
    if not s.sequence_parallel:
        return []
    if s.tp == 1:
        return ["sp=1 (sequence parallel) needs tp > 1"]
    if seq_len and (seq_len // s.cp) % s.tp:
        return [f"sp=1: sequence parallel splits seq_len/cp = {seq_len // s.cp} tokens over tp={s.tp}, which does "
                "not divide it"]
    return []


def torchtitan_sp_rule(s: Strategy, spec: ModelSpec | None, world: int, seq_len: int | None) -> list[str]:
    """torchtitan's tensor parallel plan shards the norms with ``SequenceParallel()`` whenever
    ``parallelism.tensor_parallel_degree`` > 1 (``apply_tp`` in torchtitan/models/llama3/infra/parallelize.py):
    no tp without sp."""
    if s.tp > 1 and not s.sequence_parallel:
        return [f"tp={s.tp} with sp=0: --runtime torchtitan runs tensor parallel with sequence parallel norms "
                "always; use sp=1"]
    return []


# What each stack runs of tensor / sequence parallel:
# - torch: autopar's DTensor plan (``codegen.runtime_parallel.apply_tp``), sp on or off.
# - torchtitan: ``parallelism.tensor_parallel_degree``; sequence parallel always on (``torchtitan_sp_rule``).
# - megatron: ``--tensor-model-parallel-size``, ``--sequence-parallel`` on or off.
# - deepspeed: DeepSpeed ZeRO runs no tensor parallel of its own (Megatron-DeepSpeed's tp is Megatron's: its
#   rows are priced under --runtime megatron); DeepSpeed's AutoTP training (2025) is left out: which layers it
#   splits, and how it meets ZeRO stages, is unclear.
# - llm-foundry: its ``tp_config`` (2024) is experimental and splits the FFN only: left out.
STACKS = {
    "torch": Runs("autopar's program: DTensor parallelize_module"),
    "torchtitan": Runs("torchtitan parallelism.tensor_parallel_degree", {}, (torchtitan_sp_rule,)),
    "megatron": Runs("Megatron-LM --tensor-model-parallel-size, --sequence-parallel"),
    "deepspeed": Runs("DeepSpeed ZeRO runs no tensor parallel of its own",
                      {"tp": (1,), "sequence_parallel": (False,)}),
    "llm-foundry": Runs("llm-foundry runs FSDP only; its experimental tp_config is not declared",
                        {"tp": (1,), "sequence_parallel": (False,)}),
}

TECHNIQUE = Technique(
    name="tensor_parallel",
    fields=("tp", "sequence_parallel"),
    rules=(width_rule, sp_rule),
    search={"tp": "divisors of the world inside a node (unless --cross-node) that pass width_rule",
            "sequence_parallel": SP_VALUES},
    cost_terms=("layer_cost:price_layer", "layer_cost:shards_for"),
    apply="autopar.codegen.runtime_parallel.apply_tp",
    stacks=STACKS,
)
