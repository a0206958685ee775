"""Hugging Face ``config.json`` -> ``ModelSpec`` fields, one small reader per ``model_type``.

Each reader states the family's real structure where it changes cost or memory (parallel
attention/MLP blocks, partial rotary, sliding-window layers, extra norms, shared experts,
dense layers before MoE layers, tied embeddings, soft-capping). Defaults follow the
transformers ``*Config`` classes, so a config that leaves a field out reads as transformers
builds it. Reading needs no transformers install; the tests compare every family's parameter
count with the transformers module built from the same config.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import get_args

from pydantic import ValidationError

from autopar.core.model_spec import RopeScaling, RopeType
from autopar.errors import InputError, first_error


class HFReader:
    """Reads config fields with one-line errors naming the missing field."""

    def __init__(self, cfg: dict, path: Path):
        self.cfg, self.path = cfg, path

    def req(self, *keys: str):
        """The first of ``keys`` present (aliases such as ``n_layer`` / ``num_hidden_layers``)."""
        key = next((k for k in keys if self.cfg.get(k) is not None), None)
        if key is None:
            raise InputError(f"model: {self.path}: missing field '{keys[0]}' "
                             f"(needed for model_type={self.cfg.get('model_type')}); add it to the config")
        val = self.cfg[key]
        if isinstance(val, bool) or not isinstance(val, (int, float)):
            raise InputError(f"model: {self.path}: field '{key}' must be a number, got {val!r}; fix the config")
        return val

    def opt(self, key: str, default):
        val = self.cfg.get(key)
        return default if val is None else val

    def flag(self, key: str, default: bool) -> bool:
        return bool(self.opt(key, default))


# ----- shared pieces ---------------------------------------------------------------------------
def _llama_fields(r: HFReader) -> dict:
    """Llama layout: RMSNorm pre-norms, RoPE, SwiGLU, GQA; ``attention_bias`` covers q, k, v and o."""
    bias = r.flag("attention_bias", False)
    return dict(
        family="llama", hidden=r.req("hidden_size"), layers=r.req("num_hidden_layers"),
        heads=r.req("num_attention_heads"), kv_heads=r.opt("num_key_value_heads", 0),
        head_dim=r.opt("head_dim", 0), ffn_hidden=r.opt("intermediate_size", 0), vocab=r.req("vocab_size"),
        max_seq_len=r.opt("max_position_embeddings", 4096), tie_embeddings=r.flag("tie_word_embeddings", False),
        norm_eps=r.opt("rms_norm_eps", 1e-5), rope_theta=_rope_theta(r), qkv_bias=bias, attn_out_bias=bias,
        mlp_bias=r.flag("mlp_bias", False), rope_scaling=rope_scaling(r),
    )


def _rope_theta(r: HFReader) -> float:
    return float(r.opt("rope_theta", _rope_params(r)[1].get("rope_theta", 10000.0)))


def _rope_params(r: HFReader) -> tuple[str, dict]:
    """(config key, RoPE parameters): ``rope_parameters`` (transformers 5) or ``rope_scaling`` (4.x);
    a per-layer-type nesting (``{"full_attention": {...}, ...}``) only where every layer type agrees."""
    key = "rope_parameters" if isinstance(r.cfg.get("rope_parameters"), dict) else "rope_scaling"
    params = r.cfg.get(key) or {}
    if not isinstance(params, dict):
        raise InputError(f"model: {r.path}: '{key}' must be an object; fix the config")
    nested = [v for v in params.values() if isinstance(v, dict)]
    if nested and any(v != nested[0] for v in nested):
        raise InputError(f"model: {r.path}: {key} differs by layer type; per-layer RoPE is not built by autopar "
                         "(fix: --hf to capture the transformers module itself)")
    return key, nested[0] if nested else params


_ROPE_FIELDS = tuple(f for f in RopeScaling.model_fields if f != "rope_type")   # the config keys RopeScaling reads
_ROPE_TYPES = ", ".join(get_args(RopeType))
# keys transformers' RoPE init functions read without a default (``modeling_rope_utils``)
_ROPE_REQUIRED = {"linear": ("factor",), "dynamic": ("factor",),
                  "llama3": ("factor", "low_freq_factor", "high_freq_factor")}


def rope_scaling(r: HFReader) -> RopeScaling:
    """The config's ``rope_parameters`` (transformers 5) or ``rope_scaling`` (4.x), read with
    transformers' defaults (``modeling_rope_utils``: ``type`` for ``rope_type``; llama3 / yarn
    ``original_max_position_embeddings`` = ``max_position_embeddings``; yarn ``factor`` = their
    ratio, ``beta_fast`` / ``beta_slow`` 32 / 1 where unset or 0). A type not built here is an error."""
    key, params = _rope_params(r)
    kind = params.get("rope_type") or params.get("type") or "default"
    if kind not in get_args(RopeType):
        raise InputError(f"model: {r.path}: {key}.rope_type={kind!r} is not built by autopar (supported: "
                         f"{_ROPE_TYPES}); fix: --hf to capture the transformers module itself")
    fields = {k: params[k] for k in _ROPE_FIELDS if params.get(k) is not None}
    missing = [k for k in _ROPE_REQUIRED.get(kind, ()) if k not in fields]
    if missing:
        raise InputError(f"model: {r.path}: {key} of rope_type={kind} needs '{missing[0]}'; add it to the config")
    if kind in ("llama3", "yarn"):
        fields.setdefault("original_max_position_embeddings", r.opt("max_position_embeddings", 4096))
    if kind == "yarn":
        fields.setdefault("factor", r.opt("max_position_embeddings", 4096) / fields["original_max_position_embeddings"])
        # transformers' yarn treats 0 like unset: RopeScaling's defaults
        fields.update({b: params.get(b) or RopeScaling.model_fields[b].default for b in ("beta_fast", "beta_slow")})
    try:
        return RopeScaling(rope_type=kind, **fields)
    except ValidationError as exc:
        raise InputError(f"model: {r.path}: {key}: {first_error(exc)}") from None


def _layer_kinds(r: HFReader, layers: int, sliding: Callable[[int], bool]) -> list[str]:
    """Per-layer attention kind: the config's ``layer_types`` when given, else ``sliding(i)``."""
    given = r.cfg.get("layer_types")
    if isinstance(given, list) and len(given) == layers:
        return ["sliding" if str(t).startswith("sliding") else "full" for t in given]
    return ["sliding" if sliding(i) else "full" for i in range(layers)]


def _window(f: dict, r: HFReader, sliding: Callable[[int], bool], key: str = "sliding_window") -> dict:
    """Sets sliding_window and layer_attention when the config has a window."""
    window = r.opt(key, 0) or 0
    if window:
        kinds = _layer_kinds(r, f["layers"], sliding)
        if "sliding" in kinds:
            f.update(sliding_window=int(window), layer_attention=kinds)
    return f


# ----- families --------------------------------------------------------------------------------
def llama(r: HFReader) -> dict:
    return _llama_fields(r)


def mistral(r: HFReader) -> dict:
    """Mistral: Llama plus a sliding window on every layer (when ``sliding_window`` is set)."""
    return _window(_llama_fields(r), r, lambda i: True)


def qwen2(r: HFReader) -> dict:
    """Qwen2: q/k/v biases (no o bias); sliding window only with ``use_sliding_window`` from
    ``max_window_layers`` on."""
    f = _llama_fields(r)
    f.update(qkv_bias=True, attn_out_bias=False)
    if r.flag("use_sliding_window", False):
        start = r.opt("max_window_layers", 0)
        _window(f, r, lambda i: i >= start)
    return f


def qwen3(r: HFReader) -> dict:
    """Qwen3: per-head RMSNorm on q and k, explicit head_dim."""
    f = _llama_fields(r)
    f.update(qk_norm="head")
    if r.flag("use_sliding_window", False):
        start = r.opt("max_window_layers", 0)
        _window(f, r, lambda i: i >= start)
    return f


def _moe_step(r: HFReader) -> int:
    if r.cfg.get("mlp_only_layers"):
        raise InputError(f"model: {r.path}: mlp_only_layers is not supported; use decoder_sparse_step")
    return r.opt("decoder_sparse_step", 1)


def qwen3_moe(r: HFReader) -> dict:
    f = qwen3(r)
    f.update(family="moe", num_experts=r.req("num_experts"), topk=r.req("num_experts_per_tok"),
             moe_ffn_hidden=r.req("moe_intermediate_size"), moe_layer_step=_moe_step(r))
    return f


def qwen2_moe(r: HFReader) -> dict:
    """Qwen2-MoE: routed experts plus one sigmoid-gated shared expert."""
    f = qwen2(r)
    f.update(family="moe", num_experts=r.req("num_experts"), topk=r.req("num_experts_per_tok"),
             moe_ffn_hidden=r.req("moe_intermediate_size"), moe_layer_step=_moe_step(r),
             shared_ffn_hidden=r.opt("shared_expert_intermediate_size", 0), shared_expert_gate=True)
    return f


def mixtral(r: HFReader) -> dict:
    f = mistral(r)
    f.update(family="moe", num_experts=r.req("num_local_experts"), topk=r.req("num_experts_per_tok"),
             moe_ffn_hidden=r.req("intermediate_size"), ffn_hidden=0, glu_clamp=float(r.opt("swiglu_limit", 0.0)))
    return f


def gemma(r: HFReader) -> dict:
    """Gemma: tanh-GeLU gated MLP, embeddings scaled by sqrt(hidden), tied output, head_dim 256."""
    f = _llama_fields(r)
    f.update(mlp_kind="geglu", embed_scale=math.sqrt(f["hidden"]), tie_embeddings=r.flag("tie_word_embeddings", True),
             norm_eps=r.opt("rms_norm_eps", 1e-6))
    return f


def gemma2(r: HFReader) -> dict:
    """Gemma 2: sandwich norms, local (even) / global (odd) layers, attention and logit soft-capping."""
    f = gemma(r)
    f.update(block_layout="sandwich", attn_softcap=r.opt("attn_logit_softcapping", 0.0) or 0.0,
             logit_softcap=r.opt("final_logit_softcapping", 0.0) or 0.0)
    return _window(f, r, lambda i: bool((i + 1) % 2))


def gemma3(r: HFReader) -> dict:
    """Gemma 3 (text): sandwich norms, q/k norms, five local layers per global one."""
    f = gemma(r)
    pattern = r.opt("sliding_window_pattern", r.opt("_sliding_window_pattern", 6))
    if f["rope_scaling"].rope_type != "default":
        raise InputError(f"model: {r.path}: Gemma 3's rope_scaling applies to its global layers only (local ones: "
                         "rope_local_base_freq); per-layer RoPE is not built by autopar (fix: --hf)")
    f.update(block_layout="sandwich", qk_norm="head", attn_softcap=r.opt("attn_logit_softcapping", 0.0) or 0.0,
             logit_softcap=r.opt("final_logit_softcapping", 0.0) or 0.0)
    return _window(f, r, lambda i: bool((i + 1) % pattern))


def phi3(r: HFReader) -> dict:
    """Phi-3: fused qkv and gate/up projections, partial rotary, optional sliding window."""
    f = _llama_fields(r)
    f.update(fused_qkv=True, rotary_fraction=r.opt("partial_rotary_factor", 1.0))
    return _window(f, r, lambda i: True)


def olmo(r: HFReader) -> dict:
    """OLMo-1: LayerNorm without weight or bias."""
    f = _llama_fields(r)
    f.update(norm_kind="nonparametric")
    return f


def olmo2(r: HFReader) -> dict:
    """OLMo-2: norms after attention and MLP (not before), q/k RMSNorm over all heads."""
    f = _llama_fields(r)
    f.update(block_layout="post_norm", qk_norm="full")
    return f


def olmoe(r: HFReader) -> dict:
    f = _llama_fields(r)
    f.update(family="moe", qk_norm="full", num_experts=r.req("num_experts"), topk=r.req("num_experts_per_tok"),
             moe_ffn_hidden=r.req("intermediate_size"), ffn_hidden=0)
    return f


def granite(r: HFReader) -> dict:
    """Granite: Llama with scalar multipliers (embedding, residual, attention, logits): no
    change to parameters, a few elementwise FLOPs."""
    return _llama_fields(r)


def cohere(r: HFReader) -> dict:
    """Cohere (Command-R): one LayerNorm (weight only) feeding attention and MLP in parallel;
    optional per-head q/k norms; tied output."""
    f = _llama_fields(r)
    f.update(block_layout="parallel", norm_kind="layernorm_nobias", norm_eps=r.opt("layer_norm_eps", 1e-5),
             qk_norm="per_head" if r.flag("use_qk_norm", False) else "none",
             tie_embeddings=r.flag("tie_word_embeddings", True))
    return f


def starcoder2(r: HFReader) -> dict:
    """StarCoder2: LayerNorm, GeLU MLP, biases everywhere (``use_bias``), sliding window on every layer."""
    f = _llama_fields(r)
    bias = r.flag("use_bias", True)
    f.update(norm_kind="layernorm", mlp_kind="gelu", norm_eps=r.opt("norm_epsilon", 1e-5), qkv_bias=bias,
             attn_out_bias=bias, mlp_bias=bias, tie_embeddings=r.flag("tie_word_embeddings", True))
    return _window(f, r, lambda i: True)


def gpt_neox(r: HFReader) -> dict:
    """GPT-NeoX / Pythia: parallel attention and MLP with two LayerNorms, fused qkv with
    biases, partial rotary (``rotary_pct``), GeLU MLP, untied output."""
    f = _llama_fields(r)
    bias = r.flag("attention_bias", True)
    f.update(norm_kind="layernorm", mlp_kind="gelu", mlp_bias=True, qkv_bias=bias, attn_out_bias=bias,
             fused_qkv=True, norm_eps=r.opt("layer_norm_eps", 1e-5), kv_heads=0,
             rotary_fraction=r.opt("rotary_pct", (r.cfg.get("rope_parameters") or {}).get("partial_rotary_factor",
                                                                                          0.25)),
             block_layout="parallel_two_norms" if r.flag("use_parallel_residual", True) else "pre_norm")
    return f


def falcon(r: HFReader) -> dict:
    """Falcon: parallel attention/MLP (one LayerNorm, or two with the new decoder architecture),
    multi-query or grouped kv heads, GeLU MLP; ALiBi models are refused (not built here)."""
    if r.flag("alibi", False):
        raise InputError(f"model: {r.path}: Falcon with alibi=true is not in the catalog; use --hf")
    heads, bias, new_arch = r.req("num_attention_heads", "n_head"), r.flag("bias", False), r.flag(
        "new_decoder_architecture", False)
    kv = r.opt("num_kv_heads", heads) if new_arch else (1 if r.flag("multi_query", True) else heads)
    two = new_arch or r.opt("num_ln_in_parallel_attn", 1) == 2
    layout = ("parallel_two_norms" if two else "parallel") if r.flag("parallel_attn", True) else "pre_norm"
    h = r.req("hidden_size")
    return dict(family="llama", hidden=h, layers=r.req("num_hidden_layers", "n_layer"), heads=heads, kv_heads=kv,
                ffn_hidden=r.opt("ffn_hidden_size", 4 * h), vocab=r.req("vocab_size"),
                max_seq_len=r.opt("max_position_embeddings", 2048), tie_embeddings=r.flag("tie_word_embeddings", True),
                norm_eps=r.opt("layer_norm_epsilon", 1e-5), rope_theta=_rope_theta(r), rope_scaling=rope_scaling(r),
                qkv_bias=bias, attn_out_bias=bias, mlp_bias=bias, norm_kind="layernorm", mlp_kind="gelu",
                fused_qkv=True, block_layout=layout)


def gpt2(r: HFReader) -> dict:
    h = r.req("n_embd")
    return dict(family="gpt", hidden=h, layers=r.req("n_layer"), heads=r.req("n_head"),
                ffn_hidden=r.opt("n_inner", None) or 4 * h, vocab=r.req("vocab_size"),
                max_seq_len=r.opt("n_positions", 1024), tie_embeddings=r.flag("tie_word_embeddings", True),
                norm_eps=r.opt("layer_norm_epsilon", 1e-5), dropout=r.opt("resid_pdrop", 0.0))


def deepseek(r: HFReader) -> dict:
    """DeepSeek-V2/V3: multi-head latent attention, shared experts, dense first layers."""
    f = _llama_fields(r)
    f.update(family="deepseek_v3", kv_heads=0, head_dim=0, num_experts=r.req("n_routed_experts"),
             topk=r.req("num_experts_per_tok"), moe_ffn_hidden=r.req("moe_intermediate_size"),
             shared_experts=r.opt("n_shared_experts", 0), first_dense_layers=r.opt("first_k_dense_replace", 0),
             q_lora_rank=r.opt("q_lora_rank", 0) or 0, kv_lora_rank=r.req("kv_lora_rank"),
             qk_nope_head_dim=r.req("qk_nope_head_dim"), qk_rope_head_dim=r.req("qk_rope_head_dim"),
             v_head_dim=r.req("v_head_dim"), qkv_bias=False, attn_out_bias=False)
    return f


def llama4(r: HFReader) -> dict:
    """Llama 4 (text): MoE layers every ``interleave_moe_layer_step``, each with one shared
    expert of the routed width, dense layers of ``intermediate_size_mlp``. The chunked local
    attention of the RoPE layers is priced as full attention (sequences within one chunk)."""
    f = _llama_fields(r)
    f.update(family="moe", num_experts=r.req("num_local_experts"), topk=r.req("num_experts_per_tok"),
             moe_ffn_hidden=r.req("intermediate_size"), shared_ffn_hidden=r.req("intermediate_size"),
             ffn_hidden=r.opt("intermediate_size_mlp", 0), moe_layer_step=r.opt("interleave_moe_layer_step", 1))
    return f


READERS: dict[str, Callable[[HFReader], dict]] = {
    "llama": llama, "llama4": llama4, "llama4_text": llama4, "mistral": mistral, "mixtral": mixtral,
    "qwen2": qwen2, "qwen2_moe": qwen2_moe, "qwen3": qwen3, "qwen3_moe": qwen3_moe,
    "gemma": gemma, "gemma2": gemma2, "gemma3": gemma3, "gemma3_text": gemma3, "phi3": phi3,
    "olmo": olmo, "olmo2": olmo2, "olmoe": olmoe, "gpt2": gpt2, "gpt_neox": gpt_neox, "falcon": falcon,
    "starcoder2": starcoder2, "granite": granite, "cohere": cohere, "deepseek_v2": deepseek, "deepseek_v3": deepseek,
}
# Multimodal configs whose text model sits under ``text_config``: the catalog plans the text part.
TEXT_CONFIG_TYPES = ("llama4", "gemma3")


def text_config(cfg: dict) -> dict:
    """The text model's config of a multimodal wrapper (``text_config``), else ``cfg``."""
    if cfg.get("model_type") in TEXT_CONFIG_TYPES and isinstance(cfg.get("text_config"), dict):
        inner = dict(cfg["text_config"])
        inner.setdefault("model_type", cfg["model_type"] + "_text")
        return inner
    return cfg
