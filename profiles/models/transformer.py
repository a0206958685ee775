"""The decoder-only ``Transformer`` shared by every built-in family.

Layer names follow torchtitan (``tok_embeddings``, ``layers``, ``attention``,
``feed_forward``, ``norm``, ``output``) so parallelisation plans read the same. Layers
live in a ``ModuleDict`` keyed by the global index: a pipeline stage deletes the
layers it does not own and keeps stable names for checkpoints.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from autopar.core.model_spec import ModelSpec
from autopar.profiles.models.layers import MLP, Attention, MLAttention, MoE, RMSNorm, SwiGLU, rope_tables


class Block(nn.Module):
    def __init__(self, spec: ModelSpec, index: int):
        super().__init__()
        self.index = index
        gpt = spec.family == "gpt"
        self.attention_norm = _norm(spec)
        self.attention = _attention(spec)
        self.ffn_norm = _norm(spec)
        if spec.is_moe_layer(index):
            self.feed_forward = MoE(spec.hidden, spec.moe_ffn_hidden, spec.num_experts, spec.topk, spec.shared_width)
        elif gpt:
            self.feed_forward = MLP(spec.hidden, spec.ffn_hidden, bias=True, dropout=spec.dropout)
        else:
            self.feed_forward = SwiGLU(spec.hidden, spec.ffn_hidden)

    def forward(self, x: torch.Tensor, cos=None, sin=None) -> torch.Tensor:
        x = x + self.attention(self.attention_norm(x), cos, sin)
        return x + self.feed_forward(self.ffn_norm(x))


class Transformer(nn.Module):
    def __init__(self, spec: ModelSpec):
        super().__init__()
        self.spec = spec
        self.tok_embeddings = nn.Embedding(spec.vocab, spec.hidden)
        self.pos_embeddings = nn.Embedding(spec.max_seq_len, spec.hidden) if spec.family == "gpt" else None
        self.emb_dropout = nn.Dropout(spec.dropout)
        self.layers = nn.ModuleDict({str(i): Block(spec, i) for i in range(spec.layers)})
        self.norm = _norm(spec)
        self.output = nn.Linear(spec.hidden, spec.vocab, bias=False)
        if spec.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        # Buffers sized to max_seq_len and sliced to the batch's length, so context
        # parallelism can shard them along the sequence like the activations.
        self.register_buffer("pos_ids", torch.arange(spec.max_seq_len), persistent=False)
        if spec.family != "gpt":
            cos, sin = rope_tables(_rope_dim(spec), spec.max_seq_len, spec.rope_theta)
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)
        else:
            self.rope_cos = self.rope_sin = None

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [b, s] -> logits [b, s, vocab]; a pipeline stage without embedding or
        output takes or returns hidden states [b, s, h] instead."""
        if self.tok_embeddings is not None:
            h = self.tok_embeddings(tokens)
            if self.pos_embeddings is not None:
                h = h + self.pos_embeddings(self.pos_ids[: tokens.shape[1]])
            h = self.emb_dropout(h)
        else:
            h = tokens
        for layer in self.layers.values():
            h = layer(h, self.rope_cos, self.rope_sin)
        if self.norm is not None:
            h = self.norm(h)
        return self.output(h) if self.output is not None else h

    @torch.no_grad()
    def init_weights(self, seed: int = 0) -> None:
        """Deterministic initialisation in module order (GPT-2 style: N(0, 0.02), output
        projections scaled by 1/sqrt(2l)); also rebuilds the non-persistent buffers after
        ``to_empty``. Same seed, same weights, whatever the device."""
        for name, value in self.initial_values(seed):
            self.get_parameter(name).copy_(value)
        self.reset_buffers()

    @torch.no_grad()
    def initial_values(self, seed: int = 0):
        """Yield ``(name, full initial tensor)`` per parameter, in ``init_weights`` order.

        Needs only shapes, so it also runs on a meta-device model: sharded programs
        (``autopar.codegen``) take their local shard of each full tensor and so start
        from exactly the weights of a single-process ``init_weights(seed)``."""
        gen = torch.Generator().manual_seed(seed)
        std = 0.02
        for name, p in self.named_parameters():
            if p.ndim == 1 or name.endswith(".bias"):
                fill = 1.0 if ("norm" in name and name.endswith("weight")) else 0.0
                yield name, torch.full(p.shape, fill)
                continue
            scale = std / math.sqrt(2 * self.spec.layers) if name.endswith(("wo.weight", "w2.weight", ".w2")) else std
            yield name, torch.randn(p.shape, generator=gen) * scale

    @torch.no_grad()
    def reset_buffers(self) -> None:
        device = self.pos_ids.device
        self.pos_ids = torch.arange(self.spec.max_seq_len, device=device)
        if self.rope_cos is not None:
            cos, sin = rope_tables(_rope_dim(self.spec), self.spec.max_seq_len, self.spec.rope_theta, device)
            self.rope_cos, self.rope_sin = cos, sin
        for module in self.modules():
            # a module holding every expert gets 0..E-1 (after ``to_empty`` the buffer is garbage);
            # expert parallelism keeps a subset and sets its own ids
            if hasattr(module, "expert_ids") and module.expert_ids.numel() == module.w1.shape[0]:
                module.expert_ids = torch.arange(module.w1.shape[0], device=device)


def _rope_dim(spec: ModelSpec) -> int:
    return spec.qk_rope_head_dim if spec.family == "deepseek_v3" else spec.head_dim


def _norm(spec: ModelSpec) -> nn.Module:
    if spec.family == "gpt":
        return nn.LayerNorm(spec.hidden, eps=spec.norm_eps)
    return RMSNorm(spec.hidden, spec.norm_eps)


def _attention(spec: ModelSpec) -> nn.Module:
    eager = spec.attention == "eager"
    if spec.family == "deepseek_v3":
        return MLAttention(spec.hidden, spec.heads, spec.q_lora_rank, spec.kv_lora_rank, spec.qk_nope_head_dim,
                           spec.qk_rope_head_dim, spec.v_head_dim, spec.norm_eps, eager)
    gpt = spec.family == "gpt"
    return Attention(spec.hidden, spec.heads, spec.kv_heads, spec.head_dim, bias=gpt or spec.qkv_bias,
                     dropout=spec.dropout if gpt else 0.0, rope=not gpt, eager=eager, out_bias=gpt)
