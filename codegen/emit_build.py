"""The ``build()`` body of an emitted ``train.py``: one ``rt.apply_*`` call per technique the plan
uses, in the fixed order of docs/codegen.md (pipeline split, tp/sp, cp, ep, recompute, data
parallel, materialize, pipeline schedule), each with a numbered comment saying why.
"""

from __future__ import annotations

from autopar.codegen.emit_checks import Layout
from autopar.core.plan import Plan


def render_build(plan: Plan, lay: Layout) -> str:
    s = plan.strategy
    hf = plan.model.hf_config is not None  # a transformers module: its own tp plan and decoder layer list
    out = ["    # @. The whole model on the meta device: shapes only, no memory.",
           "    model = rt.build_meta_model(spec)"]
    if s.pp > 1:
        out += ["    # @. Pipeline split: keep copies of the virtual stages this rank runs, blocks outside",
                "    #    them deleted (layer names stay global, so checkpoints do not depend on the split).",
                f"    parts, stage_ids = rt.{'split_hf_stages' if hf else 'split_stages'}(model, mesh, STAGES, "
                "STAGE_RANKS)"]
    else:
        out += ["    parts, stage_ids = [model], [0]  # @. no pipeline: one part, the whole model"]
    per_part = _per_part(plan, lay, hf)
    if per_part:
        out += ["    for part in parts:"] + per_part
    dp_call = _dp_call(plan, lay)
    if lay.dp_mode in ("fsdp2", "replicate"):
        what = "ZeRO-2/3 (FSDP2 fully_shard)" if lay.dp_mode == "fsdp2" else "replicated data parallel (FSDP2)"
        out += [f"    # @. Data parallel over dp*cp ranks: {what}, applied on the meta",
                "    #    device so no rank ever allocates more than its shard."] + _dp_why(plan) + [dp_call]
    out += ["    # @. Materialize: allocate this rank's shards, fill them from the seed (the weights of a",
            "    #    single-process run, whatever the strategy)."]
    if s.offload_optimizer:
        out += ["    #    Offload: the parameter shards live on the host (CPUOffloadPolicy), buffers on the device.",
                '    rt.materialize(parts, spec, args.seed, "cpu")',
                "    rt.buffers_to(parts, device)"]
    else:
        out += ["    rt.materialize(parts, spec, args.seed, device)"]
    if lay.dp_mode == "ddp":
        what = "DDP + ZeroRedundancyOptimizer (ZeRO-1)" if s.zero_stage == 1 else "DDP"
        out += [f"    # @. Data parallel over dp*cp ranks: {what}; DDP wraps materialized modules.", dp_call]
    if lay.dp_mode == "zero1":
        out += ["    # @. ZeRO-1 over dp*cp ranks: parameters and gradients stay whole; the optimizer",
                "    #    (make_optimizer) keeps fp32 master slices and moments of 1/(dp*cp) of each weight.",
                "    #    Gradients reduce-scatter in buckets during the last micro-batch's backward, updated",
                "    #    weights all-gather after the step, each bucket waited by the next forward that reads it.",
                dp_call]
    if s.pp > 1:
        out += ["    # @. Pipeline stages and the schedule (microbatches flow between pp ranks).",
                "    schedule = rt.apply_pp(parts, stage_ids, N_STAGES, mesh, SCHEDULE, N_MICRO, device)"]
    else:
        out += ["    schedule = None"]
    out += ["    return parts, stage_ids, schedule"]
    return _number_steps("\n".join(out))


def _per_part(plan: Plan, lay: Layout, hf: bool) -> list[str]:
    """The techniques applied to each model part (pipeline stage), in the documented order."""
    s = plan.strategy
    per_part: list[str] = []
    if s.tp > 1 and hf:
        per_part += ["        # @. Tensor parallel: the model's own plan (its config's base_model_tp_plan: colwise /",
                     "        #    rowwise linears, DTensor); sequence parallel splits norms and residuals.",
                     "        rt.apply_hf_tp(part, mesh, sequence_parallel=SEQUENCE_PARALLEL)"]
    elif s.tp > 1:
        per_part += ["        # @. Tensor parallel: q/k/v, w1/w3 column-wise, wo/w2 row-wise (DTensor);",
                     "        #    sequence parallel splits norms and residuals along the sequence.",
                     "        rt.apply_tp(part, mesh, sequence_parallel=SEQUENCE_PARALLEL)"]
    if s.cp > 1:
        per_part += ["        # @. Context parallel: this rank's share of every sequence; attention all-gathers K/V.",
                     "        rt.apply_cp(part, mesh, seq_len=SEQ_LEN)"]
    if lay.ep > 1 or s.etp > 1:
        call = ("rt.apply_ep(part, mesh, EXPERT_PLACEMENT, first_moe_layer=FIRST_MOE_LAYER)" if lay.ep > 1
                else "rt.apply_ep(part, mesh, None)")
        per_part += ["        # @. Expert parallel: keep the experts the placement names for this rank (ep), their",
                     "        #    ffn split over etp; tokens reach them with all-to-all (each tp rank its share).",
                     "        " + call]
    if lay.recompute:
        per_part += ["        # @. Activation checkpointing on the layers the plan names.",
                     "        rt.apply_ac(part, RECOMPUTE)"]
    return per_part


def _number_steps(text: str) -> str:
    """Number the ``# @.`` comments 1, 2, ... in order (only the steps this plan uses appear)."""
    parts = text.split("# @. ")
    return parts[0] + "".join(f"# {n}. {rest}" for n, rest in enumerate(parts[1:], 1))


def _dp_call(plan: Plan, lay: Layout) -> str:
    s = plan.strategy
    extra = ""
    if s.offload_optimizer:
        extra += ", offload=True"
    if plan.dtype != "fp32":
        extra += f', dtype="{plan.dtype}"'
    if lay.dp_mode == "zero1":  # ZeRO-1 counts each part's backward passes to reduce during the last one
        extra += ", micro_batches=N_MICRO"
    pipeline = "SCHEDULE" if s.pp > 1 else "False"  # the schedule decides how FSDP meets the pipeline
    return (f"    parts = [rt.apply_dp(part, mesh, zero_stage=ZERO_STAGE, tp=TP, pipeline={pipeline}{extra})"
            " for part in parts]")


def _dp_why(plan: Plan) -> list[str]:
    """What the priced knobs become in FSDP2 (emitted as priced: see cost_models/estimate.py)."""
    s, out = plan.strategy, []
    if plan.dtype != "fp32":
        out.append("    #    bf16: MixedPrecisionPolicy - bf16 compute weights, all-gathers and reduce-scatters.")
    if s.offload_optimizer:
        out.append("    #    offload: CPUOffloadPolicy - parameter shards, gradients and AdamW states on the host.")
    return out
