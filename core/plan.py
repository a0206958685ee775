"""``Plan``: the planner's output and codegen's input (JSON on disk).

``planner`` writes it, ``codegen`` reads it; they share nothing else. A plan holds the
resolved strategy, the per-layer overrides (recompute per layer), the pipeline stage
partition (layer ranges per virtual stage, in schedule order), the optional expert
placement, the predictions that justified it, the software stack they priced (``runtime``; with
``dtype``, ``seq_len`` and the strategy's global batch, what a re-pricing needs) and where it
came from. ``planner.build`` makes it.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from autopar import __version__
from autopar.core.cluster import ClusterSpec
from autopar.core.gpu import Runtime
from autopar.core.model_spec import ModelSpec
from autopar.core.strategy import Recompute, Strategy
from autopar.errors import InputError, first_error
from autopar.fileio import write_atomic


class StageSpec(BaseModel):
    """One virtual pipeline stage: transformer blocks ``[layer_start, layer_end)``."""

    model_config = ConfigDict(extra="forbid")

    index: int = Field(..., ge=0, description="virtual stage index in model order")
    rank: int = Field(..., ge=0, description="pipeline rank that runs it (techniques.pipeline.stage_rank)")
    layer_start: int = Field(..., ge=0)
    layer_end: int = Field(..., ge=0)
    has_embedding: bool = False
    has_output: bool = False
    predicted_time_s: float | None = None
    predicted_mem_bytes: float | None = None


class StackSettings(BaseModel):
    """The configuration that makes the plan's stack run what was priced, for a launcher to read (``plan`` prints
    the same text in its ``why``): "" where the stack runs it by default (and always for ``torch``: autopar's
    program), None where no setting of the stack runs it."""

    model_config = ConfigDict(extra="forbid")

    recompute: str | None = Field("", description="the per-layer recompute (planner.recompute.stack_setting)")
    stage_split: str | None = Field("", description="the pipeline stage split (planner.stack_split.split_setting)")


# torch.compile of the program the plan priced: nothing, the blocks, the blocks and the loss
Compile = Literal["none", "model", "model+loss"]


class Provenance(BaseModel):
    model_config = ConfigDict(extra="forbid")

    autopar_version: str = __version__
    created_at: str = Field(default_factory=lambda: _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))
    command: str = ""
    inputs: dict[str, str] = Field(default_factory=dict)


class Plan(BaseModel):
    model_config = ConfigDict(extra="forbid")

    format_version: Literal[1] = 1
    model: ModelSpec
    cluster: ClusterSpec
    seq_len: int = Field(..., ge=1)
    dtype: Literal["bf16", "fp16", "fp32", "fp8"] = "bf16"
    runtime: Runtime = Field(
        "torch", description="the software stack the predictions priced (cost_models.session.RUNTIMES)")
    compile: Compile = Field("none", description="what the priced program compiles (--compile; torchtitan runtime)")
    loss_parallel: bool = Field(False, description="cross-entropy on vocabulary-sharded logits (--loss-parallel)")
    moe_capacity_factor: float | None = Field(None, gt=0, description="token-drop expert capacity the priced stack "
                                              "routes with (--moe-capacity-factor); None: dropless")
    a2a_overlap: bool = Field(True, description="False: the priced stack blocks on its MoE all-to-alls "
                              "(--no-a2a-overlap)")
    cross_entropy: Literal["te", "native"] = Field("te", description="the fused loss kernel the priced Megatron-Core "
                                                   "runs (--cross-entropy; megatron_ops.cross_entropy_bytes)")
    tp_comm_overlap: bool = Field(False, description="the priced Megatron-Core run hides its tp collectives with "
                                  "Transformer Engine userbuffers (--tp-comm-overlap; overlap.userbuffers_tp_exposed)")
    strategy: Strategy
    layer_recompute: list[Recompute] = Field(default_factory=list,
                                             description="per-layer recompute override (empty = strategy.recompute)")
    stages: list[StageSpec] = Field(default_factory=list)
    stack_settings: StackSettings = Field(default_factory=StackSettings,
                                          description="the runtime's settings that run these stages and recompute")
    expert_placement: list[list[list[int]]] | None = Field(
        None, description="[moe_layer][ep_rank] -> expert ids held by that rank")
    predictions: dict = Field(default_factory=dict)
    provenance: Provenance = Field(default_factory=Provenance)

    def recompute_of(self, layer: int) -> Recompute:
        if self.layer_recompute:
            return self.layer_recompute[layer]
        return self.strategy.recompute

    # ----- JSON on disk ----------------------------------------------------------
    def save(self, path: str | os.PathLike) -> None:
        """Write atomically: a temp file in the same folder, then rename."""
        write_atomic(Path(path), self.model_dump_json(indent=2))

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Plan":
        p = Path(path)
        if not p.is_file():
            raise InputError(f"plan: {p} does not exist; write one with `autopar plan MODEL --out {p.name}`")
        try:
            data = json.loads(p.read_text())
        except json.JSONDecodeError as exc:
            raise InputError(f"plan: {p} is not valid JSON (line {exc.lineno}: {exc.msg})") from None
        if not isinstance(data, dict):
            raise InputError(f"plan: {p} holds no JSON object; fix: pass the plan.json `autopar plan --out` wrote")
        version = data.get("format_version", 1)
        if version != 1:  # another autopar's plan: its fields may mean something else, so none is read
            raise InputError(f"plan: {p} has format_version {version}; this autopar reads version 1; fix: re-plan "
                             "with this autopar (`autopar plan ... --out`) or use the autopar that wrote it")
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            raise InputError(f"plan: {p}: {first_error(exc)}") from None
