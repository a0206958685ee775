"""Parameter counts of every preset against closed forms, GPT training FLOPs from the graph
against Megatron-LM's formula, and a CPU forward/backward smoke test of the tiny presets."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml

from autopar.core.model_spec import ModelSpec
from autopar.profiles.graph import capture
from autopar.profiles.intake import PRESETS, preset
from autopar.profiles.layer_stats import summarize
from autopar.profiles.models import build_model

CALIBRATION = Path(__file__).resolve().parents[2] / "shared" / "validation" / "published_calibration.yaml"


def gpt_params(s: ModelSpec) -> int:
    """Per layer: attention 4h^2 + 4h (q, k, v, o with biases), MLP 2hf + f + h, two LayerNorms
    4h -> 4h^2 + 2hf + f + 9h (= 12h^2 + 13h for f = 4h). Plus token embedding V*h (and an
    output matrix V*h unless tied), learned positions s_max*h, final LayerNorm 2h."""
    h, f = s.hidden, s.ffn_hidden
    per_layer = 4 * h * h + 2 * h * f + f + 9 * h
    return s.layers * per_layer + s.vocab * h * (1 if s.tie_embeddings else 2) + s.max_seq_len * h + 2 * h


def gqa_attention_params(s: ModelSpec) -> int:
    """q and o: h * a*hd each; k and v: h * kv*hd each; biases on q, k, v when qkv_bias."""
    q, kv = s.heads * s.head_dim, s.kv_heads * s.head_dim
    return 2 * s.hidden * q + 2 * s.hidden * kv + ((q + 2 * kv) if s.qkv_bias else 0)


def mla_attention_params(s: ModelSpec) -> int:
    """MLA (DeepSeek-V2/V3): q = h*rq + rq (q_norm) + rq * a*(dn+dr) (or h * a*(dn+dr) without
    a q rank); kv = h*(rkv + dr) + rkv (kv_norm) + rkv * a*(dn+dv); o = a*dv * h."""
    h, a = s.hidden, s.heads
    qk = s.qk_nope_head_dim + s.qk_rope_head_dim
    q = h * s.q_lora_rank + s.q_lora_rank + s.q_lora_rank * a * qk if s.q_lora_rank else h * a * qk
    kv = h * (s.kv_lora_rank + s.qk_rope_head_dim) + s.kv_lora_rank + s.kv_lora_rank * a * (
        s.qk_nope_head_dim + s.v_head_dim)
    return q + kv + a * s.v_head_dim * h


def ffn_params(s: ModelSpec, index: int) -> int:
    """Dense SwiGLU 3hf; MoE layer: routed 3*E*h*f_e + router E*h + shared 3*h*f_s (+ its sigmoid
    gate h, Qwen2-MoE)."""
    h = s.hidden
    if not s.is_moe_layer(index):
        return 3 * h * s.ffn_hidden
    gate = h if s.shared_expert_gate and s.shared_width else 0
    return 3 * s.num_experts * h * s.moe_ffn_hidden + s.num_experts * h + 3 * h * s.shared_width + gate


def decoder_params(s: ModelSpec) -> int:
    """llama: l*(2h^2 + 2*h*kv*hd + 3*h*f + 2h) + 2*V*h + h (untied); moe / deepseek_v3 swap the
    attention and FFN terms per layer as above; two RMSNorms 2h per layer, final norm h."""
    attention = mla_attention_params(s) if s.family == "deepseek_v3" else gqa_attention_params(s)
    layers = sum(attention + ffn_params(s, i) + 2 * s.hidden for i in range(s.layers))
    return layers + s.vocab * s.hidden * (1 if s.tie_embeddings else 2) + s.hidden


def closed_form(s: ModelSpec) -> int:
    return gpt_params(s) if s.family == "gpt" else decoder_params(s)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_params_match_closed_form(name):
    spec = preset(name)
    model = build_model(spec, "meta")
    assert sum(p.numel() for p in model.parameters()) == closed_form(spec)


def test_published_totals():
    """The closed forms reproduce the published sizes (sanity check of the formulas)."""
    assert closed_form(preset("llama3-8b")) == 8_030_261_248
    assert closed_form(preset("llama3-70b")) == 70_553_706_496
    assert closed_form(preset("mixtral-8x7b")) == 46_702_792_704
    assert round(closed_form(preset("deepseek-v3")) / 1e9) == 671
    assert round(closed_form(preset("gpt3-175b")) / 1e9, 1) == 174.6


def _gpt_runs():
    runs = yaml.safe_load(CALIBRATION.read_text())["runs"]
    wanted = ("narayanan21_table1_1.7B", "narayanan21_table1_18.4B", "korthikanti22_175B_seqpar_selective")
    return [r for r in runs if r["id"] in wanted]


@pytest.mark.skipif(not CALIBRATION.is_file(), reason="shared/validation not present")
@pytest.mark.parametrize("run", _gpt_runs() if CALIBRATION.is_file() else [], ids=lambda r: r["model"]["name"])
def test_gpt_training_flops_match_megatron(run):
    """Narayanan et al. SC21 eq. 3 without recompute: 72*B*s*l*h^2*(1 + s/(6h) + V/(12*l*h))."""
    m = run["model"]
    spec = ModelSpec(family="gpt", hidden=m["hidden"], layers=m["layers"], heads=m["heads"],
                     ffn_hidden=m["ffn_hidden"], vocab=m["vocab"], max_seq_len=m["seq_len"],
                     tie_embeddings=True, dropout=0.1, attention="eager")
    s, h, l, v = m["seq_len"], m["hidden"], m["layers"], m["vocab"]
    batch = run["parallel"]["global_batch"]
    stats = summarize(capture(spec, s, 1, "fp16"))
    graph = stats.train_flops_per_token * batch * s
    megatron = 72 * batch * s * l * h * h * (1 + s / (6 * h) + v / (12 * l * h))
    assert graph == pytest.approx(megatron, rel=0.005)


@pytest.mark.parametrize("name", ["gpt-tiny", "llama-tiny", "moe-tiny", "deepseek-tiny"])
def test_tiny_presets_train_step_on_cpu(name):
    spec = preset(name)
    torch.manual_seed(0)
    model = build_model(spec, "cpu")
    model.init_weights(seed=0)
    tokens = torch.randint(0, spec.vocab, (2, 16))
    logits = model(tokens)
    assert logits.shape == (2, 16, spec.vocab)
    loss = F.cross_entropy(logits.flatten(0, 1).float(), tokens.flatten())
    loss.backward()
    assert torch.isfinite(loss)
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
