"""Model intake: Hugging Face config.json readers against the presets, and one-line errors
with exit code 2 through the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from autopar.core.model_spec import ModelSpec
from autopar.profiles.intake import SUPPORTED_MODEL_TYPES, from_hf_config, preset

ARCH_FIELDS = ("family", "hidden", "layers", "heads", "kv_heads", "head_dim", "vocab", "tie_embeddings",
               "qkv_bias", "num_experts", "topk", "moe_ffn_hidden", "first_dense_layers", "q_lora_rank",
               "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "rope_theta", "norm_eps")


def arch(spec: ModelSpec) -> dict:
    """The fields that decide the module and its costs (a dense width no layer uses is ignored)."""
    out = {f: getattr(spec, f) for f in ARCH_FIELDS}
    uses_dense = not spec.is_moe or spec.first_dense_layers > 0
    out["ffn_hidden"] = spec.ffn_hidden if uses_dense else 0
    out["shared_width"] = spec.shared_width
    return out


# Published config.json contents (trimmed to the fields the readers use).
LLAMA3_8B = {"model_type": "llama", "hidden_size": 4096, "intermediate_size": 14336, "num_attention_heads": 32,
             "num_hidden_layers": 32, "num_key_value_heads": 8, "vocab_size": 128256,
             "max_position_embeddings": 8192, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
             "tie_word_embeddings": False}
MIXTRAL_8X7B = {"model_type": "mixtral", "hidden_size": 4096, "intermediate_size": 14336,
                "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 8, "vocab_size": 32000,
                "max_position_embeddings": 32768, "rms_norm_eps": 1e-5, "rope_theta": 1e6,
                "num_local_experts": 8, "num_experts_per_tok": 2, "tie_word_embeddings": False}
QWEN2_57B = {"model_type": "qwen2_moe", "hidden_size": 3584, "intermediate_size": 18944,
             "moe_intermediate_size": 2560, "shared_expert_intermediate_size": 20480, "num_experts": 64,
             "num_experts_per_tok": 8, "num_attention_heads": 28, "num_key_value_heads": 4,
             "num_hidden_layers": 28, "vocab_size": 151936, "max_position_embeddings": 32768,
             "rms_norm_eps": 1e-6, "rope_theta": 1e6, "tie_word_embeddings": False}
DEEPSEEK_V3 = {"model_type": "deepseek_v3", "hidden_size": 7168, "intermediate_size": 18432,
               "moe_intermediate_size": 2048, "num_attention_heads": 128, "num_key_value_heads": 128,
               "num_hidden_layers": 61, "vocab_size": 129280, "n_routed_experts": 256, "n_shared_experts": 1,
               "first_k_dense_replace": 3, "num_experts_per_tok": 8, "q_lora_rank": 1536, "kv_lora_rank": 512,
               "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "v_head_dim": 128,
               "max_position_embeddings": 163840, "rms_norm_eps": 1e-6, "rope_theta": 10000,
               "tie_word_embeddings": False}
# vocab padded to 50304 as the gpt2-124m preset does (nanoGPT / Megatron padding of 50257)
GPT2 = {"model_type": "gpt2", "n_embd": 768, "n_layer": 12, "n_head": 12, "vocab_size": 50304,
        "n_positions": 1024, "layer_norm_epsilon": 1e-5, "resid_pdrop": 0.0}
MISTRAL_7B = {"model_type": "mistral", "hidden_size": 4096, "intermediate_size": 14336,
              "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 8, "vocab_size": 32000,
              "max_position_embeddings": 32768, "rms_norm_eps": 1e-5, "rope_theta": 10000.0}
QWEN2_7B = {"model_type": "qwen2", "hidden_size": 3584, "intermediate_size": 18944, "num_attention_heads": 28,
            "num_hidden_layers": 28, "num_key_value_heads": 4, "vocab_size": 152064,
            "max_position_embeddings": 131072, "rms_norm_eps": 1e-6, "rope_theta": 1e6}
DEEPSEEK_V2_LITE = {"model_type": "deepseek_v2", "hidden_size": 2048, "intermediate_size": 10944,
                    "moe_intermediate_size": 1408, "num_attention_heads": 16, "num_hidden_layers": 27,
                    "vocab_size": 102400, "n_routed_experts": 64, "n_shared_experts": 2, "first_k_dense_replace": 1,
                    "num_experts_per_tok": 6, "q_lora_rank": None, "kv_lora_rank": 512, "qk_nope_head_dim": 128,
                    "qk_rope_head_dim": 64, "v_head_dim": 128, "max_position_embeddings": 163840}


def write(tmp_path, cfg: dict, name: str = "config.json"):
    path = tmp_path / name
    path.write_text(json.dumps(cfg))
    return path


@pytest.mark.parametrize("cfg, name", [(LLAMA3_8B, "llama3-8b"), (MIXTRAL_8X7B, "mixtral-8x7b"),
                                       (QWEN2_57B, "qwen2-57b-a14b"), (DEEPSEEK_V3, "deepseek-v3"),
                                       (GPT2, "gpt2-124m")], ids=lambda x: x if isinstance(x, str) else "")
def test_config_matches_preset(tmp_path, cfg, name):
    assert arch(from_hf_config(write(tmp_path, cfg))) == arch(preset(name))


def test_config_max_seq_len_is_read(tmp_path):
    assert from_hf_config(write(tmp_path, LLAMA3_8B)).max_seq_len == 8192 == preset("llama3-8b").max_seq_len


def test_configs_without_a_preset(tmp_path):
    mistral = from_hf_config(write(tmp_path, MISTRAL_7B, "m.json"))
    assert (mistral.family, mistral.kv_heads, mistral.ffn_hidden, mistral.qkv_bias) == ("llama", 8, 14336, False)
    qwen = from_hf_config(write(tmp_path, QWEN2_7B, "q.json"))
    assert (qwen.family, qwen.qkv_bias, qwen.head_dim) == ("llama", True, 128)
    lite = from_hf_config(write(tmp_path, DEEPSEEK_V2_LITE, "d.json"))
    assert (lite.family, lite.q_lora_rank, lite.shared_width, lite.first_dense_layers) == ("deepseek_v3", 0, 2816, 1)


def test_every_supported_model_type_is_covered():
    """Every catalog model_type has a public-config fixture (tests/test_hf_families.py checks them
    against transformers); llama4 and gemma3 (multimodal wrappers) read their text_config."""
    fixtures = Path(__file__).resolve().parent / "fixtures" / "hf"
    covered = {json.loads(p.read_text())["model_type"] for p in fixtures.glob("*.json")}
    covered |= {"llama4", "gemma3"}  # the wrapper types: their text_config is a llama4_text / gemma3_text fixture
    assert covered == set(SUPPORTED_MODEL_TYPES)


def test_multimodal_wrapper_reads_text_config(tmp_path):
    inner = json.loads((Path(__file__).resolve().parent / "fixtures" / "hf" / "gemma3_text.json").read_text())
    wrapped = from_hf_config(write(tmp_path, {"model_type": "gemma3", "text_config": inner}))
    assert arch(wrapped) == arch(from_hf_config(write(tmp_path, inner, "t.json")))


# ----- one-line errors, exit code 2 ---------------------------------------------------------
def _assert_one_line_error(code: int, err: str, *needles: str) -> None:
    assert code == 2
    assert "Traceback" not in err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for needle in needles:
        assert needle in lines[0]


def test_malformed_config(tmp_path, run_cli):
    path = tmp_path / "config.json"
    path.write_text('{"model_type": "llama", "hidden_size": 4096,,}')
    code, _, err = run_cli("inspect", str(path))
    _assert_one_line_error(code, err, "is not valid JSON", "line 1")


def test_missing_field(tmp_path, run_cli):
    cfg = {k: v for k, v in LLAMA3_8B.items() if k != "hidden_size"}
    code, _, err = run_cli("inspect", str(write(tmp_path, cfg)))
    _assert_one_line_error(code, err, "missing field 'hidden_size'")


def test_unknown_model_type(tmp_path, run_cli):
    """A model_type outside the catalog goes to the transformers path: one line when transformers
    does not know it either (or is not installed)."""
    code, _, err = run_cli("inspect", str(write(tmp_path, dict(LLAMA3_8B, model_type="no_such_model"))))
    _assert_one_line_error(code, err, "model_type='no_such_model'")


def test_unknown_preset(run_cli):
    code, _, err = run_cli("inspect", "llama9-1t")
    _assert_one_line_error(code, err, "unknown preset 'llama9-1t'")


def test_untraceable_factory(run_cli):
    code, _, err = run_cli("inspect", "conftest:branchy_model", "--input-shape", "2,8", "--input-dtype", "float32")
    _assert_one_line_error(code, err, "cannot trace factory 'conftest:branchy_model'")


def test_factory_without_input_shape(run_cli):
    code, _, err = run_cli("inspect", "conftest:stack_model")
    _assert_one_line_error(code, err, "--input-shape")


def test_bad_input_shape(run_cli):
    code, _, err = run_cli("inspect", "conftest:stack_model", "--input-shape", "2,x")
    _assert_one_line_error(code, err, "--input-shape")
