"""Pipeline parallel and its schedules (``torch.distributed.pipelining``).

Fields ``pp``, ``vpp`` (model chunks per rank), ``schedule``:

- ``gpipe`` / ``1f1b``: one stage per rank;
- ``interleaved`` (Megatron interleaved 1F1B) and ``zb_interleaved`` (``ScheduleInterleavedZeroBubble``:
  backward split into input-gradient B and weight-gradient W, W deferred into the bubbles): ``vpp``
  chunks per rank, virtual stage ``i`` on rank ``i % pp`` (looped);
- ``zbv`` (``ScheduleZBVZeroBubble``) and ``dualpipev`` (``ScheduleDualPipeV``): two chunks per rank in
  a V (rank ``r`` holds stages ``r`` and ``2pp-1-r``), so the last stage sits on rank 0 next to the first.

Priced by ``pipeline.step_time`` (closed forms, zero-bubble ones with the W share of backward,
``pipeline.weight_grad_fraction``), checked by ``pipeline.simulate``; memory in flight by
``pipeline.in_flight_microbatches``; applied by ``codegen.runtime_pp.apply_pp``.
"""

from __future__ import annotations

from typing import Literal, get_args

from autopar.core.model_spec import ModelSpec
from autopar.core.strategy import Schedule, Strategy
from autopar.techniques.base import Runs, Technique, custom, custom_refusal
from autopar.techniques.dp_program import SPLIT_BACKWARD

SCHEDULES: tuple[str, ...] = get_args(Schedule)
LOOPED = ("interleaved", "zb_interleaved")      # vpp chunks per rank, stage i on rank i % pp
V_SHAPED = ("zbv", "dualpipev")                 # exactly two chunks per rank, V placement
ZERO_BUBBLE = SPLIT_BACKWARD                  # dp_program: the programs' rule, pure Python
SEARCHED = ("1f1b", "interleaved", "zb_interleaved", "zbv")
# GPipe prices like 1F1B and holds every micro-batch; DualPipeV prices like ZBV (its gain, overlapping
# expert all-to-all with compute, is not modelled): both are searched only when the user names them,
# and GPipe also when m < pp, where torch's 1F1B refuses to run and GPipe prices and holds the same
NAMED_ONLY = ("gpipe", "dualpipev")
# Recompute modes the zero-bubble schedules run: their split backward (input gradients, then weight
# gradients) unpacks a checkpointed region twice, which torch's selective checkpointing forbids
# ("backward an extra time"); full checkpointing recomputes per unpack and runs (contract sweep).
ZB_RECOMPUTE = ("none", "full")


def stage_rank(index: int, pp: int, schedule: str) -> int:
    """The pipeline rank that runs virtual stage ``index``."""
    if schedule in V_SHAPED:
        return index if index < pp else 2 * pp - 1 - index
    return index % pp


def rank_stages(rank: int, pp: int, vpp: int, schedule: str) -> list[int]:
    """The virtual stages a pipeline rank runs, in model order."""
    return [i for i in range(pp * vpp) if stage_rank(i, pp, schedule) == rank]


def depth_rule(s: Strategy, spec: ModelSpec | None, world: int, seq_len: int | None) -> list[str]:
    if custom(spec) and s.pp > 1 and "pp" not in spec.hf_parallel:  # a transformers decoder splits its layers
        return [custom_refusal("pp", s.pp, spec)]
    if spec is not None and spec.layers and s.pp * s.vpp > spec.layers:
        return [f"pp*vpp = {s.pp}*{s.vpp} = {s.pp * s.vpp} stages exceed the model's {spec.layers} layers"]
    return []


def shape_rule(s: Strategy, spec: ModelSpec | None, world: int, seq_len: int | None) -> list[str]:
    if s.schedule not in ("gpipe", "1f1b") and s.pp == 1:
        return [f"schedule={s.schedule} needs pp > 1"]
    if s.vpp > 1 and s.schedule not in LOOPED + V_SHAPED:
        return [f"vpp={s.vpp} needs schedule=interleaved (or zb_interleaved, zbv, dualpipev)"]
    if s.schedule in V_SHAPED and s.vpp != 2:
        return [f"schedule={s.schedule} runs two stages per rank in a V; set vpp=2"]
    return []


def microbatch_rule(s: Strategy, spec: ModelSpec | None, world: int, seq_len: int | None) -> list[str]:
    """Looped schedules run micro-batches in rounds of pp (Megatron-LM and the closed form)."""
    if s.pp > 1 and s.global_batch and s.schedule in LOOPED and s.num_micro_batches % s.pp:
        return [f"{s.schedule} schedule: micro-batches per step ({s.num_micro_batches}) must be a multiple of "
                f"pp={s.pp}; change mbs or the global batch"]
    return []


def tied_v_rule(s: Strategy, spec: ModelSpec | None, world: int, seq_len: int | None) -> list[str]:
    """autopar's program does not emit tied embeddings under a V schedule (an emit rule, autopar's alone)."""
    if s.pp > 1 and s.schedule in V_SHAPED and spec is not None and spec.tie_embeddings:
        return [f"{s.schedule} puts the first and last stage on one rank as two model copies; tied embeddings "
                "are not emitted there; use schedule=zb_interleaved or untie them"]
    return []


def torch_rule(s: Strategy, spec: ModelSpec | None, world: int, seq_len: int | None) -> list[str]:
    """What ``torch.distributed.pipelining``'s schedules accept, and run as priced: an emit rule, and a rule of
    every stack that runs torch's schedules (torchtitan); Megatron and DeepSpeed run fewer micro-batches."""
    if s.pp == 1 or not s.global_batch:
        return []
    m = s.num_micro_batches
    if s.schedule == "1f1b" and m < s.pp:
        return [f"1f1b needs at least pp={s.pp} microbatches per data-parallel rank, the plan has {m} "
                "(global_batch / (mbs*dp)); lower mbs or use schedule=gpipe"]
    if s.schedule in ZERO_BUBBLE and s.recompute not in ZB_RECOMPUTE:
        return [f"{s.schedule} splits the backward in two; recompute={s.recompute} (selective checkpointing) "
                "allows one backward per region; use recompute=none or full"]
    if s.schedule in ZERO_BUBBLE and s.zero_stage == 3:
        return [f"{s.schedule} keeps ZeRO-3 parameters gathered between its split backward passes, which is not "
                "what zero=3 prices; use zero<=2 or schedule=1f1b/interleaved"]
    if s.schedule in LOOPED and s.vpp > 3 and s.zero_stage < 3 and (s.zero_stage == 2 or s.offload_optimizer):
        # torch's lowering keeps at most 3 stages of a rank gathered (schedules._add_unshard_reshard,
        # max_active_stages=3) and re-gathers the others mid-step: not the FSDP it prices (once per step
        # under the zero-bubble schedules, once per micro-batch under interleaved: 1.5x that for 3 of a rank's
        # 5 units at vpp=4; ZeRO-3, gathered twice per micro-batch anyway, counts as priced: counted on gloo
        # in tests/test_pipeline_dp_sync.py)
        return [f"{s.schedule} with vpp={s.vpp} re-gathers FSDP stages beyond the 3 torch keeps gathered, which "
                "is not what zero=2 / offload price (cost_models.fsdp); use vpp<=3 or zero<=1"]
    if s.schedule in V_SHAPED and m < 2 * s.pp:
        return [f"{s.schedule} needs at least 2*pp = {2 * s.pp} microbatches per data-parallel rank, the plan has "
                f"{m}; lower mbs or raise the global batch"]
    return []


def torchtitan_tied_rule(s: Strategy, spec: ModelSpec | None, world: int, seq_len: int | None) -> list[str]:
    """torchtitan 0.2.2 builds each pipeline stage from its own copy of the model (``pipeline_module_split``)
    and nothing ties the embedding of the first stage to the output layer of the last (qwen3's
    ``enable_weight_tying`` ties them within one copy): tied embeddings are not trained tied under pp."""
    if s.pp > 1 and spec is not None and spec.tie_embeddings:
        return [f"pp={s.pp} with tied embeddings: --runtime torchtitan trains the first and last stage's copies "
                "untied; use pp=1 or untie them"]
    return []


# What each stack runs of pipeline parallel:
# - torch: autopar's program (``codegen.runtime_pp``: torch.distributed.pipelining), every schedule above.
# - torchtitan: ``parallelism.pipeline_parallel_degree`` and ``pipeline_parallel_schedule``, a name torch's
#   ``get_schedule_class`` takes: GPipe, 1F1B, Interleaved1F1B, InterleavedZeroBubble, ZBVZeroBubble,
#   DualPipeV (torch's own schedules, the ones autopar emits): what they refuse or run otherwise than priced
#   (``torch_rule``) is its rule too; autopar's own emit limit (``tied_v_rule``) is not, but its stages are
#   model copies that leave tied embeddings untied (``torchtitan_tied_rule``).
# - megatron: ``--pipeline-model-parallel-size`` runs 1F1B; ``--num-layers-per-virtual-pipeline-stage`` /
#   ``--virtual-pipeline-model-parallel-size`` interleaved 1F1B (Megatron-Core ``get_forward_backward_func``).
#   No GPipe, zero-bubble or DualPipe schedule ships in Megatron-Core. Its 1F1B runs fewer micro-batches than
#   pp (warm-up ``min(pp - rank - 1, m)``), which torch's ``Schedule1F1B`` refuses: searched.
# - deepspeed: ``deepspeed.pipe.PipelineModule`` runs ``TrainSchedule`` (1F1B), one stage per rank, any number of
#   micro-batches (``gradient_accumulation_steps``).
# - llm-foundry: no pipeline parallel (Composer FSDP).
STACKS = {
    "torch": Runs("autopar's program: torch.distributed.pipelining"),
    "torchtitan": Runs("torchtitan parallelism.pipeline_parallel_schedule (torch's schedules)", {},
                       (torch_rule, torchtitan_tied_rule)),
    "megatron": Runs("Megatron-LM --pipeline-model-parallel-size, --num-layers-per-virtual-pipeline-stage",
                     {"schedule": ("1f1b", "interleaved")}),
    "deepspeed": Runs("DeepSpeed PipelineModule: TrainSchedule (1F1B)", {"schedule": ("1f1b",), "vpp": (1,)}),
    "llm-foundry": Runs("no pipeline parallel in llm-foundry", {"pp": (1,), "vpp": (1,), "schedule": ("1f1b",)}),
}

# The stage splits each stack's config expresses (``planner.stack_split`` searches only those and prints the setting
# that runs the one priced; a plan's stages are its layers per stage):
# - torch: autopar's program runs the plan's stages, any split (``any``).
# - torchtitan 0.2.2: ``parallelism.module_fqns_per_model_part`` names each stage's modules, any split (``any``);
#   without it, its own split (``runtime_memory.torchtitan_stages``).
# - megatron: every stage ``layers / pp`` layers; with ``--decoder-first-pipeline-num-layers`` /
#   ``--decoder-last-pipeline-num-layers`` the first / last stage another count and the middle ones even (``ends``);
#   the interleaved schedule takes equal chunks only (its uneven first / last stage is not claimed here).
#   ``--pipeline-model-parallel-layout`` (any layout) is not claimed: no release of it is cited here.
# - deepspeed: ``PipelineModule(partition_method=...)`` uniform | parameters | type:regex balances a count over its
#   layer list (no explicit split); priced: ``type:<block class>`` where pp divides the blocks, every stage the
#   same number of blocks (``even``); where it does not, which stages take the extra blocks depends on DeepSpeed's
#   balancing (``ds_utils.partition_balanced``), so those splits are not searched.
# - llm-foundry: no pipeline parallel.
Split = Literal["any", "ends", "even"]
SPLITS: dict[str, Split] = {"torch": "any", "torchtitan": "any", "megatron": "ends", "deepspeed": "even",
                            "llm-foundry": "even"}

TECHNIQUE = Technique(
    name="pipeline",
    fields=("pp", "vpp", "schedule"),
    rules=(depth_rule, shape_rule, microbatch_rule),
    emit_rules=(torch_rule, tied_v_rule),
    search={"pp": "divisors of world / (tp*cp), at most the layer count", "schedule": SEARCHED,
            "vpp": "1; looped schedules: v dividing the layers with layers/v >= pp; V schedules: 2"},
    named_only={"schedule": NAMED_ONLY},
    cost_terms=("pipeline:step_time", "pipeline:simulate", "pipeline:in_flight_microbatches",
                "pipeline:weight_grad_fraction", "estimate:CostModel.p2p_time"),
    apply="autopar.codegen.runtime_pp.apply_pp",
    stacks=STACKS,
)
