"""The model autopar builds rotates q and k as the checkpoint it names: each RoPE scaling of a
config (llama3, yarn, linear, dynamic) gives transformers' frequencies and cos / sin factor
(``modeling_rope_utils.ROPE_INIT_FUNCTIONS``), and a tiny Llama with llama3 or YaRN scaling gives
``LlamaForCausalLM``'s logits with the same weights. Plain RoPE tables are unchanged."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

from autopar.core.model_spec import RopeScaling
from autopar.errors import InputError
from autopar.profiles.hf_families import HFReader, rope_scaling
from autopar.profiles.intake import from_hf_config, preset
from autopar.profiles.models.rope import inv_freq, rope_tables

transformers = pytest.importorskip("transformers")
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS  # noqa: E402

# Public config.json RoPE fields (model_type, config, rotated width per head).
LLAMA31_8B = ("llama", dict(hidden_size=4096, num_attention_heads=32, head_dim=128, max_position_embeddings=131072,
                            rope_theta=500000.0, rope_scaling=dict(
                                factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                original_max_position_embeddings=8192, rope_type="llama3")), 128)
GPT_OSS_120B = ("gpt_oss", dict(hidden_size=2880, num_attention_heads=64, head_dim=64, max_position_embeddings=131072,
                                rope_theta=150000, rope_scaling=dict(beta_fast=32.0, beta_slow=1.0, factor=32.0,
                                                                     original_max_position_embeddings=4096,
                                                                     rope_type="yarn", truncate=False)), 64)
DEEPSEEK_V3 = ("deepseek_v3", dict(hidden_size=7168, num_attention_heads=128, qk_rope_head_dim=64,
                                   max_position_embeddings=163840, rope_theta=10000,
                                   rope_scaling=dict(beta_fast=32, beta_slow=1, factor=40, mscale=1.0,
                                                     mscale_all_dim=1.0, original_max_position_embeddings=4096,
                                                     type="yarn")), 64)
DEEPSEEK_V2_LITE = ("deepseek_v2", dict(hidden_size=2048, num_attention_heads=16, qk_rope_head_dim=64,
                                        max_position_embeddings=163840, rope_theta=10000,
                                        rope_scaling=dict(beta_fast=32, beta_slow=1, factor=40, mscale=0.707,
                                                          mscale_all_dim=0.707, original_max_position_embeddings=4096,
                                                          type="yarn")), 64)
QWEN3_YARN = ("qwen3", dict(hidden_size=4096, num_attention_heads=32, head_dim=128, max_position_embeddings=131072,
                            rope_theta=1000000, rope_scaling=dict(rope_type="yarn", factor=4.0,
                                                                  original_max_position_embeddings=32768)), 128)
LINEAR = ("llama", dict(hidden_size=2048, num_attention_heads=16, max_position_embeddings=8192, rope_theta=10000.0,
                        rope_scaling=dict(type="linear", factor=4.0)), 128)
YARN_GIVEN = ("llama", dict(hidden_size=1024, num_attention_heads=16, max_position_embeddings=16384,
                            rope_parameters=dict(rope_type="yarn", rope_theta=50000.0, factor=4.0, attention_factor=1.2,
                                                 beta_fast=16, beta_slow=2, original_max_position_embeddings=4096)),
              64)
YARN_RATIO = ("llama", dict(hidden_size=1024, num_attention_heads=8, max_position_embeddings=65536, rope_theta=10000.0,
                            rope_scaling=dict(rope_type="yarn", factor=None,
                                              original_max_position_embeddings=8192)), 128)
CASES = {"llama3.1-8b": LLAMA31_8B, "gpt-oss-120b": GPT_OSS_120B, "deepseek-v3": DEEPSEEK_V3,
         "deepseek-v2-lite": DEEPSEEK_V2_LITE, "qwen3-yarn": QWEN3_YARN, "linear": LINEAR, "yarn-given": YARN_GIVEN,
         "yarn-ratio": YARN_RATIO}


def _ours(cfg: dict, dim: int) -> tuple[torch.Tensor, float]:
    r = HFReader(copy.deepcopy(cfg), Path("config.json"))
    scaling = rope_scaling(r)
    theta = float(cfg.get("rope_theta") or cfg.get("rope_parameters", {}).get("rope_theta"))
    return inv_freq(dim, theta, scaling), scaling.cos_sin_factor


def _theirs(model_type: str, cfg: dict) -> tuple[torch.Tensor, float]:
    config = transformers.AutoConfig.for_model(model_type, **copy.deepcopy(cfg))
    return ROPE_INIT_FUNCTIONS[config.rope_parameters["rope_type"]](config, "cpu")


@pytest.mark.parametrize("name", CASES)
def test_frequencies_and_factor_match_transformers(name):
    model_type, cfg, dim = CASES[name]
    (ours, ours_factor), (theirs, their_factor) = _ours(cfg, dim), _theirs(model_type, cfg)
    assert ours.shape == theirs.shape
    torch.testing.assert_close(ours, theirs.float(), rtol=1e-6, atol=0)
    assert ours_factor == pytest.approx(their_factor, rel=1e-12)


def test_scalings_change_the_frequencies_they_should():
    """Not a copy of plain RoPE: llama3 keeps the fast frequencies and divides the slow ones by 8;
    GPT-OSS's YaRN puts 0.1 ln 32 + 1 on cos / sin."""
    ours, factor = _ours(LLAMA31_8B[1], 128)
    plain = inv_freq(128, 500000.0, RopeScaling())
    assert ours[0] == plain[0] and ours[-1] == pytest.approx(plain[-1] / 8)
    assert factor == 1.0 and _ours(GPT_OSS_120B[1], 64)[1] == pytest.approx(1.3466, abs=1e-4)


def test_dynamic_trains_as_plain_rope():
    """Dynamic NTK rescales only past max_position_embeddings (inference); within it, which is all
    that training runs (seq_len <= max_seq_len), transformers' frequencies are plain RoPE's."""
    cfg = dict(hidden_size=512, num_attention_heads=8, max_position_embeddings=4096, rope_theta=10000.0,
               rope_scaling=dict(rope_type="dynamic", factor=2.0))
    ours, factor = _ours(cfg, 64)
    theirs, their_factor = _theirs("llama", cfg)
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=0)
    assert torch.equal(ours, inv_freq(64, 10000.0, RopeScaling())) and factor == their_factor == 1.0


def test_plain_tables_are_bit_identical_to_before():
    """The tables of a config without scaling are the pre-scaling formula's, bit for bit."""
    for dim, seq, theta in [(128, 8192, 500000.0), (64, 4096, 10000.0), (32, 128, 1e6), (96, 2048, 75e6)]:
        inv = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
        freqs = torch.outer(torch.arange(seq, dtype=torch.float32), inv)
        cos, sin = rope_tables(dim, seq, theta)
        assert torch.equal(cos, freqs.cos()) and torch.equal(sin, freqs.sin())
        assert all(torch.equal(a, b) for a, b in zip(rope_tables(dim, seq, theta, RopeScaling(rope_type="dynamic",
                                                                                             factor=4.0)), (cos, sin)))


def _write(tmp_path: Path, cfg: dict, name: str = "config.json") -> Path:
    path = tmp_path / name
    path.write_text(json.dumps(cfg))
    return path


@pytest.mark.parametrize("rope", [dict(rope_type="longrope", short_factor=[1.0], long_factor=[2.0]),
                                  dict(type="su", factor=2.0), dict(rope_type="mrope-ish")])
def test_unbuilt_rope_types_are_refused_in_one_line(tmp_path, rope):
    cfg = dict(model_type="llama", hidden_size=64, num_hidden_layers=1, num_attention_heads=4, vocab_size=128,
               intermediate_size=128, rope_scaling=rope)
    with pytest.raises(InputError) as err:
        from_hf_config(_write(tmp_path, cfg))
    msg = str(err.value)
    assert "rope_scaling.rope_type" in msg and "llama3, yarn" in msg and "\n" not in msg


def test_a_missing_scaling_field_is_named(tmp_path):
    cfg = dict(model_type="llama", hidden_size=64, num_hidden_layers=1, num_attention_heads=4, vocab_size=128,
               intermediate_size=128, rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0))
    with pytest.raises(InputError, match="rope_type=llama3 needs 'high_freq_factor'"):
        from_hf_config(_write(tmp_path, cfg))


def test_per_layer_rope_is_refused(tmp_path):
    """Different RoPE per layer type (transformers 5 nesting; Gemma 3's scaled global layers) is not built."""
    base = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=128, intermediate_size=128)
    nested = dict(base, model_type="llama", rope_parameters={
        "full_attention": dict(rope_type="linear", factor=8.0, rope_theta=1e6),
        "sliding_attention": dict(rope_type="default", rope_theta=1e4)})
    with pytest.raises(InputError, match="per-layer RoPE"):
        from_hf_config(_write(tmp_path, nested))
    same = dict(rope_type="linear", factor=8.0, rope_theta=1e6)
    spec = from_hf_config(_write(tmp_path, dict(nested, rope_parameters={"full_attention": same,
                                                                         "sliding_attention": same}), "s.json"))
    assert spec.rope_scaling.rope_type == "linear" and spec.rope_theta == 1e6
    gemma3 = dict(base, model_type="gemma3_text", head_dim=16, sliding_window=512,
                  rope_scaling=dict(rope_type="linear", factor=8.0))
    with pytest.raises(InputError, match="global layers only"):
        from_hf_config(_write(tmp_path, gemma3, "g.json"))


def test_presets_of_scaled_models_carry_their_scaling():
    assert preset("llama3-405b").rope_scaling.rope_type == "llama3"
    assert preset("llama3.2-1b").rope_scaling.factor == 32.0
    ds = preset("deepseek-v3").rope_scaling
    assert ds.rope_type == "yarn" and ds.cos_sin_factor == 1.0 and ds.mla_softmax_factor == pytest.approx(
        (0.1 * torch.log(torch.tensor(40.0)).item() + 1) ** 2)
    assert preset("llama3-8b").rope_scaling == RopeScaling()


# ----- end to end: the built model against transformers' Llama ---------------------------------
TINY_LLAMA = dict(model_type="llama", hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=128, max_position_embeddings=256, rope_theta=10000.0,
                  rms_norm_eps=1e-5, tie_word_embeddings=False)
TINY_SCALINGS = {
    "plain": None,
    "llama3": dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                   original_max_position_embeddings=32),
    "yarn": dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=64, beta_fast=8.0, beta_slow=1.0),
}


def _half_rotation(w: torch.Tensor, heads: int) -> torch.Tensor:
    """q/k rows from autopar's interleaved pairs (2i, 2i+1) to transformers' halves (i, i + d/2)."""
    return w.view(heads, -1, 2, w.shape[-1]).transpose(1, 2).reshape(w.shape)


def _hf_state(ours: dict, cfg: dict) -> dict:
    """autopar's Transformer weights under LlamaForCausalLM's names."""
    names = {"attention.wq": "self_attn.q_proj", "attention.wk": "self_attn.k_proj", "attention.wv": "self_attn.v_proj",
             "attention.wo": "self_attn.o_proj", "feed_forward.w1": "mlp.gate_proj", "feed_forward.w3": "mlp.up_proj",
             "feed_forward.w2": "mlp.down_proj", "attention_norm": "input_layernorm",
             "ffn_norm": "post_attention_layernorm"}
    out = {"model.embed_tokens.weight": ours["tok_embeddings.weight"], "model.norm.weight": ours["norm.weight"],
           "lm_head.weight": ours["output.weight"]}
    for i in range(cfg["num_hidden_layers"]):
        for mine, theirs in names.items():
            w = ours[f"layers.{i}.{mine}.weight"]
            if mine in ("attention.wq", "attention.wk"):
                w = _half_rotation(w, cfg["num_attention_heads" if mine.endswith("q") else "num_key_value_heads"])
            out[f"model.layers.{i}.{theirs}.weight"] = w
    return out


@pytest.mark.parametrize("kind", TINY_SCALINGS)
def test_logits_match_llama_for_causal_lm(tmp_path, kind):
    """Same weights, same tokens: the built-in model and transformers' LlamaForCausalLM agree in fp32,
    over a sequence longer than the llama3 / yarn original context (the scaled frequencies act)."""
    from autopar.profiles.models import build_model

    cfg = dict(TINY_LLAMA, **({"rope_scaling": TINY_SCALINGS[kind]} if TINY_SCALINGS[kind] else {}))
    ours = build_model(from_hf_config(_write(tmp_path, cfg)), device="cpu").eval()
    ours.init_weights(seed=3)
    theirs = transformers.LlamaForCausalLM(transformers.LlamaConfig(**copy.deepcopy(cfg))).eval()
    theirs.load_state_dict(_hf_state(ours.state_dict(), cfg))
    tokens = torch.randint(0, cfg["vocab_size"], (2, 200), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(ours(tokens), theirs(tokens).logits, rtol=1e-5, atol=1e-6)


def test_mla_matches_deepseek_v3_attention_under_yarn():
    """DeepSeek's MLA under YaRN: transformers' DeepseekV3Attention (interleaved RoPE, as autopar's)
    scales cos / sin by mscale / mscale_all_dim and the softmax by mscale_all_dim's mscale squared."""
    from transformers.models.deepseek_v3 import modeling_deepseek_v3 as ds

    from autopar.profiles.models.layers import MLAttention

    cfg = dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=4, q_lora_rank=32, kv_lora_rank=16,
               qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, max_position_embeddings=256,
               rope_theta=10000.0, rms_norm_eps=1e-6, rope_scaling=dict(
                   type="yarn", factor=4.0, original_max_position_embeddings=64, mscale=1.0, mscale_all_dim=0.707))
    scaling = rope_scaling(HFReader(copy.deepcopy(cfg), Path("config.json")))
    assert scaling.cos_sin_factor != 1.0 and scaling.mla_softmax_factor != 1.0
    ours = MLAttention(64, 4, 32, 16, 16, 8, 16, 1e-6, eager=False, softmax_factor=scaling.mla_softmax_factor)
    torch.manual_seed(0)
    for p in ours.parameters():
        p.data.normal_(0, 0.3)
    config = transformers.DeepseekV3Config(**copy.deepcopy(cfg), attn_implementation="sdpa")
    theirs = ds.DeepseekV3Attention(config, 0).eval()
    names = {"q_a_proj": "wq_a", "q_a_layernorm": "q_norm", "q_b_proj": "wq_b", "kv_a_proj_with_mqa": "wkv_a",
             "kv_a_layernorm": "kv_norm", "kv_b_proj": "wkv_b", "o_proj": "wo"}
    theirs.load_state_dict({f"{k}.weight": ours.get_parameter(f"{v}.weight") for k, v in names.items()})
    x = torch.randn(2, 200, 64)
    cos, sin = rope_tables(8, 256, 10000.0, scaling)
    hf_cos_sin = ds.DeepseekV3RotaryEmbedding(config)(x, torch.arange(200)[None])
    with torch.no_grad():
        torch.testing.assert_close(ours(x, cos, sin), theirs(x, hf_cos_sin, None)[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("model", ["llama-tiny", "deepseek-tiny"])
def test_emitted_program_builds_the_scaling(tmp_path, model):
    """Plan is program: the run directory (its plan.json read without pydantic, its vendored
    autopar_rt) builds the tables and MLA softmax scale that autopar's model has."""
    import subprocess
    import sys

    from helpers_plans import make_plan

    from autopar.codegen.emit import emit
    from autopar.profiles.models import build_model

    scaling = RopeScaling(rope_type="yarn", factor=4.0, original_max_position_embeddings=16, mscale=1.0,
                          mscale_all_dim=0.8)
    plan = make_plan(model, 1, "dp=1", spec_update={"rope_scaling": scaling})
    emit(plan, tmp_path, "cpu")
    code = ("import torch; from autopar_rt.runtime import load_spec; from autopar_rt.models import build_model; "
            "m = build_model(load_spec('plan.json'), 'cpu'); "
            "torch.save({'cos': m.rope_cos, 'sin': m.rope_sin, 'scale': [getattr(a, 'scale', None) "
            "for a in m.modules() if hasattr(a, 'wo')]}, 'tables.pt')")
    subprocess.run([sys.executable, "-c", code], cwd=tmp_path, check=True, env={"PYTHONPATH": str(tmp_path)})
    ran, ours = torch.load(tmp_path / "tables.pt"), build_model(plan.model, "cpu")
    assert torch.equal(ran["cos"], ours.rope_cos) and torch.equal(ran["sin"], ours.rope_sin)
    assert not torch.equal(ours.rope_cos, build_model(plan.model.model_copy(update={"rope_scaling": RopeScaling()}),
                                                      "cpu").rope_cos)
    assert ran["scale"] == [getattr(a, "scale", None) for a in ours.modules() if hasattr(a, "wo")]
    if model == "deepseek-tiny":
        assert ran["scale"][0] == pytest.approx(scaling.mla_softmax_factor / (16 + 8) ** 0.5)
