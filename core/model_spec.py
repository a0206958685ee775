"""``ModelSpec``: an architecture family and its configuration values.

One spec describes every built-in architecture; fields that a family does not use
keep their defaults. ``family`` picks the ``nn.Module`` code in
``autopar.profiles.models``:

- ``gpt``: learned positions, LayerNorm, GeLU 4h MLP, multi-head attention (GPT-2/3, Megatron).
- ``llama``: RMSNorm, RoPE, SwiGLU MLP, grouped-query attention (Llama, Mistral, Qwen2).
- ``moe``: Llama-style attention with top-k routed experts; optional shared experts,
  fine-grained experts and first dense layers (Mixtral, Qwen2-MoE, DeepSeek-MoE).
- ``deepseek_v3``: ``moe`` with multi-head latent attention (MLA).
- ``custom``: any ``nn.Module`` factory ``pkg.mod:fn``, or (``hf_config`` set) a Hugging Face
  transformers module built from its ``config.json`` and captured as itself.

The structural fields below (norm kind and placement, parallel blocks, q/k norms, partial
rotary, sliding-window layers, gated activations, soft-capping, MoE layer spacing) default to
the Llama layout; ``autopar.profiles.hf_families`` sets them from each family's config.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from autopar.core.rope_math import cos_sin_factor, mla_softmax_factor

Family = Literal["gpt", "llama", "moe", "deepseek_v3", "custom"]
# auto: LayerNorm for gpt, RMSNorm otherwise; layernorm_nobias: weight only (Cohere);
# nonparametric: no weight, no bias (OLMo-1)
NormKind = Literal["auto", "rmsnorm", "layernorm", "layernorm_nobias", "nonparametric"]
# pre_norm: x + attn(n1(x)); x + mlp(n2(x))           (Llama, GPT-2)
# parallel: x + attn(n1(x)) + mlp(n1(x))             (Cohere, Falcon-7B, GPT-J)
# parallel_two_norms: x + attn(n1(x)) + mlp(n2(x))   (GPT-NeoX, Falcon-40B/180B)
# sandwich: x + n3(attn(n1(x))); x + n4(mlp(n2(x)))  (Gemma 2/3)
# post_norm: x + n1(attn(x)); x + n2(mlp(x))         (OLMo-2)
BlockLayout = Literal["pre_norm", "parallel", "parallel_two_norms", "sandwich", "post_norm"]
# head: RMSNorm over head_dim, one weight shared by heads (Qwen3, Gemma3); per_head: a weight per
# head (Cohere); full: one norm over all heads' width (OLMo-2, OLMoE)
QKNorm = Literal["none", "head", "per_head", "full"]
# swiglu: w2(silu(w1 x) * w3 x); geglu: gelu-tanh gate (Gemma); gelu / relu: plain two-matrix MLP
MLPKind = Literal["auto", "swiglu", "geglu", "gelu", "relu"]
# RoPE frequency scalings built (transformers ``modeling_rope_utils.ROPE_INIT_FUNCTIONS``): default = plain RoPE;
# dynamic (NTK) only rescales past max_position_embeddings, which training never reaches (seq_len <= max_seq_len),
# so it trains as plain RoPE. longrope (frequencies chosen by each batch's length) is not built.
RopeType = Literal["default", "linear", "dynamic", "llama3", "yarn"]


class RopeScaling(BaseModel):
    """A config's ``rope_scaling`` / ``rope_parameters`` with transformers' defaults filled in
    (``modeling_rope_utils``); ``profiles.models.rope`` turns it into frequencies."""
    model_config = ConfigDict(extra="forbid")

    rope_type: RopeType = "default"
    factor: float = Field(1.0, gt=0.0, description="context extension factor (linear, llama3, yarn)")
    original_max_position_embeddings: int = Field(0, ge=0, description="pre-training context (llama3, yarn)")
    low_freq_factor: float = Field(1.0, gt=0.0, description="llama3: wavelengths above orig/low are scaled")
    high_freq_factor: float = Field(4.0, gt=0.0, description="llama3: wavelengths below orig/high are kept")
    beta_fast: float = Field(32.0, description="yarn: rotations bounding the extrapolated dimensions")
    beta_slow: float = Field(1.0, description="yarn: rotations bounding the interpolated dimensions")
    mscale: float = Field(0.0, ge=0.0, description="yarn: numerator mscale of the attention factor (0 = unset)")
    mscale_all_dim: float = Field(0.0, ge=0.0, description="yarn: denominator mscale (0 = unset)")
    attention_factor: float | None = Field(None, gt=0.0, description="yarn: factor on cos / sin; None = derived")
    truncate: bool = Field(True, description="yarn: round the correction range to whole dimensions")

    @model_validator(mode="after")
    def _check(self) -> "RopeScaling":
        if self.rope_type in ("llama3", "yarn") and not self.original_max_position_embeddings:
            raise ValueError(f"rope_type={self.rope_type} needs original_max_position_embeddings")
        if self.rope_type == "llama3" and self.high_freq_factor <= self.low_freq_factor:
            raise ValueError("llama3 RoPE needs high_freq_factor > low_freq_factor")
        return self

    @property
    def cos_sin_factor(self) -> float:
        """YaRN's factor on cos and sin (``core.rope_math.cos_sin_factor``); 1 for other types."""
        return cos_sin_factor(self)

    @property
    def mla_softmax_factor(self) -> float:
        """DeepSeek MLA's extra softmax scale under YaRN (``core.rope_math.mla_softmax_factor``)."""
        return mla_softmax_factor(self)


class ModelSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    family: Family
    name: str = "model"
    hidden: int = Field(0, ge=0, description="model width h")
    layers: int = Field(0, ge=0, description="number of transformer blocks l")
    heads: int = Field(0, ge=0, description="attention heads a")
    kv_heads: int = Field(0, ge=0, description="key/value heads (GQA); 0 means = heads")
    head_dim: int = Field(0, ge=0, description="per-head width; 0 means hidden // heads")
    ffn_hidden: int = Field(0, ge=0, description="dense MLP inner width")
    vocab: int = Field(0, ge=0)
    max_seq_len: int = Field(2048, ge=1)
    tie_embeddings: bool = False
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling = Field(default_factory=RopeScaling, description="RoPE frequency scaling (llama3, yarn)")
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    qkv_bias: bool = Field(False, description="biases on q/k/v projections (Qwen2); gpt always has biases")
    attention: Literal["eager", "sdpa"] = Field(
        "sdpa", description="eager = explicit softmax(QK^T)V saving O(s^2) (Megatron's analysis); sdpa = fused kernel")
    # --- block structure (see the Literal types above) ---
    norm_kind: NormKind = "auto"
    block_layout: BlockLayout = "pre_norm"
    qk_norm: QKNorm = "none"
    mlp_kind: MLPKind = Field("auto", description="auto: gelu for gpt, swiglu otherwise")
    mlp_bias: bool = Field(False, description="biases on the MLP linears (gpt always has them)")
    glu_clamp: float = Field(0.0, ge=0.0, description="gated MLP's input clamp (GPT-OSS swiglu_limit: gate <= c, "
                             "up in [-c, c]); 0 = none. Priced under --runtime megatron; autopar's models do not clamp")
    attn_out_bias: bool = Field(False, description="bias on the attention output projection")
    fused_qkv: bool = Field(False, description="one q/k/v linear (GPT-NeoX, Falcon, Phi-3): same FLOPs and params")
    rotary_fraction: float = Field(1.0, gt=0.0, le=1.0, description="share of head_dim that RoPE rotates")
    sliding_window: int = Field(0, ge=0, description="local attention window in tokens; 0 = none")
    layer_attention: list[Literal["full", "sliding"]] = Field(
        default_factory=list, description="per-layer attention kind; empty = all full (all sliding if a window)")
    embed_scale: float = Field(1.0, gt=0.0, description="embedding output multiplier (Gemma: sqrt(hidden))")
    logit_softcap: float = Field(0.0, ge=0.0, description="final logits = c*tanh(logits/c); 0 = off")
    attn_softcap: float = Field(0.0, ge=0.0, description="attention scores soft-cap (eager attention only)")
    # --- mixture of experts ---
    num_experts: int = Field(0, ge=0, description="routed experts per MoE layer; 0 = dense")
    topk: int = Field(0, ge=0, description="experts per token")
    moe_ffn_hidden: int = Field(0, ge=0, description="inner width of one routed expert")
    shared_experts: int = Field(0, ge=0, description="always-on experts of width moe_ffn_hidden")
    shared_ffn_hidden: int = Field(0, ge=0, description="shared expert inner width; 0 = shared_experts*moe_ffn_hidden")
    first_dense_layers: int = Field(0, ge=0, description="leading layers with a dense MLP")
    moe_layer_step: int = Field(1, ge=1, description="after first_dense_layers, layer i is MoE when (i+1) % step == 0")
    shared_expert_gate: bool = Field(False, description="sigmoid gate Linear(h, 1) on the shared expert (Qwen2-MoE)")
    # --- multi-head latent attention (DeepSeek-V2/V3) ---
    q_lora_rank: int = Field(0, ge=0)
    kv_lora_rank: int = Field(0, ge=0)
    qk_nope_head_dim: int = Field(0, ge=0)
    qk_rope_head_dim: int = Field(0, ge=0)
    v_head_dim: int = Field(0, ge=0)
    # --- user module factory ---
    factory: str | None = Field(None, description="pkg.mod:fn returning an nn.Module (family=custom)")
    input_shape: list[int] | None = Field(None, description="example input shape for a custom module")
    input_dtype: Literal["int64", "float32", "bfloat16", "float16"] = "int64"
    sample_tokens: int = Field(0, ge=0, description="sequence length of one non-token sample (ViT: patches per "
                               "image); 0 = input_shape[-1]")
    sample_unit: str = Field("tokens", description="what one sequence position is: tokens, patches, frames, ...")
    source: str = Field("", description="where the spec came from: preset name, config path or factory")
    # --- a transformers module captured as itself (family=custom) ---
    hf_config: dict[str, Any] | None = Field(
        None, description="config.json of a Hugging Face model built with transformers from_config (family=custom)")
    hf_parallel: list[Literal["tp", "pp"]] = Field(
        default_factory=list, description="what the emitted program can split this transformers module by beyond "
        "dp/zero/recompute: tp (its own tensor-parallel plan), pp (its decoder layer list); set at intake")
    hf_why_not: dict[str, str] = Field(default_factory=dict, description="knob -> why the module cannot be split so")

    @model_validator(mode="after")
    def _check(self) -> "ModelSpec":
        if self.family == "custom":
            if not self.factory and self.hf_config is None:
                raise ValueError("family=custom needs factory='pkg.mod:fn' or hf_config")
            return self
        for field in ("hidden", "layers", "heads", "vocab"):
            if getattr(self, field) <= 0:
                raise ValueError(f"{field} must be a positive integer for family={self.family}")
        if self.kv_heads == 0:
            self.kv_heads = self.heads
        if self.head_dim == 0:
            if self.hidden % self.heads:
                raise ValueError(f"hidden={self.hidden} is not divisible by heads={self.heads}; set head_dim")
            self.head_dim = self.hidden // self.heads
        if self.heads % self.kv_heads:
            raise ValueError(f"heads={self.heads} is not divisible by kv_heads={self.kv_heads}")
        if self.is_moe:
            if not (0 < self.topk <= self.num_experts):
                raise ValueError(f"topk={self.topk} must be in 1..num_experts={self.num_experts}")
            if self.moe_ffn_hidden <= 0:
                raise ValueError("moe_ffn_hidden must be positive for a MoE model")
            if self.first_dense_layers > self.layers:
                raise ValueError("first_dense_layers exceeds layers")
        if self.family in ("gpt", "llama") and self.ffn_hidden <= 0:
            raise ValueError("ffn_hidden must be positive")
        if self.family == "deepseek_v3" and (self.kv_lora_rank <= 0 or self.qk_rope_head_dim <= 0):
            raise ValueError("deepseek_v3 needs kv_lora_rank and qk_rope_head_dim")
        if self.layer_attention and len(self.layer_attention) != self.layers:
            raise ValueError(f"layer_attention has {len(self.layer_attention)} entries for layers={self.layers}")
        if "sliding" in self.layer_attention and not self.sliding_window:
            raise ValueError("layer_attention names sliding layers but sliding_window is 0")
        return self

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    @property
    def shared_width(self) -> int:
        """Inner width of the fused shared-expert MLP (0 when there is none)."""
        if self.shared_ffn_hidden:
            return self.shared_ffn_hidden
        return self.shared_experts * self.moe_ffn_hidden

    @property
    def moe_layers(self) -> int:
        return sum(self.is_moe_layer(i) for i in range(self.layers))

    def is_moe_layer(self, index: int) -> bool:
        return self.is_moe and index >= self.first_dense_layers and (index + 1) % self.moe_layer_step == 0

    def is_sliding_layer(self, index: int) -> bool:
        """Layer ``index`` attends within ``sliding_window`` tokens (Mistral, Gemma 2/3 local layers)."""
        if not self.sliding_window:
            return False
        return not self.layer_attention or self.layer_attention[index] == "sliding"

    @property
    def rope_attention_factor(self) -> float:
        """YaRN's factor on RoPE's cos / sin (1: plain RoPE); Megatron-Core fuses RoPE only at 1."""
        return cos_sin_factor(self.rope_scaling)

    @property
    def attention_head_dim(self) -> int:
        """The width of q.k per head an attention kernel runs: MLA's nope + rope parts, else ``head_dim``."""
        return (self.qk_nope_head_dim + self.qk_rope_head_dim) or self.head_dim

    @property
    def resolved_norm(self) -> str:
        if self.norm_kind != "auto":
            return self.norm_kind
        return "layernorm" if self.family == "gpt" else "rmsnorm"

    @property
    def resolved_mlp(self) -> str:
        if self.mlp_kind != "auto":
            return self.mlp_kind
        return "gelu" if self.family == "gpt" else "swiglu"

    def short(self) -> str:
        if self.family == "custom":
            what = self.factory or f"transformers {self.hf_config.get('model_type')}"
            return f"{self.name} (custom {what})"
        moe = f", {self.num_experts} experts top-{self.topk}" if self.is_moe else ""
        return f"{self.name} ({self.family}, l={self.layers}, h={self.hidden}, a={self.heads}{moe})"
