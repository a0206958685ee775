"""``ModelSpec``: an architecture family and its configuration values.

One spec describes every built-in architecture; fields that a family does not use
keep their defaults. ``family`` picks the ``nn.Module`` code in
``autopar.profiles.models``:

- ``gpt``: learned positions, LayerNorm, GeLU 4h MLP, multi-head attention (GPT-2/3, Megatron).
- ``llama``: RMSNorm, RoPE, SwiGLU MLP, grouped-query attention (Llama, Mistral, Qwen2).
- ``moe``: Llama-style attention with top-k routed experts; optional shared experts,
  fine-grained experts and first dense layers (Mixtral, Qwen2-MoE, DeepSeek-MoE).
- ``deepseek_v3``: ``moe`` with multi-head latent attention (MLA).
- ``custom``: any ``nn.Module`` factory ``pkg.mod:fn``.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

Family = Literal["gpt", "llama", "moe", "deepseek_v3", "custom"]


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
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    qkv_bias: bool = Field(False, description="biases on q/k/v projections (Qwen2); gpt always has biases")
    attention: Literal["eager", "sdpa"] = Field(
        "sdpa", description="eager = explicit softmax(QK^T)V saving O(s^2) (Megatron's analysis); sdpa = fused kernel")
    # --- mixture of experts ---
    num_experts: int = Field(0, ge=0, description="routed experts per MoE layer; 0 = dense")
    topk: int = Field(0, ge=0, description="experts per token")
    moe_ffn_hidden: int = Field(0, ge=0, description="inner width of one routed expert")
    shared_experts: int = Field(0, ge=0, description="always-on experts of width moe_ffn_hidden")
    shared_ffn_hidden: int = Field(0, ge=0, description="shared expert inner width; 0 = shared_experts*moe_ffn_hidden")
    first_dense_layers: int = Field(0, ge=0, description="leading layers with a dense MLP")
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
    source: str = Field("", description="where the spec came from: preset name, config path or factory")

    @model_validator(mode="after")
    def _check(self) -> "ModelSpec":
        if self.family == "custom":
            if not self.factory:
                raise ValueError("family=custom needs factory='pkg.mod:fn'")
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
        return self

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    @property
    def moe_layers(self) -> int:
        return self.layers - self.first_dense_layers if self.is_moe else 0

    @property
    def shared_width(self) -> int:
        """Inner width of the fused shared-expert MLP (0 when there is none)."""
        if self.shared_ffn_hidden:
            return self.shared_ffn_hidden
        return self.shared_experts * self.moe_ffn_hidden

    def is_moe_layer(self, index: int) -> bool:
        return self.is_moe and index >= self.first_dense_layers

    def short(self) -> str:
        if self.family == "custom":
            return f"{self.name} (custom {self.factory})"
        moe = f", {self.num_experts} experts top-{self.topk}" if self.is_moe else ""
        return f"{self.name} ({self.family}, l={self.layers}, h={self.hidden}, a={self.heads}{moe})"
