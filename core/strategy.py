"""``Strategy``: the parallel degrees and knobs of one training configuration.

Dense (attention) mapping: ``dp * tp * pp * cp = world``. MoE layers use their own
mapping over the same GPUs and the same pipeline (MoE Parallel Folding, Megatron-Core):
``edp * ep * etp * pp = world``, so ``ep * etp`` must divide ``world / pp``.
Rank order (innermost first): tp, cp, dp within a pipeline stage, pp outermost; the
expert mapping folds etp innermost, then ep, then edp over the same ranks.

A compact string form is accepted everywhere a strategy is:
``tp=8,pp=4,dp=-1,mbs=1,zero=1,recompute=selective,sp=1`` (``-1`` = "the rest").
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from autopar.errors import InputError

Recompute = Literal["none", "selective", "op", "full"]  # op: per-op selective checkpointing (torchtitan)
Schedule = Literal["gpipe", "1f1b", "interleaved", "zb_interleaved", "zbv", "dualpipev"]  # techniques/pipeline.py

# compact key -> field name
ALIASES = {
    "dp": "dp", "tp": "tp", "pp": "pp", "cp": "cp", "ep": "ep", "etp": "etp", "vpp": "vpp",
    "mbs": "micro_batch", "micro_batch": "micro_batch",
    "gbs": "global_batch", "global_batch": "global_batch",
    "zero": "zero_stage", "zero_stage": "zero_stage",
    "recompute": "recompute", "sp": "sequence_parallel", "sequence_parallel": "sequence_parallel",
    "schedule": "schedule", "offload": "offload_optimizer", "offload_optimizer": "offload_optimizer",
}
COMPACT_KEYS = {"micro_batch": "mbs", "global_batch": "gbs", "zero_stage": "zero", "sequence_parallel": "sp",
                "offload_optimizer": "offload"}
DEGREES = ("dp", "tp", "pp", "cp")


class Strategy(BaseModel):
    model_config = ConfigDict(extra="forbid")

    dp: int = Field(-1, description="data parallel degree (-1 = the rest)")
    tp: int = 1
    pp: int = 1
    cp: int = 1
    ep: int = 1
    etp: int = 1
    vpp: int = Field(1, ge=1, description="virtual pipeline chunks per GPU (interleaved)")
    micro_batch: int = Field(1, ge=1)
    global_batch: int = Field(0, ge=0, description="sequences per step; 0 = taken from the command line")
    zero_stage: int = Field(0, ge=0, le=3)
    recompute: Recompute = "none"
    sequence_parallel: bool = False
    schedule: Schedule = "1f1b"
    offload_optimizer: bool = Field(False, description="ZeRO-Offload: fp32 master weights and Adam moments in "
                                                       "host memory, the Adam step on the CPU")

    # ----- parsing ---------------------------------------------------------------
    @classmethod
    def parse(cls, text: str, **defaults) -> "Strategy":
        """Parse ``tp=8,pp=4,dp=-1,...``; keys not named take ``defaults`` then field defaults."""
        return cls.build(**{**defaults, **cls.parse_partial(text)})

    @classmethod
    def parse_partial(cls, text: str) -> dict:
        """The fields a strategy string names, coerced, without defaults (for planner constraints)."""
        named = {}
        for item in filter(None, (p.strip() for p in text.replace(" ", "").split(","))):
            if "=" not in item:
                raise InputError(f"strategy: '{item}' is not key=value (example: tp=8,pp=4,dp=-1,mbs=1)")
            key, raw = item.split("=", 1)
            if key not in ALIASES:
                raise InputError(f"strategy: unknown key '{key}'; known keys: {', '.join(sorted(set(ALIASES)))}")
            named[ALIASES[key]] = _coerce(ALIASES[key], raw)
        cls.build(**named)  # validate types early
        return named

    @classmethod
    def build(cls, **values) -> "Strategy":
        try:
            return cls(**values)
        except ValidationError as exc:
            err = exc.errors()[0]
            field = ".".join(str(x) for x in err["loc"])
            named = f"{COMPACT_KEYS.get(field, field)}={values[field]}" if field in values else field  # as typed
            raise InputError(f"strategy: {named or 'strategy'}: {err['msg']}") from None

    def compact(self) -> str:
        """The compact string; round-trips through ``parse``."""
        parts = []
        for name in FIELDS:
            val = getattr(self, name)
            if isinstance(val, bool):
                val = int(val)
            parts.append(f"{COMPACT_KEYS.get(name, name)}={val}")
        return ",".join(parts)

    def short(self) -> str:
        """A human label with only the non-trivial knobs."""
        bits = [f"dp{self.dp}", f"tp{self.tp}", f"pp{self.pp}"]
        if self.cp > 1:
            bits.append(f"cp{self.cp}")
        if self.ep > 1 or self.etp > 1:
            bits.append(f"ep{self.ep}" + (f"etp{self.etp}" if self.etp > 1 else ""))
        if self.pp > 1:
            bits.append(self.schedule + (f"v{self.vpp}" if self.schedule in ("interleaved", "zb_interleaved") else ""))
        bits.append(f"mbs{self.micro_batch}")
        if self.zero_stage:
            bits.append(f"z{self.zero_stage}")
        if self.sequence_parallel:
            bits.append("sp")
        if self.recompute != "none":
            bits.append(f"rc-{self.recompute}")
        if self.offload_optimizer:
            bits.append("offload")
        return " ".join(bits)

    # ----- resolution against a world size -----------------------------------------
    def resolve(self, world: int, global_batch: int | None = None) -> "Strategy":
        """Fill ``-1`` degrees and check that they multiply to ``world``. The techniques' own rules:
        ``autopar.techniques.check`` / ``resolve``."""
        vals = self.model_dump()
        if global_batch and not vals["global_batch"]:
            vals["global_batch"] = global_batch
        free = [d for d in DEGREES if vals[d] == -1]
        for d in ("dp", "tp", "pp", "cp", "ep", "etp"):
            if vals[d] == 0 or vals[d] < -1:
                raise InputError(f"strategy: {d}={vals[d]} must be a positive integer (or -1 for the rest)")
        if len(free) > 1:
            raise InputError(f"strategy: only one of {', '.join(free)} may be -1")
        fixed = 1
        for d in DEGREES:
            if vals[d] != -1:
                fixed *= vals[d]
        if free:
            if world % fixed:
                raise InputError(f"strategy: {_product(vals)} = {fixed} does not divide the cluster's {world} GPUs")
            vals[free[0]] = world // fixed
        total = vals["dp"] * vals["tp"] * vals["pp"] * vals["cp"]
        if total != world:
            raise InputError(f"strategy: {_product(vals)} = {total}, but the cluster has {world} GPUs")
        # the rules of each technique (ep*etp folding, schedules, sp, the batch split) live in
        # autopar.techniques, which CostModel.check, the search and emit all read
        return Strategy(**vals)

    # ----- derived quantities (resolved strategies only) ----------------------------
    @property
    def edp(self) -> int:
        """Expert data parallel degree: the ranks of a stage not used by ep*etp."""
        return self.dp * self.tp * self.cp // (self.ep * self.etp)

    @property
    def num_micro_batches(self) -> int:
        return self.global_batch // (self.micro_batch * self.dp)

    @property
    def world(self) -> int:
        return self.dp * self.tp * self.pp * self.cp


FIELDS: tuple[str, ...] = tuple(Strategy.model_fields)   # the one list of strategy fields
BOOL_FIELDS: tuple[str, ...] = tuple(f for f, info in Strategy.model_fields.items() if info.annotation is bool)


def _product(vals: dict) -> str:
    names = "*".join(DEGREES)
    nums = "*".join("?" if vals[d] == -1 else str(vals[d]) for d in DEGREES)
    return f"{names} = {nums}"


def _coerce(field: str, raw: str):
    if field in ("recompute", "schedule"):
        return raw
    if field in BOOL_FIELDS:
        if raw.lower() in ("1", "true", "yes", "on"):
            return True
        if raw.lower() in ("0", "false", "no", "off"):
            return False
        raise InputError(f"strategy: {COMPACT_KEYS[field]}={raw} must be 0 or 1")
    try:
        return int(raw)
    except ValueError:
        raise InputError(f"strategy: {field}={raw} must be an integer") from None
