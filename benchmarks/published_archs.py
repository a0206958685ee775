"""Public configurations of the published rows whose model dimensions are null (``published_rows.model_config``
fills them from here): the HF ``config.json`` of each model, or the NeMo launcher config for NeMo's GPT-3 /
Nemotron sizes. Keys: the row's ``model.name``."""

from __future__ import annotations

_LLAMA2 = dict(model_type="llama", vocab_size=32000, num_key_value_heads=None)
ARCHS: dict[str, dict] = {
    "LLAMA2-7B": dict(_LLAMA2, hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
                      intermediate_size=11008),                       # meta-llama/Llama-2-7b-hf
    "Llama-2-13B": dict(_LLAMA2, hidden_size=5120, num_hidden_layers=40, num_attention_heads=40,
                        intermediate_size=13824),                     # meta-llama/Llama-2-13b-hf
    "LLAMA2-70B": dict(_LLAMA2, hidden_size=8192, num_hidden_layers=80, num_attention_heads=64,
                       num_key_value_heads=8, intermediate_size=28672),
    "Llama-2-70B": dict(_LLAMA2, hidden_size=8192, num_hidden_layers=80, num_attention_heads=64,
                        num_key_value_heads=8, intermediate_size=28672),  # meta-llama/Llama-2-70b-hf
    "GPT3-5B": dict(model_type="gpt2", n_embd=4096, n_layer=24, n_head=32, n_inner=16384,
                    vocab_size=50304),                                # NeMo conf/training/gpt3/5b.yaml
    "GPT3-20B": dict(model_type="gpt2", n_embd=6144, n_layer=44, n_head=48, n_inner=24576,
                     vocab_size=50304),                               # NeMo conf/training/gpt3/20b.yaml
    "Nemotron-8B": dict(model_type="gpt2", n_embd=4096, n_layer=32, n_head=32, n_inner=16384,
                        vocab_size=256000),                           # NeMo nemotron 8b (squared-ReLU MLP)
    "Mixtral-8x22B": dict(model_type="mixtral", hidden_size=6144, num_hidden_layers=56, num_attention_heads=48,
                          num_key_value_heads=8, intermediate_size=16384, vocab_size=32768,
                          num_local_experts=8, num_experts_per_tok=2),   # mistralai/Mixtral-8x22B-v0.1
    # MoE Parallel Folding's fine-grained variant: 8x22B with each expert split in 8 (64 experts, top-8)
    "Mixtral-8x22B-G8T8": dict(model_type="mixtral", hidden_size=6144, num_hidden_layers=56, num_attention_heads=48,
                               num_key_value_heads=8, intermediate_size=2048, vocab_size=32768,
                               num_local_experts=64, num_experts_per_tok=8),
    "Qwen2-57B-A14B": dict(model_type="qwen2_moe", hidden_size=3584, num_hidden_layers=28, num_attention_heads=28,
                           num_key_value_heads=4, moe_intermediate_size=2560,
                           shared_expert_intermediate_size=20480, vocab_size=151936, num_experts=64,
                           num_experts_per_tok=8),                    # Qwen/Qwen2-57B-A14B
    "Qwen3_30B_a3B": dict(model_type="qwen3_moe", hidden_size=2048, num_hidden_layers=48, num_attention_heads=32,
                          num_key_value_heads=4, head_dim=128, moe_intermediate_size=768, vocab_size=151936,
                          num_experts=128, num_experts_per_tok=8, attention_bias=False),  # Qwen/Qwen3-30B-A3B
    "Qwen3_235B_a22B": dict(model_type="qwen3_moe", hidden_size=4096, num_hidden_layers=94, num_attention_heads=64,
                            num_key_value_heads=4, head_dim=128, moe_intermediate_size=1536, vocab_size=151936,
                            num_experts=128, num_experts_per_tok=8, attention_bias=False),  # Qwen/Qwen3-235B-A22B
    "GPT-OSS-120B": dict(model_type="mixtral", hidden_size=2880, num_hidden_layers=36, num_attention_heads=64,
                         num_key_value_heads=8, head_dim=64, intermediate_size=2880, vocab_size=201088,
                         num_local_experts=128, num_experts_per_tok=4, attention_bias=True, mlp_bias=True,
                         sliding_window=128, layer_types=["sliding_attention", "full_attention"] * 18, swiglu_limit=7.0,
                         rope_scaling=dict(rope_type="yarn", factor=32.0, beta_fast=32.0, beta_slow=1.0,
                                           original_max_position_embeddings=4096)),
    # openai/gpt-oss-120b (head_dim 64; biases on q/k/v/o and the experts; a 128-token window on every other layer:
    # Megatron-Bridge GPTOSSProvider window_size (128, 0), window_attn_skip_freq 2; the HF config's layer_types;
    # its config's swiglu_limit 7: GPTOSSProvider activation_func_clamp_value 7.0)
    "DeepSeek-V3": dict(model_type="deepseek_v3", hidden_size=7168, num_hidden_layers=61, num_attention_heads=128,
                        intermediate_size=18432, vocab_size=129280, n_routed_experts=256, num_experts_per_tok=8,
                        moe_intermediate_size=2048, n_shared_experts=1, first_k_dense_replace=3, q_lora_rank=1536,
                        kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128),
}
