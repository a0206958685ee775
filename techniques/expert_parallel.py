"""Expert parallel (``ep``: experts spread over ranks, tokens routed by all-to-all) and expert
tensor parallel (``etp``: each expert's FFN split). MoE Parallel Folding (Megatron-Core): the
expert mapping ``edp * ep * etp`` covers the ``dp * tp * cp`` ranks of a pipeline stage.
Applied by ``codegen.runtime_moe.apply_ep`` over the (edp, ep, etp) mesh of a stage (ep with tp and
etp > 1 included, so no emit rule narrows the search); priced per layer (``layer_cost.price_layer``, with
the placement's load ratio from ``moe_load``)."""

from __future__ import annotations

from autopar.core.model_spec import ModelSpec
from autopar.core.strategy import Strategy
from autopar.techniques.base import Runs, Technique, custom, custom_refusal


def fold_rule(s: Strategy, spec: ModelSpec | None, world: int, seq_len: int | None) -> list[str]:
    per_stage = world // s.pp
    g = s.ep * s.etp
    if g > per_stage or per_stage % g:
        return [f"ep*etp = {s.ep}*{s.etp} = {g} must divide dp*tp*cp = {per_stage} (GPUs per pipeline stage)"]
    return []


def model_rule(s: Strategy, spec: ModelSpec | None, world: int, seq_len: int | None) -> list[str]:
    if spec is None:
        return []
    if custom(spec) and s.ep * s.etp > 1:  # a transformers MoE keeps its experts replicated
        return [custom_refusal("ep" if s.ep > 1 else "etp", max(s.ep, s.etp), spec)]
    if s.ep > 1 and not spec.is_moe:
        return [f"ep={s.ep} needs a mixture-of-experts model; {spec.name} is dense"]
    out = []
    if spec.is_moe and spec.num_experts % s.ep:
        out.append(f"ep={s.ep} does not divide num_experts={spec.num_experts}")
    if spec.is_moe and spec.moe_ffn_hidden % s.etp:
        out.append(f"etp={s.etp} does not divide moe_ffn_hidden={spec.moe_ffn_hidden}")
    return out


# What each stack runs of expert parallel:
# - torch: autopar's program (``codegen.runtime_moe``), ep and etp over the stage's (edp, ep, etp) mesh.
# - torchtitan: ``parallelism.expert_parallel_degree`` (its MoE models); its
#   ``expert_tensor_parallel_degree`` takes 1 or the tp degree only in the releases read: etp left out.
# - megatron: ``--expert-model-parallel-size``, ``--expert-tensor-parallel-size`` (MoE Parallel Folding).
# - deepspeed: DeepSpeed-MoE's ``ep_size`` is not declared (how it meets each ZeRO stage is unclear): left out.
# - llm-foundry: its MoE runs through MegaBlocks (``moe_world_size``), not declared here: left out.
STACKS = {
    "torch": Runs("autopar's program: the (edp, ep, etp) mesh"),
    "torchtitan": Runs("torchtitan parallelism.expert_parallel_degree", {"etp": (1,)}),
    "megatron": Runs("Megatron-LM --expert-model-parallel-size, --expert-tensor-parallel-size"),
    "deepspeed": Runs("DeepSpeed-MoE expert parallel is not declared", {"ep": (1,), "etp": (1,)}),
    "llm-foundry": Runs("llm-foundry's MegaBlocks MoE is not declared", {"ep": (1,), "etp": (1,)}),
}

TECHNIQUE = Technique(
    name="expert_parallel",
    fields=("ep", "etp"),
    rules=(fold_rule, model_rule),
    search={"ep": "divisors of num_experts", "etp": "divisors of moe_ffn_hidden",
            "ep*etp": "divides dp*tp*cp, inside a node unless --cross-node"},
    cost_terms=("layer_cost:price_layer", "moe_load:load_ratio_from_files"),
    apply="autopar.codegen.runtime_moe.apply_ep",
    stacks=STACKS,
)
