"""Rotary position embedding tables (Su et al. 2021) with the frequency scalings of
``core.model_spec.RopeScaling``, computed as transformers computes them
(``transformers.modeling_rope_utils``: ``_compute_linear_scaling_rope_parameters``,
``_compute_llama3_parameters``, ``_compute_yarn_parameters``), so a model built here rotates q and
k by the angles of the checkpoint it was trained as. ``tests/test_rope_scaling.py`` compares each
type with ``ROPE_INIT_FUNCTIONS``. ``scaling`` is a ``RopeScaling`` or, in a run directory, its dict;
None is plain RoPE.
"""

from __future__ import annotations

import math

import torch

from autopar.core.rope_math import cos_sin_factor, rope_fields


def plain_inv_freq(dim: int, theta: float, device=None) -> torch.Tensor:
    """theta^(-2i/dim) for i < dim/2: the unscaled RoPE frequencies."""
    return 1.0 / (theta ** (torch.arange(0, dim, 2, device=device, dtype=torch.float32) / dim))


def llama3_inv_freq(inv: torch.Tensor, s) -> torch.Tensor:
    """Llama 3.1: wavelengths above orig/low_freq_factor divided by ``factor``, below
    orig/high_freq_factor kept, a smooth blend between (Meta's llama-models ``apply_scaling``)."""
    orig = s.original_max_position_embeddings
    wavelen = 2 * math.pi / inv
    scaled = torch.where(wavelen > orig / s.low_freq_factor, inv / s.factor, inv)
    smooth = (orig / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
    blended = (1 - smooth) * scaled / s.factor + smooth * scaled
    medium = ~(wavelen < orig / s.high_freq_factor) * ~(wavelen > orig / s.low_freq_factor)
    return torch.where(medium, blended, scaled)


def yarn_correction_range(s, dim: int, theta: float) -> tuple[float, float]:
    """The dimensions where YaRN's ramp goes from extrapolation (beta_fast rotations over the
    original context) to interpolation (beta_slow rotations) (Peng et al. 2023, Sec. 3.2)."""
    def dim_of(rotations: float) -> float:
        return dim * math.log(s.original_max_position_embeddings / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = dim_of(s.beta_fast), dim_of(s.beta_slow)
    if s.truncate:
        low, high = math.floor(low), math.ceil(high)
    return max(low, 0), min(high, dim - 1)


def yarn_inv_freq(dim: int, theta: float, s, device=None) -> torch.Tensor:
    """YaRN: per dimension, a linear ramp between the plain frequency (fast dimensions) and the
    frequency divided by ``factor`` (slow dimensions)."""
    pos_freqs = theta ** (torch.arange(0, dim, 2, device=device, dtype=torch.float32) / dim)
    low, high = yarn_correction_range(s, dim, theta)
    if low == high:
        high += 0.001  # as transformers: no zero-width ramp
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1).to(device)
    extrapolation = 1 - ramp
    return (1.0 / (s.factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation


def inv_freq(dim: int, theta: float, scaling=None, device=None) -> torch.Tensor:
    """Frequencies of ``dim`` rotated features under ``scaling`` (default and dynamic: plain)."""
    if scaling is None:
        return plain_inv_freq(dim, theta, device)
    scaling = rope_fields(scaling)
    kind = scaling.rope_type
    if kind == "yarn":
        return yarn_inv_freq(dim, theta, scaling, device)
    inv = plain_inv_freq(dim, theta, device)
    if kind == "linear":
        return inv / scaling.factor
    if kind == "llama3":
        return llama3_inv_freq(inv, scaling)
    return inv


def rope_tables(head_dim: int, max_seq_len: int, theta: float, scaling=None,
                device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables [max_seq_len, head_dim // 2], times the scaling's factor on cos and sin (YaRN)."""
    t = torch.arange(max_seq_len, device=device, dtype=torch.float32)
    freqs = torch.outer(t, inv_freq(head_dim, theta, scaling, device))
    factor = 1.0 if scaling is None else cos_sin_factor(scaling)
    if factor == 1.0:
        return freqs.cos(), freqs.sin()
    return freqs.cos() * factor, freqs.sin() * factor
