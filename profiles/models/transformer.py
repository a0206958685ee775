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
from autopar.core.rope_math import mla_softmax_factor
from autopar.profiles.models.layers import MLP, Attention, MLAttention, MoE, SwiGLU, make_norm, softcap
from autopar.profiles.models.rope import rope_tables


class Block(nn.Module):
    """One decoder block in the layout ``spec.block_layout`` (see ``core.model_spec.BlockLayout``).

    ``attention_norm`` / ``ffn_norm`` are the two pre-norms (the post-norms for ``post_norm``;
    ``ffn_norm`` is None for the one-norm ``parallel`` layout); ``sandwich`` adds
    ``post_attention_norm`` / ``post_ffn_norm`` on the branch outputs (Gemma 2/3)."""

    def __init__(self, spec: ModelSpec, index: int):
        super().__init__()
        self.index, self.layout = index, spec.block_layout
        self.attention_norm = _norm(spec)
        self.attention = _attention(spec, index)
        self.ffn_norm = None if self.layout == "parallel" else _norm(spec)
        if self.layout == "sandwich":
            self.post_attention_norm, self.post_ffn_norm = _norm(spec), _norm(spec)
        self.feed_forward = _feed_forward(spec, index)

    def forward(self, x: torch.Tensor, cos=None, sin=None) -> torch.Tensor:
        if self.layout == "parallel":
            y = self.attention_norm(x)
            return x + self.attention(y, cos, sin) + self.feed_forward(y)
        if self.layout == "parallel_two_norms":
            return x + self.attention(self.attention_norm(x), cos, sin) + self.feed_forward(self.ffn_norm(x))
        if self.layout == "post_norm":
            x = x + self.attention_norm(self.attention(x, cos, sin))
            return x + self.ffn_norm(self.feed_forward(x))
        a = self.attention(self.attention_norm(x), cos, sin)
        x = x + (self.post_attention_norm(a) if self.layout == "sandwich" else a)
        f = self.feed_forward(self.ffn_norm(x))
        return x + (self.post_ffn_norm(f) if self.layout == "sandwich" else f)


class Transformer(nn.Module):
    """``layer_ids``: build only these blocks, under their global indices (graph capture at
    reduced depth, ``profiles.depth``); None builds all ``spec.layers``."""

    def __init__(self, spec: ModelSpec, layer_ids: list[int] | None = None):
        super().__init__()
        self.spec = spec
        self.tok_embeddings = nn.Embedding(spec.vocab, spec.hidden)
        self.pos_embeddings = nn.Embedding(spec.max_seq_len, spec.hidden) if spec.family == "gpt" else None
        self.emb_dropout = nn.Dropout(spec.dropout)
        ids = range(spec.layers) if layer_ids is None else layer_ids
        self.layers = nn.ModuleDict({str(i): Block(spec, i) for i in ids})
        self.norm = _norm(spec)
        self.output = nn.Linear(spec.hidden, spec.vocab, bias=False)
        if spec.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        # Buffers sized to max_seq_len and sliced to the batch's length, so context
        # parallelism can shard them along the sequence like the activations.
        self.register_buffer("pos_ids", torch.arange(spec.max_seq_len), persistent=False)
        if spec.family != "gpt":
            cos, sin = rope_tables(_rope_dim(spec), spec.max_seq_len, spec.rope_theta, spec.rope_scaling)
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)
        else:
            self.rope_cos = self.rope_sin = None

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [b, s] -> logits [b, s, vocab]; a pipeline stage without embedding or
        output takes or returns hidden states [b, s, h] instead."""
        if self.tok_embeddings is not None:
            h = self.tok_embeddings(tokens)
            if self.spec.embed_scale != 1.0:  # Gemma: sqrt(hidden), in the activation dtype
                h = h * torch.tensor(self.spec.embed_scale, dtype=h.dtype)
            if self.pos_embeddings is not None:
                h = h + self.pos_embeddings(self.pos_ids[: tokens.shape[1]])
            h = self.emb_dropout(h)
        else:
            h = tokens
        for layer in self.layers.values():
            h = layer(h, self.rope_cos, self.rope_sin)
        if self.norm is not None:
            h = self.norm(h)
        if self.output is None:
            return h
        return softcap(self.output(h), self.spec.logit_softcap)

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
            spec = self.spec
            cos, sin = rope_tables(_rope_dim(spec), spec.max_seq_len, spec.rope_theta, spec.rope_scaling, device)
            self.rope_cos, self.rope_sin = cos, sin
        for module in self.modules():
            # a module holding every expert gets 0..E-1 (after ``to_empty`` the buffer is garbage);
            # expert parallelism keeps a subset and sets its own ids
            if hasattr(module, "expert_ids") and module.expert_ids.numel() == module.w1.shape[0]:
                module.expert_ids = torch.arange(module.w1.shape[0], device=device)


def _rope_dim(spec: ModelSpec) -> int:
    """Rotated width per head: the decoupled RoPE key of MLA, else the rotary share of head_dim
    rounded down to an even width (GPT-NeoX ``rotary_pct``, Phi-3 ``partial_rotary_factor``)."""
    if spec.family == "deepseek_v3":
        return spec.qk_rope_head_dim
    return int(spec.head_dim * spec.rotary_fraction) // 2 * 2


def _norm(spec: ModelSpec) -> nn.Module:
    return make_norm(spec.resolved_norm, spec.hidden, spec.norm_eps)


def _attention(spec: ModelSpec, index: int) -> nn.Module:
    eager = spec.attention == "eager"
    if spec.family == "deepseek_v3":
        return MLAttention(spec.hidden, spec.heads, spec.q_lora_rank, spec.kv_lora_rank, spec.qk_nope_head_dim,
                           spec.qk_rope_head_dim, spec.v_head_dim, spec.norm_eps, eager,
                           mla_softmax_factor(spec.rope_scaling))
    gpt = spec.family == "gpt"
    norm = "rmsnorm" if spec.qk_norm == "head" or spec.resolved_norm == "nonparametric" else spec.resolved_norm
    return Attention(spec.hidden, spec.heads, spec.kv_heads, spec.head_dim, bias=gpt or spec.qkv_bias,
                     dropout=spec.dropout if gpt else 0.0, rope=not gpt, eager=eager,
                     out_bias=gpt or spec.attn_out_bias, qk_norm=spec.qk_norm, norm_kind=norm, eps=spec.norm_eps,
                     window=spec.sliding_window if spec.is_sliding_layer(index) else 0, cap=spec.attn_softcap)


def _feed_forward(spec: ModelSpec, index: int) -> nn.Module:
    if spec.is_moe_layer(index):
        return MoE(spec.hidden, spec.moe_ffn_hidden, spec.num_experts, spec.topk, spec.shared_width,
                   spec.shared_expert_gate)
    kind, bias = spec.resolved_mlp, spec.family == "gpt" or spec.mlp_bias
    if kind in ("gelu", "relu"):
        return MLP(spec.hidden, spec.ffn_hidden, bias=bias, dropout=spec.dropout if spec.family == "gpt" else 0.0,
                   act=kind)
    return SwiGLU(spec.hidden, spec.ffn_hidden, bias=bias, act=kind)
