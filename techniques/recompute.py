"""Activation recomputation per layer: ``none``, ``selective`` (attention core re-run, Korthikanti
et al. 2022) or ``full`` (only the block input kept), chosen per layer with the stage partition.
Applied by ``codegen.runtime_ac.apply_ac``; priced by the saved / working bytes of each mode
(``layer_model``) and the re-run forward (``layer_cost.price_layer``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

from autopar.core.model_spec import ModelSpec
from autopar.core.strategy import Recompute, Strategy
from autopar.techniques.base import Runs, Technique, custom

MODES: tuple[str, ...] = get_args(Recompute)


def mode_problem(mode: str, spec: ModelSpec | None) -> str | None:
    """Why ``mode`` cannot run on this model (None when it can): per-layer overrides use it too."""
    if custom(spec) and mode not in ("none", "full"):
        return (f"recompute={mode} needs the built-in attention modules; a custom module supports recompute=full "
                "(whole blocks) or none")
    return None


def mode_rule(s: Strategy, spec: ModelSpec | None, world: int, seq_len: int | None) -> list[str]:
    msg = mode_problem(s.recompute, spec)
    return [msg] if msg else []


# What each stack runs of activation recomputation: the modes (``STACKS``) and how its config places them on the
# layers (``LAYOUTS``: a plan names one mode per layer; a stack's config sets one knob for the whole model):
# - torch: autopar's program (``codegen.runtime_ac``): every mode, layer by layer.
# - torchtitan (release 0.2.2, ``base.RELEASES``): ``activation_checkpoint.mode`` none | full | selective;
#   selective with ``selective_ac_option = "op"`` is the per-op policy (``op``), with an integer N every N-th
#   block a rank builds is checkpointed whole (``distributed/activation_checkpoint._apply_layer_sac``: one counter
#   over the rank's blocks, a block wrapped when count % N == 0): a mix of full and none. Autopar's ``selective``
#   (core attention alone) has no setting there: not declared.
# - megatron: ``--recompute-granularity selective`` (core attention on every layer, Korthikanti et al. 2022) |
#   ``full`` with ``--recompute-method block --recompute-num-layers N`` (the first N layers of every pipeline
#   stage / virtual chunk fully recomputed, the rest not; N at least a chunk's length: every layer, as
#   ``--recompute-method uniform --recompute-num-layers 1`` runs it); no per-op policy, no mix of selective and full.
# - deepspeed: ``deepspeed.checkpointing.checkpoint`` over whole blocks, every layer or none (PipelineModule's
#   ``activation_checkpoint_interval`` > 1 checkpoints groups of layers as one, which no per-layer mode prices).
# - llm-foundry (0.22.0): ``fsdp_config.activation_checkpointing: true`` checkpoints whole blocks, no pipeline.
#   Only its own MPT (``mpt_causal_lm``) reads a target: ``MPTForCausalLM.activation_checkpointing_fn``
#   (models/mpt/modeling_mpt.py) takes the **model** config's ``activation_checkpointing_target``
#   (``{mptblock: "first-N"}``: the first N blocks; unset: every MPTBlock). Other models run as ``hf_causal_lm``,
#   which checkpoints every block when the FSDP flag is set (models/hf/hf_fsdp.py): every block or none.
STACKS = {
    "torch": Runs("autopar's program: checkpoint / per-op policies"),
    "torchtitan": Runs("torchtitan 0.2.2 activation_checkpoint.mode none | full | selective, selective_ac_option op "
                       "(op) or N (every N-th block)", {"recompute": ("none", "op", "full")}),
    "megatron": Runs("Megatron-LM --recompute-granularity selective | full, --recompute-method block, "
                     "--recompute-num-layers", {"recompute": ("none", "selective", "full")}),
    "deepspeed": Runs("DeepSpeed activation_checkpointing: whole blocks", {"recompute": ("none", "full")}),
    "llm-foundry": Runs("llm-foundry fsdp_config.activation_checkpointing: whole blocks, every block or (MPT models, "
                        "model.activation_checkpointing_target first-N) the first N", {"recompute": ("none", "full")}),
}

Mix = Literal["per_layer", "uniform", "first_n", "every_nth"]
Models = Literal["any", "mpt", "not_mpt"]   # the models a layout's setting runs on (``is_mpt``)


@dataclass(frozen=True)
class Layout:
    """One family of per-layer recompute a stack's config expresses: the plan's layers use ``modes`` placed as
    ``mix`` says (``per_layer``: any mode on any layer; ``uniform``: every layer the same one mode; ``first_n`` /
    ``every_nth``: full on the layers a single N picks, none elsewhere; ``planner.recompute.stack_layouts``)."""

    modes: tuple[str, ...]
    mix: Mix
    setting: str = ""   # the stack's configuration that runs it ({n}: the N of first_n / every_nth)
    models: Models = "any"


# stack -> the layout families it runs (``planner.search`` partitions each family's modes and keeps the best)
LAYOUTS: dict[str, tuple[Layout, ...]] = {
    "torch": (Layout(MODES, "per_layer", "emitted by autopar emit"),),
    "torchtitan": (Layout(("none", "full"), "every_nth", 'activation_checkpoint.mode = "selective", '
                          'selective_ac_option = "{n}"'),
                   Layout(("op",), "uniform", 'activation_checkpoint.mode = "selective", selective_ac_option = "op"')),
    "megatron": (Layout(("none", "full"), "first_n", "--recompute-granularity full --recompute-method block "
                        "--recompute-num-layers {n}"),
                 Layout(("selective",), "uniform", "--recompute-granularity selective")),
    "deepspeed": (Layout(("none",), "uniform"),
                  Layout(("full",), "uniform", "deepspeed.checkpointing.checkpoint around every block")),
    # every block first: the one setting that says it for any model (``planner.explain`` reads the first that fits)
    "llm-foundry": (Layout(("none",), "uniform", models="not_mpt"),
                    Layout(("full",), "uniform", "fsdp_config.activation_checkpointing: true", models="not_mpt"),
                    Layout(("none", "full"), "first_n", "fsdp_config.activation_checkpointing: true, "
                           "model.activation_checkpointing_target: {{mptblock: first-{n}}} (an MPT model, "
                           "mpt_causal_lm)", models="mpt")),
}


def is_mpt(spec: ModelSpec | None) -> bool:
    """The model is one llm-foundry builds as its MPT (``mpt_causal_lm``): a transformers config of
    ``model_type: mpt``, or autopar's ``gpt`` family (learned positions, LayerNorm, GeLU MLP: an MPT with
    ``learned_pos_emb: true, alibi: false``, the model its published MPT rows price). Llama, MoE and other
    transformers models run as ``hf_causal_lm``."""
    if spec is None:
        return False
    return spec.family == "gpt" or (spec.hf_config or {}).get("model_type") == "mpt"


def layouts(stack: str, spec: ModelSpec | None) -> tuple[Layout, ...]:
    """The recompute layouts ``stack`` runs for this model (``LAYOUTS`` less those for other models)."""
    mpt = is_mpt(spec)
    return tuple(x for x in LAYOUTS[stack] if x.models == "any" or (x.models == "mpt") == mpt)

TECHNIQUE = Technique(
    name="recompute",
    fields=("recompute",),
    rules=(mode_rule,),
    search={"recompute": "per layer, every mode the cost model prices (layer_cost.RECOMPUTE_MODES)"},
    cost_terms=("layer_model:saved_bytes", "layer_model:working_bytes", "layer_cost:price_layer"),
    apply="autopar.codegen.runtime_ac.apply_ac",
    stacks=STACKS,
)
