"""A ``ModelSpec`` for a Hugging Face model outside the catalog: the transformers module itself.

The spec is ``family="custom"`` with ``hf_config`` (the config.json); ``profiles.hf_capture``
builds it with ``from_config`` on the meta device and traces it. The width, depth, heads and
vocabulary are read where the config names them (for reports and memory bounds only; the
captured graph decides the cost); which of tp / pp the emitted program can apply, and why not,
is decided on a one-layer meta copy of the module (``hf_parallel``, ``hf_why_not``).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from pydantic import ValidationError

from autopar.core.model_spec import ModelSpec
from autopar.errors import InputError, first_error

_ALIASES = {"hidden": ("hidden_size", "d_model", "n_embd", "dim"),
            "layers": ("num_hidden_layers", "num_layers", "n_layer", "n_layers"),
            "heads": ("num_attention_heads", "num_heads", "n_head", "n_heads"),
            "vocab": ("vocab_size",),
            "max_seq_len": ("max_position_embeddings", "n_positions", "max_seq_len")}


def _first(cfg: dict, keys: tuple[str, ...]) -> int:
    for k in keys:
        v = cfg.get(k)
        if isinstance(v, int) and not isinstance(v, bool) and v > 0:
            return v
    return 0


def image_geometry(cfg: dict) -> tuple[int, int, int] | None:
    """(channels, image size, patch size) of a vision config (ViT, DeiT, ...), else None."""
    vis = cfg.get("vision_config") if isinstance(cfg.get("vision_config"), dict) else cfg
    size, patch = vis.get("image_size"), vis.get("patch_size")
    if isinstance(size, list):
        size = size[0]
    if isinstance(patch, list):
        patch = patch[0]
    if isinstance(size, int) and isinstance(patch, int) and patch > 0:
        return int(vis.get("num_channels", 3)), size, patch
    return None


def hf_spec(cfg: dict, path: Path, name: str, input_shape: list[int] | None, input_dtype: str) -> ModelSpec:
    """The spec of the transformers module of ``cfg`` (one-line InputError when it cannot be)."""
    mtype = cfg.get("model_type")
    if not isinstance(mtype, str) or not mtype:
        raise InputError(f"model: {path}: no model_type; a Hugging Face config.json names its model_type")
    if importlib.util.find_spec("transformers") is None:
        raise InputError(f"model: model_type={mtype!r} is outside the built-in catalog and needs transformers "
                         "to be captured as itself; pip install transformers")
    text = cfg.get("text_config") if isinstance(cfg.get("text_config"), dict) else cfg
    fields = {k: _first(text, keys) or _first(cfg, keys) for k, keys in _ALIASES.items()}
    fields["max_seq_len"] = fields["max_seq_len"] or 2048
    geo = image_geometry(cfg)
    sample_tokens, unit = 0, "tokens"
    if geo and input_dtype == "int64" and "vocab_size" not in cfg:
        channels, size, patch = geo
        input_shape = input_shape or [1, channels, size, size]
        input_dtype, unit = "float32", "patches"
        sample_tokens = (input_shape[-1] // patch) * (input_shape[-2] // patch)
    elif input_shape is None:
        input_shape = [1, min(fields["max_seq_len"], 4096)]
    fields.update(_split_fields(cfg, text))
    try:
        return ModelSpec(family="custom", name=name, hf_config=cfg, input_shape=input_shape, input_dtype=input_dtype,
                         sample_tokens=sample_tokens, sample_unit=unit, source=f"hf:{path}", **fields)
    except ValidationError as exc:
        raise InputError(f"model: {path}: {first_error(exc)}") from None


def _split_fields(cfg: dict, text: dict) -> dict:
    """What the technique rules read to allow tp / pp for this module (``hf_parallel`` from a
    one-layer copy built on the meta device, ``profiles.models.hf.parallel_support``) and the
    widths tp must divide (key/value heads, the MLP width)."""
    from autopar.profiles.models.hf import parallel_support

    parallel, why = parallel_support(cfg)
    out: dict = {"hf_parallel": parallel, "hf_why_not": why}
    if "tp" in parallel:
        out["kv_heads"] = _first(text, ("num_key_value_heads", "num_kv_heads", "multi_query_group_num")) or \
            _first(text, _ALIASES["heads"])
        out["ffn_hidden"] = _first(text, ("intermediate_size", "ffn_dim", "n_inner"))
    return out
