"""The settings that make a stack run what autopar priced: the per-layer recompute (``recompute.stack_setting``)
and the pipeline stage split (``stack_split.split_setting``), as the typed field plans and estimates carry
(``core.plan.StackSettings``) and as the sentence ``plan`` and ``estimate`` print."""

from __future__ import annotations

from autopar.core.model_spec import ModelSpec
from autopar.core.plan import StackSettings
from autopar.core.strategy import Strategy
from autopar.planner.recompute import stack_setting
from autopar.planner.stack_split import split_setting
from autopar.techniques.recompute import layouts


def stack_settings(stack: str, layer_recompute: list[str], stages: list[tuple[int, int]], s: Strategy,
                   spec: ModelSpec | None) -> StackSettings:
    """What ``stack`` is configured with to run ``layer_recompute`` on ``stages`` (virtual stages in model order)
    under ``s`` for the model ``spec`` (its layouts: ``recompute.layouts``, as the search reads them); ``torch``
    (autopar's program) runs every plan as written."""
    if stack == "torch":
        return StackSettings()
    return StackSettings(recompute=stack_setting(layouts(stack, spec), layer_recompute, stages, s.pp, s.schedule),
                         stage_split=split_setting(stack, stages, s.pp))


def split_phrase(stack: str, stages: list[tuple[int, int]], pp: int) -> str:
    """The stage split and the stack's setting that runs it, e.g. "stages of [11, 11, 10] layers as megatron runs
    them: --decoder-last-pipeline-num-layers 10"; "" where the stack runs it by default."""
    how = split_setting(stack, stages, pp)
    if how == "":
        return ""
    said = f"as {stack} runs them: {how}" if how else f"(no {stack} setting runs them)"
    return f"stages of {[b - a for a, b in stages]} layers {said}"
