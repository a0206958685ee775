"""Model intake: a preset name, a Hugging Face style ``config.json``, or a factory.

All three give a ``ModelSpec``; ``autopar.profiles.models.build_model`` turns it into
an ``nn.Module`` and ``autopar.profiles.graph.capture`` into a graph.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

from pydantic import ValidationError

from autopar.core.model_spec import ModelSpec
from autopar.errors import InputError, first_error
from autopar.profiles.hf_families import READERS, HFReader, text_config

_GPT3 = dict(family="gpt", vocab=51200, max_seq_len=2048, tie_embeddings=True, dropout=0.1, attention="eager")
_LLAMA3 = dict(family="llama", kv_heads=8, vocab=128256, max_seq_len=8192, rope_theta=500000.0)
# deepseek-ai/DeepSeek-V3 config.json rope_scaling
_DEEPSEEK_YARN = dict(rope_type="yarn", factor=40.0, original_max_position_embeddings=4096, beta_fast=32.0,
                      beta_slow=1.0, mscale=1.0, mscale_all_dim=1.0)
_MIXTRAL = dict(family="moe", kv_heads=8, num_experts=8, topk=2, rope_theta=1e6, max_seq_len=4096)

# Published configurations. GPT-3 sizes: Brown et al. 2020 Table 2.1 (1.3B uses 16 heads of
# 128 so that heads divide the width, as Megatron-LM does); Llama 3: Llama 3 herd paper
# Table 3; Mixtral: Mistral AI model cards; DeepSeek-V3: arXiv:2412.19437 Sec. 4.2;
# Qwen2-57B-A14B: its Hugging Face config.
PRESETS: dict[str, dict] = {
    "gpt3-125m": dict(_GPT3, hidden=768, layers=12, heads=12, ffn_hidden=3072),
    "gpt3-350m": dict(_GPT3, hidden=1024, layers=24, heads=16, ffn_hidden=4096),
    "gpt3-1.3b": dict(_GPT3, hidden=2048, layers=24, heads=16, ffn_hidden=8192),
    "gpt3-2.7b": dict(_GPT3, hidden=2560, layers=32, heads=32, ffn_hidden=10240),
    "gpt3-6.7b": dict(_GPT3, hidden=4096, layers=32, heads=32, ffn_hidden=16384),
    "gpt3-13b": dict(_GPT3, hidden=5120, layers=40, heads=40, ffn_hidden=20480),
    "gpt3-175b": dict(_GPT3, hidden=12288, layers=96, heads=96, ffn_hidden=49152),
    "llama3-8b": dict(_LLAMA3, hidden=4096, layers=32, heads=32, ffn_hidden=14336),
    "llama3-70b": dict(_LLAMA3, hidden=8192, layers=80, heads=64, ffn_hidden=28672),
    # 405B exists only as Llama 3.1: its RoPE scaling (meta-llama/Llama-3.1-405B config.json)
    "llama3-405b": dict(_LLAMA3, hidden=16384, layers=126, heads=128, ffn_hidden=53248, rope_scaling=dict(
        rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
        original_max_position_embeddings=8192)),
    "mixtral-8x7b": dict(_MIXTRAL, hidden=4096, layers=32, heads=32, moe_ffn_hidden=14336, vocab=32000),
    "mixtral-8x22b": dict(_MIXTRAL, hidden=6144, layers=56, heads=48, moe_ffn_hidden=16384, vocab=32768),
    "qwen2-57b-a14b": dict(family="moe", hidden=3584, layers=28, heads=28, kv_heads=4, vocab=151936,
                           num_experts=64, topk=8, moe_ffn_hidden=2560, shared_ffn_hidden=20480,
                           shared_expert_gate=True, qkv_bias=True, rope_theta=1e6, max_seq_len=4096, norm_eps=1e-6),
    "deepseek-v3": dict(family="deepseek_v3", hidden=7168, layers=61, heads=128, vocab=129280, ffn_hidden=18432,
                        num_experts=256, topk=8, moe_ffn_hidden=2048, shared_experts=1, first_dense_layers=3,
                        q_lora_rank=1536, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64,
                        v_head_dim=128, max_seq_len=4096, norm_eps=1e-6, rope_scaling=_DEEPSEEK_YARN),
    # Small configurations for CPU runs, tests and the closed-loop validation.
    "gpt-tiny": dict(family="gpt", hidden=64, layers=4, heads=4, ffn_hidden=256, vocab=512, max_seq_len=128),
    "gpt-small": dict(family="gpt", hidden=256, layers=8, heads=8, ffn_hidden=1024, vocab=4096, max_seq_len=256),
    "gpt2-124m": dict(family="gpt", hidden=768, layers=12, heads=12, ffn_hidden=3072, vocab=50304,
                      max_seq_len=1024, tie_embeddings=True),
    "llama-tiny": dict(family="llama", hidden=64, layers=4, heads=4, kv_heads=2, ffn_hidden=192, vocab=512,
                       max_seq_len=128),
    "moe-tiny": dict(family="moe", hidden=64, layers=4, heads=4, kv_heads=2, vocab=512, max_seq_len=128,
                     num_experts=8, topk=2, moe_ffn_hidden=96, shared_experts=1, first_dense_layers=1,
                     ffn_hidden=192),
    "deepseek-tiny": dict(family="deepseek_v3", hidden=64, layers=3, heads=4, vocab=512, ffn_hidden=192,
                          num_experts=8, topk=2, moe_ffn_hidden=32, shared_experts=1, first_dense_layers=1,
                          q_lora_rank=32, kv_lora_rank=16, qk_nope_head_dim=16, qk_rope_head_dim=8,
                          v_head_dim=16, max_seq_len=128),
}
DEFAULT_MODEL = "llama3-8b"


# Well-known sizes of the other catalog families, kept as their public config.json contents
# (profiles/hf_presets.json) and read by the same family readers as a user's config.
_HF_PRESETS = Path(__file__).with_name("hf_presets.json")


@lru_cache(maxsize=1)
def hf_presets() -> dict[str, dict]:
    return json.loads(_HF_PRESETS.read_text())


def preset(name: str) -> ModelSpec:
    key = name.lower()
    if key in hf_presets():
        cfg = hf_presets()[key]
        fields = READERS[cfg["model_type"]](HFReader(cfg, _HF_PRESETS))
        return ModelSpec(**dict(fields, name=key, source=f"preset:{key}"))
    if key not in PRESETS:
        raise InputError(f"model: unknown preset '{name}'; presets: {', '.join(list(PRESETS) + list(hf_presets()))} "
                         "(or give a config.json path or a factory pkg.mod:fn)")
    return ModelSpec(name=key, source=f"preset:{key}", **PRESETS[key])


def resolve_model(name: str, input_shape: list[int] | None = None, input_dtype: str = "int64") -> ModelSpec:
    """A preset name, a path to a config.json (or a folder holding one), ``hf:PATH`` (capture
    the transformers module of that config as itself), or ``pkg.mod:fn``."""
    force_hf = name.startswith(HF_PREFIX)
    path = Path(name[len(HF_PREFIX):] if force_hf else name)
    if path.is_dir() and (path / "config.json").is_file():
        path = path / "config.json"
    if force_hf or path.suffix == ".json" or path.is_file():
        return from_hf_config(path, force_hf, input_shape, input_dtype)
    if ":" in name:
        # a float input of rank >= 4 (images [b, c, h, w], video) has no token axis: one position per
        # sample (rank 3 [b, s, features] keeps s); never the channel count
        per_sample = input_dtype != "int64" and len(input_shape or []) >= 4
        try:
            return ModelSpec(family="custom", name=name.split(":")[-1], factory=name, input_shape=input_shape,
                             input_dtype=input_dtype, source=f"factory:{name}", sample_tokens=int(per_sample),
                             sample_unit="samples" if per_sample else "tokens")
        except ValidationError as exc:
            raise InputError(f"model: {first_error(exc)}") from None
    return _token_model(preset(name), input_shape, input_dtype)


def _token_model(spec: ModelSpec, input_shape: list[int] | None, input_dtype: str) -> ModelSpec:
    """``spec`` of a catalog architecture (a preset, a config.json autopar reads): it takes token ids shaped by the
    micro-batch and --seq-len, so an example input given for it would be silently ignored: refused instead."""
    if input_shape or input_dtype != "int64":
        flag = "--input-shape" if input_shape else "--input-dtype"
        raise InputError(f"{flag}: {spec.name} takes token ids (micro-batch x --seq-len); fix: leave it out (it "
                         "describes a factory's or --hf transformers module's example input)")
    return spec


# ----- Hugging Face config.json ------------------------------------------------------
SUPPORTED_MODEL_TYPES = tuple(READERS)
HF_PREFIX = "hf:"  # ``hf:PATH`` (the CLI's --hf): capture the transformers module even for catalog types


def from_hf_config(path: str | Path, force_hf: bool = False, input_shape: list[int] | None = None,
                   input_dtype: str = "int64") -> ModelSpec:
    """A catalog ``ModelSpec`` for the families in ``hf_families.READERS``; any other
    ``model_type`` (or ``force_hf``) gives a spec that builds the transformers module itself."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"model: config file {path} does not exist")
    try:
        cfg = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise InputError(f"model: {path} is not valid JSON (line {exc.lineno}: {exc.msg})") from None
    if not isinstance(cfg, dict):
        raise InputError(f"model: {path} must hold a JSON object")
    name = cfg.get("_name_or_path") or path.parent.name or str(cfg.get("model_type"))
    text = text_config(cfg)
    mtype = text.get("model_type")
    if force_hf or mtype not in READERS:
        from autopar.profiles.hf_spec import hf_spec  # needs transformers only when used

        return hf_spec(cfg, path, name, input_shape, input_dtype)
    fields = READERS[mtype](HFReader(text, path))
    fields.update(name=name, source=f"config:{path}")
    impl = cfg.get("attn_implementation") or cfg.get("_attn_implementation")
    if impl:
        fields["attention"] = "eager" if impl == "eager" else "sdpa"
    try:
        spec = ModelSpec(**fields)
    except ValidationError as exc:
        raise InputError(f"model: {path}: {first_error(exc)}") from None
    return _token_model(spec, input_shape, input_dtype)
