"""Emit-time checks: everything a generated program would trip over, as one-line InputErrors.

``check_plan`` also derives the layout the program uses (stage ranges, per-layer
recompute, expert placement, microbatch count, data-parallel mode), so the rules live in
one place.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from autopar import techniques
from autopar.codegen.runtime_moe import contiguous_placement
from autopar.codegen.runtime_pp import even_stages
from autopar.core.plan import Plan
from autopar.errors import InputError
from autopar.techniques import recompute as recompute_technique
from autopar.techniques.dp_program import plan_dp_mode
from autopar.techniques.pipeline import stage_rank

_DP_SUMMARY = {
    "none": "none (dp*cp = 1)",
    "ddp": "DDP over dp*cp ranks",
    "replicate": "replicated over dp*cp ranks (FSDP2 replicate: all-reduce per block, like DDP)",
    "fsdp2": "FSDP2 fully_shard over dp*cp ranks",
    "zero1": "ZeRO-1 over dp*cp ranks (whole params and grads; ShardedAdamW: reduce-scatter, sharded fp32 "
             "states, all-gather)",
}


@dataclass
class Layout:
    pp: int
    stages: list[tuple[int, int]]
    recompute: dict[int, str]
    n_micro: int
    vocab: int
    dp_mode: str
    dp_summary: str
    ep: int = 1
    edp: int = 1
    placement: list[list[list[int]]] | None = None
    notes: list[str] = field(default_factory=list)


def check_plan(plan: Plan, device: str) -> Layout:
    s, m = plan.strategy, plan.model
    if s.world != plan.cluster.world:
        raise InputError(f"plan: the strategy uses dp*tp*pp*cp = {s.world} ranks but the cluster has "
                         f"{plan.cluster.world} ({plan.cluster.short()}); re-plan for this cluster")
    if s.global_batch <= 0:
        raise InputError("plan: strategy.global_batch is 0; set the global batch (gbs=...) when planning")
    if plan.runtime != "torch":  # the emitted program is the torch runtime: what was priced must be what runs
        raise InputError(f"plan: runtime={plan.runtime} prices {plan.runtime}'s kernels and memory, but the emitted "
                         "program runs autopar's torch runtime; re-plan with --runtime torch")
    notes = []
    if plan.dtype in ("fp16", "fp8"):
        notes.append(f"the plan's dtype is {plan.dtype}; this program runs bf16 (FSDP2 mixed precision), "
                     "so time and memory differ from the prediction")
    vocab = _check_custom(plan) if m.family == "custom" else m.vocab
    if m.family != "custom" and plan.seq_len > m.max_seq_len:
        raise InputError(f"plan: seq_len={plan.seq_len} exceeds the model's max_seq_len={m.max_seq_len}")
    # every technique's rules and emit rules: the same functions the planner's search reads, once per
    # recompute mode the plan runs (a per-layer override meets the same emit rules as strategy.recompute)
    for mode in _recompute_modes(plan):
        for msg in techniques.violations(s.model_copy(update={"recompute": mode}), m, plan.cluster.world,
                                         plan.seq_len, emitted=True):
            where = "" if mode == s.recompute else f" (layer_recompute holds {mode})"
            raise InputError(f"strategy: {msg}{where}")
    stages = _stages(plan)
    recompute = _recompute(plan)
    placement = _placement(plan) if s.ep > 1 else None
    mode = plan_dp_mode(s, plan.dtype)
    summary = _DP_SUMMARY[mode]
    if mode == "fsdp2":
        summary += " (ZeRO-3: reshard after forward)" if s.zero_stage >= 3 else \
            " (ZeRO-2: parameters stay gathered between forward and backward)"
        if s.offload_optimizer:
            summary += " + CPUOffloadPolicy (parameter shards, gradients, AdamW states on the host)"
    elif mode == "ddp" and s.zero_stage == 1:
        summary += " + ZeroRedundancyOptimizer (ZeRO-1: optimizer states sharded)"
    if plan.dtype != "fp32":
        summary += "; bf16 weights in compute and collectives, fp32 master weights"
    return Layout(pp=s.pp, stages=stages, recompute=recompute, n_micro=s.num_micro_batches, vocab=vocab,
                  dp_mode=mode, dp_summary=summary, ep=s.ep, edp=s.edp, placement=placement,
                  notes=notes)


def _stages(plan: Plan) -> list[tuple[int, int]]:
    s, m = plan.strategy, plan.model
    n = s.pp * s.vpp
    one = s.pp == 1 and (m.family == "custom" or not plan.stages)   # stages a pp=1 plan lists must cover it too
    if (m.family == "custom" and m.hf_config is None) or one:  # transformers decoders split their layers
        return [(0, m.layers)] if m.family != "custom" else [(0, 0)]
    if not plan.stages:
        return even_stages(m.layers, n)
    if len(plan.stages) != n:
        raise InputError(f"plan: {len(plan.stages)} stages listed but pp*vpp = {n}")
    out, expect = [], 0
    for i, st in enumerate(sorted(plan.stages, key=lambda x: x.index)):
        rank = stage_rank(i, s.pp, s.schedule)
        if st.index != i or st.rank != rank:
            raise InputError(f"plan: stage {st.index} runs on rank {st.rank}; under schedule={s.schedule} "
                             f"virtual stage {i} runs on pipeline rank {rank}")
        if st.layer_start != expect or st.layer_end < st.layer_start:
            raise InputError(f"plan: stage {i} covers layers [{st.layer_start}, {st.layer_end}) but should start "
                             f"at {expect}; stages must cover the layers in order")
        if st.layer_end == st.layer_start and 0 < i < n - 1:
            raise InputError(f"plan: stage {i} holds no layer (only the first and last stages may, for the "
                             "embedding or the output); give it at least one layer")
        out.append((st.layer_start, st.layer_end))
        expect = st.layer_end
    if expect != m.layers:
        raise InputError(f"plan: stages cover {expect} layers, the model has {m.layers}")
    return out


def _recompute_modes(plan: Plan) -> list[str]:
    """strategy.recompute first, then every other mode ``layer_recompute`` names."""
    s = plan.strategy
    return [s.recompute] + sorted(set(plan.layer_recompute) - {s.recompute})


def _recompute(plan: Plan) -> dict[int, str]:
    m = plan.model
    n = m.layers if m.family != "custom" else len(plan.layer_recompute) or 0
    if plan.layer_recompute and m.family != "custom" and len(plan.layer_recompute) != m.layers:
        raise InputError(f"plan: layer_recompute lists {len(plan.layer_recompute)} layers, the model has {m.layers}")
    if plan.layer_recompute:
        modes = list(plan.layer_recompute)
    else:
        modes = [plan.strategy.recompute] * (n if m.family != "custom" else _custom_blocks(plan))
    for msg in filter(None, (recompute_technique.mode_problem(mode, m) for mode in sorted(set(modes)))):
        raise InputError(f"strategy: {msg}")
    return {i: r for i, r in enumerate(modes) if r != "none"}


def _placement(plan: Plan) -> list[list[list[int]]]:
    s, m = plan.strategy, plan.model
    if plan.expert_placement is None:  # the layout a routing trace is priced on (runtime_moe)
        return [contiguous_placement(m.num_experts, s.ep) for _ in range(m.moe_layers)]
    pl = plan.expert_placement
    if len(pl) != m.moe_layers:
        raise InputError(f"plan: expert_placement has {len(pl)} layers, the model has {m.moe_layers} MoE layers")
    for li, layer in enumerate(pl):
        if len(layer) != s.ep:
            raise InputError(f"plan: expert_placement[{li}] lists {len(layer)} ranks, ep={s.ep}")
        ids = sorted(e for ranks in layer for e in ranks)
        if ids != list(range(m.num_experts)):
            raise InputError(f"plan: expert_placement[{li}] must hold each of the {m.num_experts} experts exactly "
                             "once (replicated experts are not emitted yet)")
    return [[list(map(int, r)) for r in layer] for layer in pl]


# ----- user modules ---------------------------------------------------------------------
def _custom_model(plan: Plan) -> nn.Module:
    from autopar.profiles.models import build_model

    return build_model(plan.model, "meta")


def _custom_blocks(plan: Plan) -> int:
    from autopar.codegen.runtime_parallel import block_list

    return len(block_list(_custom_model(plan)))


def _check_custom(plan: Plan) -> int:
    """A user module: needs a block list and token -> logits forward; supports dp/zero/recompute."""
    s, m = plan.strategy, plan.model
    name = m.factory or f"transformers {(m.hf_config or {}).get('model_type')}"  # hf_config: the module itself
    for deg in ("tp", "pp", "cp", "ep"):
        if getattr(s, deg) > 1 and deg not in m.hf_parallel:  # a transformers module's own tp plan, its layer list
            raise InputError(f"strategy: {deg}={getattr(s, deg)} needs the built-in architectures' module names; "
                             f"custom module '{name}' supports dp, zero stages and recompute=full only")
    if m.input_dtype != "int64":
        raise InputError(f"model: custom module '{name}' takes {m.input_dtype} inputs; emitted programs train "
                         "language models (int64 tokens -> logits)")
    model = _custom_model(plan)
    lists = [mod for mod in model.modules() if isinstance(mod, (nn.ModuleList, nn.ModuleDict)) and len(mod)]
    if not lists:
        raise InputError(f"model: custom module '{name}' has no block list (an nn.ModuleList or nn.ModuleDict "
                         "of repeated blocks); codegen shards and checkpoints per block")
    emb = [mod for mod in model.modules() if isinstance(mod, nn.Embedding)]
    if not emb:
        raise InputError(f"model: custom module '{name}' has no nn.Embedding to read the vocabulary size from; "
                         "emitted programs train token language models")
    vocab = emb[0].num_embeddings
    if m.hf_config is not None:  # HFLanguageModel returns logits by construction; capture ran the module
        return vocab
    try:
        out = model(torch.zeros(2, 8, dtype=torch.long, device="meta"))
    except Exception as exc:  # user code: any failure is an input problem
        first = str(exc).splitlines()[0] if str(exc) else ""
        raise InputError(f"model: custom module '{name}' failed on tokens [2, 8]: {type(exc).__name__}: {first}; "
                         "expected forward(tokens) -> logits") from None
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != (2, 8, vocab):
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise InputError(f"model: custom module '{name}' returned {shape} for tokens [2, 8]; expected logits "
                         f"[2, 8, {vocab}] (forward(tokens[b, s]) -> logits[b, s, vocab])")
    return vocab
