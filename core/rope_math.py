"""RoPE scaling factors in plain Python (no pydantic, no torch): ``core.model_spec.RopeScaling``
prices with them and the run directory's model (``profiles/models/rope.py``, copied by
``codegen/emit_vendor``) builds with them, where the plan's ``rope_scaling`` is a plain dict."""

from __future__ import annotations

import math
from types import SimpleNamespace


def rope_fields(scaling) -> SimpleNamespace:
    """``ModelSpec.rope_scaling`` as attributes: a ``RopeScaling``, or its dict in a run directory's plan."""
    return SimpleNamespace(**scaling) if isinstance(scaling, dict) else scaling


def yarn_mscale(factor: float, mscale: float) -> float:
    """YaRN's attention temperature 0.1 m ln(s) + 1 (Peng et al. 2023, Eq. 22); 1 where s <= 1."""
    return 0.1 * mscale * math.log(factor) + 1.0 if factor > 1 else 1.0


def cos_sin_factor(scaling) -> float:
    """The factor on cos and sin (transformers ``_compute_yarn_parameters``, megatron-core
    ``_yarn_get_concentration_factor``): ``attention_factor``, else mscale(factor, mscale) /
    mscale(factor, mscale_all_dim) where both are set, else mscale(factor, 1); 1 for other types."""
    s = rope_fields(scaling)
    if s.rope_type != "yarn":
        return 1.0
    if s.attention_factor is not None:
        return s.attention_factor
    if s.mscale and s.mscale_all_dim:
        return yarn_mscale(s.factor, s.mscale) / yarn_mscale(s.factor, s.mscale_all_dim)
    return yarn_mscale(s.factor, 1.0)


def mla_softmax_factor(scaling) -> float:
    """DeepSeek-V2/V3 multiply the softmax scale by mscale(factor, mscale_all_dim)^2 under a scaled
    RoPE (transformers ``deepseek_v3 yarn_apply_mscale``); 1 without ``mscale_all_dim``."""
    s = rope_fields(scaling)
    if s.rope_type == "default" or not s.mscale_all_dim:
        return 1.0
    return yarn_mscale(s.factor, s.mscale_all_dim) ** 2
