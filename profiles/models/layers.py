"""Building blocks of the built-in architectures.

Written so that (a) head counts are read from tensor shapes (``view(b, s, -1, hd)``),
which lets DTensor tensor parallel shard ``wq/wk/wv/wo`` without touching this code,
(b) the eager attention path saves exactly the tensors Megatron's analysis counts
(Korthikanti et al. 2022, Sec. 4.1: Q, K, softmax output, dropout mask, V, ...), and
(c) MoE routing is contained in two leaf modules (``TopKRouter``, ``GroupedExperts``)
so torch.fx never traces data-dependent control flow.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    """Root-mean-square norm (Zhang & Sennrich 2019), as in Llama."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        out = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return out.type_as(x) * self.weight


def make_norm(kind: str, dim, eps: float) -> nn.Module:
    """A norm of ``kind`` (``ModelSpec.resolved_norm``): RMSNorm, LayerNorm with bias, LayerNorm
    with a weight only (Cohere) or without parameters (OLMo-1)."""
    if kind == "rmsnorm":
        return RMSNorm(dim, eps)
    if kind == "layernorm":
        return nn.LayerNorm(dim, eps=eps)
    if kind == "layernorm_nobias":
        return nn.LayerNorm(dim, eps=eps, bias=False)
    return nn.LayerNorm(dim, eps=eps, elementwise_affine=False)


class PerHeadNorm(nn.Module):
    """A norm over head_dim with its own weight per head, weight [heads, head_dim] (Cohere's q/k
    LayerNorm without bias; RMS when ``kind`` is rmsnorm)."""

    def __init__(self, heads: int, head_dim: int, kind: str, eps: float):
        super().__init__()
        self.kind, self.eps = kind, eps
        self.weight = nn.Parameter(torch.ones(heads, head_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        if self.kind == "rmsnorm":
            out = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        else:
            out = F.layer_norm(xf, (x.shape[-1],), eps=self.eps)
        return out.type_as(x) * self.weight


def softcap(x: torch.Tensor, cap: float) -> torch.Tensor:
    """cap * tanh(x / cap) (Gemma 2 logit soft-capping); identity when cap is 0."""
    return cap * torch.tanh(x / cap) if cap else x


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (x[2i], x[2i+1]) of x [b, s, n, d] by the position angle (tables:
    ``profiles.models.rope.rope_tables``); with tables
    narrower than d/2 only the first 2*width features rotate (partial rotary, GPT-NeoX)."""
    rot = 2 * cos.shape[-1]
    if rot < x.shape[-1]:
        return torch.cat([apply_rope(x[..., :rot], cos, sin), x[..., rot:]], dim=-1)
    s = x.shape[1]
    c = cos[:s].view(1, s, 1, -1)
    si = sin[:s].view(1, s, 1, -1)
    x1, x2 = x.float().unflatten(-1, (-1, 2)).unbind(-1)
    out = torch.stack((x1 * c - x2 * si, x1 * si + x2 * c), dim=-1).flatten(-2)
    return out.type_as(x)


def causal_attention(q, k, v, dropout: float, training: bool, eager: bool, window: int = 0,
                     cap: float = 0.0, scale: float | None = None) -> torch.Tensor:
    """Attention core on [b, n, s, d] tensors with a causal mask.

    eager: explicit QK^T, softmax, dropout, x V (what Megatron's memory analysis
    assumes: 5*a*s^2*b bytes saved per layer). Otherwise PyTorch SDPA (flash / memory
    efficient kernels save O(s) instead of O(s^2)). ``window``: each query sees the last
    ``window`` keys (sliding-window layers; SDPA takes it as a boolean mask and still computes
    all s^2 scores, so the FLOPs are those of full causal attention). ``cap``: score
    soft-capping (Gemma 2), eager path only, as in transformers' sdpa path. ``scale``: the score
    scale, None = 1/sqrt(d) (DeepSeek's MLA under YaRN scales it further).
    """
    s = q.shape[2]
    if window and s > window:
        return _windowed(q, k, v, dropout, training, eager, window, cap, scale)
    if k.shape[1] != q.shape[1]:  # grouped-query attention: share each kv head
        rep = q.shape[1] // k.shape[1]
        k = k.repeat_interleave(rep, dim=1)
        v = v.repeat_interleave(rep, dim=1)
    if not eager:
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout if training else 0.0, is_causal=True,
                                              **_scale_kw(scale))
    mask = torch.ones(s, s, dtype=torch.bool, device=q.device).triu(1)
    return _eager(q, k, v, mask, dropout, training, cap, scale)


def _eager(q, k, v, blocked, dropout: float, training: bool, cap: float, scale: float | None = None) -> torch.Tensor:
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    scores = softcap(torch.matmul(q, k.transpose(-2, -1)) * scale, cap)
    scores = scores.masked_fill(blocked, float("-inf"))
    probs = F.dropout(torch.softmax(scores, dim=-1), p=dropout, training=training)
    return torch.matmul(probs, v)


def _windowed(q, k, v, dropout, training, eager, window: int, cap: float, scale: float | None) -> torch.Tensor:
    """Sliding-window causal attention: key j is visible to query i when i - window < j <= i."""
    s = q.shape[2]
    if k.shape[1] != q.shape[1]:
        rep = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    ones = torch.ones(s, s, dtype=torch.bool, device=q.device)
    blocked = ones.triu(1) | ones.tril(-window)
    if eager:
        return _eager(q, k, v, blocked, dropout, training, cap, scale)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=~blocked, dropout_p=dropout if training else 0.0,
                                          **_scale_kw(scale))


def _scale_kw(scale: float | None) -> dict:
    """SDPA's ``scale`` only where it is not the default, so the default call (and its capture) stays as it was."""
    return {} if scale is None else {"scale": scale}


class Attention(nn.Module):
    """Multi-head / grouped-query attention; RoPE when ``rope`` is set (Llama), learned positions otherwise (GPT)."""

    def __init__(self, hidden: int, heads: int, kv_heads: int, head_dim: int, bias: bool,
                 dropout: float, rope: bool, eager: bool, out_bias: bool | None = None, qk_norm: str = "none",
                 norm_kind: str = "rmsnorm", eps: float = 1e-5, window: int = 0, cap: float = 0.0):
        super().__init__()
        self.head_dim, self.dropout, self.rope, self.eager = head_dim, dropout, rope, eager
        self.window, self.cap, self.qk_norm = window, cap, qk_norm
        self.wq = nn.Linear(hidden, heads * head_dim, bias=bias)
        self.wk = nn.Linear(hidden, kv_heads * head_dim, bias=bias)
        self.wv = nn.Linear(hidden, kv_heads * head_dim, bias=bias)
        self.wo = nn.Linear(heads * head_dim, hidden, bias=bias if out_bias is None else out_bias)
        self.resid_dropout = nn.Dropout(dropout)
        if qk_norm != "none":  # q_norm / k_norm: Qwen3, Gemma 3 (head), Cohere (per_head), OLMo-2 (full)
            if qk_norm == "per_head":
                self.q_norm = PerHeadNorm(heads, head_dim, norm_kind, eps)
                self.k_norm = PerHeadNorm(kv_heads, head_dim, norm_kind, eps)
            else:
                dims = (head_dim, head_dim) if qk_norm == "head" else (heads * head_dim, kv_heads * head_dim)
                self.q_norm, self.k_norm = make_norm(norm_kind, dims[0], eps), make_norm(norm_kind, dims[1], eps)

    def forward(self, x: torch.Tensor, cos=None, sin=None) -> torch.Tensor:
        b, s, _ = x.shape
        q, k = self.wq(x), self.wk(x)
        if self.qk_norm == "full":
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.view(b, s, -1, self.head_dim), k.view(b, s, -1, self.head_dim)
        v = self.wv(x).view(b, s, -1, self.head_dim)
        if self.qk_norm in ("head", "per_head"):
            q, k = self.q_norm(q), self.k_norm(k)
        if self.rope:
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        out = causal_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                               self.dropout, self.training, self.eager, self.window, self.cap)
        out = out.transpose(1, 2).reshape(b, s, -1)
        return self.resid_dropout(self.wo(out))


class MLAttention(nn.Module):
    """Multi-head latent attention (DeepSeek-V2/V3, arXiv:2405.04434 Sec. 2.1).

    Queries pass through a low-rank bottleneck (q_lora_rank) when set; keys and values
    are rebuilt from a shared kv_lora_rank latent plus a decoupled RoPE key of
    qk_rope_head_dim shared by all heads.
    """

    def __init__(self, hidden: int, heads: int, q_lora_rank: int, kv_lora_rank: int,
                 qk_nope_head_dim: int, qk_rope_head_dim: int, v_head_dim: int, eps: float, eager: bool,
                 softmax_factor: float = 1.0):
        super().__init__()
        self.nope, self.rope_dim, self.v_dim, self.eager = qk_nope_head_dim, qk_rope_head_dim, v_head_dim, eager
        self.kv_lora_rank = kv_lora_rank
        qk_dim = qk_nope_head_dim + qk_rope_head_dim
        # None keeps SDPA's own 1/sqrt(d); YaRN's mscale^2 (core.rope_math.mla_softmax_factor) multiplies it
        self.scale = None if softmax_factor == 1.0 else softmax_factor / math.sqrt(qk_dim)
        if q_lora_rank:
            self.wq_a = nn.Linear(hidden, q_lora_rank, bias=False)
            self.q_norm = RMSNorm(q_lora_rank, eps)
            self.wq_b = nn.Linear(q_lora_rank, heads * qk_dim, bias=False)
        else:
            self.wq = nn.Linear(hidden, heads * qk_dim, bias=False)
        self.wkv_a = nn.Linear(hidden, kv_lora_rank + qk_rope_head_dim, bias=False)
        self.kv_norm = RMSNorm(kv_lora_rank, eps)
        self.wkv_b = nn.Linear(kv_lora_rank, heads * (qk_nope_head_dim + v_head_dim), bias=False)
        self.wo = nn.Linear(heads * v_head_dim, hidden, bias=False)

    def forward(self, x: torch.Tensor, cos=None, sin=None) -> torch.Tensor:
        b, s, _ = x.shape
        q = self.wq_b(self.q_norm(self.wq_a(x))) if hasattr(self, "wq_a") else self.wq(x)
        q = q.view(b, s, -1, self.nope + self.rope_dim)
        q_nope, q_pe = q.split([self.nope, self.rope_dim], dim=-1)
        kv = self.wkv_a(x)
        latent, k_pe = kv.split([self.kv_lora_rank, self.rope_dim], dim=-1)
        k_pe = apply_rope(k_pe.unsqueeze(2), cos, sin)
        kv = self.wkv_b(self.kv_norm(latent)).view(b, s, -1, self.nope + self.v_dim)
        k_nope, v = kv.split([self.nope, self.v_dim], dim=-1)
        n = kv.shape[2]
        q = torch.cat([q_nope, apply_rope(q_pe, cos, sin)], dim=-1)
        k = torch.cat([k_nope, k_pe.expand(b, s, n, self.rope_dim)], dim=-1)
        out = causal_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), 0.0, self.training, self.eager,
                               scale=self.scale)
        return self.wo(out.transpose(1, 2).reshape(b, s, -1))


class MLP(nn.Module):
    """GPT MLP: Linear(h, f) -> GeLU (or ReLU) -> Linear(f, h) -> dropout."""

    def __init__(self, hidden: int, ffn: int, bias: bool = True, dropout: float = 0.0, act: str = "gelu"):
        super().__init__()
        self.act = act
        self.w1 = nn.Linear(hidden, ffn, bias=bias)
        self.w2 = nn.Linear(ffn, hidden, bias=bias)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.w1(x)
        return self.dropout(self.w2(F.relu(h) if self.act == "relu" else F.gelu(h)))


class SwiGLU(nn.Module):
    """Llama MLP: w2(silu(w1 x) * w3 x) (Shazeer 2020); ``act="geglu"``: tanh-GeLU gate (Gemma)."""

    def __init__(self, hidden: int, ffn: int, bias: bool = False, act: str = "swiglu"):
        super().__init__()
        self.act = act
        self.w1 = nn.Linear(hidden, ffn, bias=bias)
        self.w3 = nn.Linear(hidden, ffn, bias=bias)
        self.w2 = nn.Linear(ffn, hidden, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g = self.w1(x)
        g = F.gelu(g, approximate="tanh") if self.act == "geglu" else F.silu(g)
        return self.w2(g * self.w3(x))


class TopKRouter(nn.Module):
    """Token-choice top-k router: softmax over expert logits, keep k, renormalise.

    forward(x[T, h]) -> (topk_idx[T, k] int64, topk_weight[T, k]). Routing traces hook
    this module (``autopar.profiles.routing``).
    """

    def __init__(self, hidden: int, num_experts: int, topk: int):
        super().__init__()
        self.topk = topk
        self.gate = nn.Linear(hidden, num_experts, bias=False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        probs = torch.softmax(self.gate(x).float(), dim=-1)
        weight, idx = torch.topk(probs, self.topk, dim=-1)
        weight = weight / weight.sum(dim=-1, keepdim=True)
        return idx, weight.type_as(x)


def expert_counts(ids: torch.Tensor, n: int) -> torch.Tensor:
    """Occurrences of each of ``0..n-1`` in ``ids``, on their device without a host sync
    (``torch.bincount`` on CUDA first reads the largest id to the host to size its output)."""
    return torch.zeros(n, dtype=torch.long, device=ids.device).scatter_add_(0, ids, torch.ones_like(ids))


def padded_layout(sorted_ids: torch.Tensor, dev_counts: torch.Tensor, counts: list[int],
                  bucket: int) -> tuple[torch.Tensor, list[int]]:
    """Rows sorted by expert (``sorted_ids``), each expert's rows rounded up to a multiple of ``bucket``:
    (the padded position of every row, the padded counts). Device ops only (``counts`` is the host copy
    of ``dev_counts``), so padding adds no host sync."""
    pads = (dev_counts + bucket - 1) // bucket * bucket - dev_counts
    pads_before = torch.cumsum(pads, 0) - pads
    pos = torch.arange(sorted_ids.numel(), device=sorted_ids.device) + pads_before.index_select(0, sorted_ids)
    return pos, [-(-c // bucket) * bucket for c in counts]


def scatter_rows(pos: torch.Tensor, values: torch.Tensor, size: int) -> torch.Tensor:
    """``values`` placed at rows ``pos`` of ``size`` zero rows (differentiable)."""
    return values.new_zeros((size,) + tuple(values.shape[1:])).index_copy(0, pos, values)


class WeightedSum(torch.autograd.Function):
    """Each token's expert outputs weighted by their gate values and summed on the token's row (a tensor shaped
    like ``x``). Written out because ``index_add``'s backward keeps its source, the weighted rows (rows x hidden),
    for its shape alone (PyTorch derivatives.yaml, ``index_add``: ``grad.index_select(dim, index).expand_as(source)``),
    which the captured expert terms do not count (``profiles.graph`` prices w2_out, the gate weights and the
    indices); this keeps the two factors the weighting's backward reads anyway and the index."""

    @staticmethod
    def forward(ctx, rows, w, token, x):
        ctx.save_for_backward(rows, w, token)
        return torch.zeros_like(x).index_add_(0, token, rows * w.unsqueeze(-1))

    @staticmethod
    def backward(ctx, grad):
        rows, w, token = ctx.saved_tensors
        g = grad.index_select(0, token)
        grad_w = (g * rows).sum(-1).to(w.dtype)   # first, so the rows' gradient can take g's storage
        return g.mul_(w.unsqueeze(-1)).to(rows.dtype), grad_w, None, None


class GroupedExperts(nn.Module):
    """E SwiGLU experts stored as stacked weights w1/w3 [E, h, f], w2 [E, f, h].

    ``expert_ids`` lists the global expert ids held here (all of them until expert
    parallelism keeps a subset on each rank); ``forward`` runs the tokens assigned to
    each held expert, weighted by the router's gate values.

    One host sync per call: the token copies are sorted by expert once and the per-expert
    row counts read with one ``.tolist()`` (a per-expert ``nonzero`` would block the host
    once per expert). The experts read their weights through ``unbind``, whose backward
    stacks the E weight gradients once; indexing ``w1[e]`` instead makes every expert's
    backward write a zero-filled gradient of the whole stack and add it into the others
    (E x the stack's bytes per weight and layer).

    On CUDA each expert's rows are padded to a multiple of ``row_bucket`` (pad rows carry a zero
    gate weight): the expert GEMMs' row counts follow the routing, and cuBLAS chooses a kernel for
    every new GEMM shape on the host, 0.2-5 ms each (``benchmarks/gpu_trace.py`` on an H100, moe-gpu
    mbs 1: 163 such calls, 91 ms of the profiled step, all on shapes that step saw first; repeated
    shapes ran at 37 us median). Rounded up, a layer's row counts take at most
    ``tokens*k/row_bucket + 1`` values, whose kernels stay chosen from step to step.
    """

    row_bucket: dict[str, int] = {"cuda": 128}  # device type -> rows per expert rounded up to (128: a GEMM tile)

    def __init__(self, hidden: int, ffn: int, num_experts: int):
        super().__init__()
        self.w1 = nn.Parameter(torch.empty(num_experts, hidden, ffn))
        self.w3 = nn.Parameter(torch.empty(num_experts, hidden, ffn))
        self.w2 = nn.Parameter(torch.empty(num_experts, ffn, hidden))
        self.register_buffer("expert_ids", torch.arange(num_experts), persistent=False)

    def expert_weights(self) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """(w1, w3, w2) of each held expert, as views of the stacked weights."""
        return list(zip(self.w1.unbind(0), self.w3.unbind(0), self.w2.unbind(0)))

    def run_sorted(self, rows: torch.Tensor, counts: list[int]) -> torch.Tensor:
        """Rows sorted by held expert, ``counts[e]`` of them for expert ``e``, each through its
        expert. Experts with no rows are skipped (``unbind``'s backward gives them zero gradients);
        with no rows at all the first runs on the empty batch, so the weights still get gradients."""
        run = [e for e, c in enumerate(counts) if c] or [0]
        parts, weights = rows.split(counts), self.expert_weights()
        outs = [(F.silu(parts[e] @ weights[e][0]) * (parts[e] @ weights[e][1])) @ weights[e][2] for e in run]
        return torch.cat(outs)

    def forward(self, x: torch.Tensor, idx: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        k, flat = idx.shape[1], idx.reshape(-1)
        order = torch.argsort(flat, stable=True)  # token copies grouped by expert, token order within
        dev_counts = expert_counts(flat, self.w1.shape[0])
        counts = dev_counts.tolist()  # the layer's one host sync
        token, gate = order // k, weight.reshape(-1).index_select(0, order)
        bucket = self.row_bucket.get(x.device.type, 1)
        if bucket > 1:  # pad rows: token 0 with a zero gate weight, so they add exact zeros
            pos, counts = padded_layout(flat.index_select(0, order), dev_counts, counts, bucket)
            token, gate = scatter_rows(pos, token, sum(counts)), scatter_rows(pos, gate, sum(counts))
        return WeightedSum.apply(self.run_sorted(x.index_select(0, token), counts), gate, token, x)


class MoE(nn.Module):
    """Routed experts plus optional always-on shared experts (Mixtral, Qwen2-MoE, DeepSeek)."""

    def __init__(self, hidden: int, ffn: int, num_experts: int, topk: int, shared_ffn: int,
                 shared_gate: bool = False):
        super().__init__()
        self.router = TopKRouter(hidden, num_experts, topk)
        self.experts = GroupedExperts(hidden, ffn, num_experts)
        self.shared_experts = SwiGLU(hidden, shared_ffn) if shared_ffn else None
        # Qwen2-MoE scales the shared expert by sigmoid(Linear(h, 1) x)
        self.shared_gate = nn.Linear(hidden, 1, bias=False) if shared_ffn and shared_gate else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, h = x.shape
        xt = x.reshape(-1, h)
        idx, weight = self.router(xt)
        out = self.experts(xt, idx, weight)
        if self.shared_experts is not None:
            shared = self.shared_experts(xt)
            if self.shared_gate is not None:
                shared = torch.sigmoid(self.shared_gate(xt)) * shared
            out = out + shared
        return out.reshape(b, s, h)
