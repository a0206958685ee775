"""Models outside the catalog, captured as the transformers module itself (no hub, config only):
an encoder (BERT, RoBERTa), an encoder-decoder (T5), a vision transformer, a recurrent model
(Mamba) and a decoder family newer than the catalog (SmolLM3) plan end to end."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("transformers")

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "hf"
OUTSIDE = FIXTURES / "outside"
PLAN = ("--gpu", "h100-sxm", "--global-batch", "64", "--top", "1", "--json")


def _plan(run_cli, name: str, *extra: str) -> dict:
    code, out, err = run_cli("plan", str(OUTSIDE / name), *PLAN, *extra)
    assert code == 0, err
    return json.loads(out)


@pytest.mark.parametrize("name, seq", [("bert", 128), ("roberta", 128), ("t5", 64), ("smollm3", 128),
                                       ("mamba", 16)])
def test_token_models_plan_end_to_end(run_cli, name, seq):
    plan = _plan(run_cli, name, "--seq-len", str(seq))
    best = plan["best"]
    assert best["step_time_s"] > 0 and best["memory"]["peak_bytes"] > 0


def test_vit_counts_patches_and_samples(run_cli):
    """A ViT's sequence is its 196 patches per image (not the 3 channels nor 224 pixels), and
    throughput is reported in samples/s beside tokens/s."""
    plan = _plan(run_cli, "vit")
    best = plan["best"]
    assert best["samples_per_s"] == pytest.approx(best["tokens_per_s"] / 196)
    code, _, err = run_cli("plan", str(OUTSIDE / "vit"), *PLAN, "--seq-len", "512")
    assert code == 2 and "196 patches" in err


def test_transformers_module_params_and_blocks():
    from autopar.profiles.graph import capture
    from autopar.profiles.intake import resolve_model

    mg = capture(resolve_model(str(OUTSIDE / "bert")), 32, 1, "bf16")
    assert sum(mg.graph.nodes[n]["params"] for n in mg.order) == 109_514_298  # bert-base-uncased + MLM head
    assert mg.block_path == "bert.encoder.layer" and len(mg.block_indices) == 12


def test_uncapturable_module_names_module_and_construct(tmp_path, run_cli, monkeypatch):
    """A data-dependent branch inside a transformers module: one line naming the module."""
    import transformers.models.llama.modeling_llama as ml

    def branchy(self, x):
        if (x > 0).any():  # reads a tensor value: not capturable
            return x
        return -x

    monkeypatch.setattr(ml.LlamaMLP, "forward", branchy)
    cfg = dict(model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
               num_attention_heads=4, vocab_size=256)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    code, _, err = run_cli("inspect", str(tmp_path), "--hf", "--seq-len", "16")
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err
    assert "module 'model.layers.0.mlp' (LlamaMLP" in lines[0]


def tiny_cnn():
    """A factory taking images [b, 3, h, w]: conv stem, two identical blocks, a head."""
    from torch import nn

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(8, 8, 3, padding=1)

        def forward(self, x):
            return x + self.conv(x).relu()

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Conv2d(3, 8, 3, padding=1)
            self.blocks = nn.ModuleList([Block(), Block()])
            self.head = nn.Linear(8, 10)

        def forward(self, x):
            h = self.stem(x)
            for b in self.blocks:
                h = b(h)
            return self.head(h.mean((2, 3)))

    return Net()


def test_image_factory_sequence_is_not_the_channel_count(run_cli):
    code, out, err = run_cli("inspect", "test_hf_capture:tiny_cnn", "--input-shape", "2,3,16,16",
                             "--input-dtype", "float32", "--dtype", "fp32", "--json")
    assert code == 0, err
    report = json.loads(out)
    assert report["seq_len"] == 1 and report["micro_batch"] == 2  # one position per image, not 3 channels


# ----- tensor parallel and pipeline stages of a transformers module -------------------------
TINY_LLAMA = dict(model_type="llama", architectures=["LlamaForCausalLM"], hidden_size=64, intermediate_size=128,
                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=256,
                  max_position_embeddings=256)


def test_tp_is_priced_from_the_modules_own_plan(tmp_path, run_cli):
    """q/k/v/o/gate/up/down (the config's base_model_tp_plan) and the vocab-parallel embedding and
    head are split over tp, the norms replicated: parameter bytes per GPU under tp=2 are exactly
    those of the split (bf16), and tp communication is priced."""
    (tmp_path / "config.json").write_text(json.dumps(TINY_LLAMA))
    est = {}
    for tp in (1, 2):
        strategy = f"tp={tp},dp={8 // tp},sp={int(tp > 1)}"
        code, out, err = run_cli("estimate", f"hf:{tmp_path}", "--gpu", "h100-sxm", "--seq-len", "64",
                                 "--global-batch", "8", "--strategy", strategy, "--json")
        assert code == 0, err
        est[tp] = json.loads(out)
    linears = 2 * (64 * 64 * 2 + 64 * 32 * 2 + 3 * 64 * 128)  # q, o, k, v, gate, up, down in 2 layers
    vocab, norms = 2 * 256 * 64, 2 * 2 * 64 + 64
    assert est[1]["memory"]["breakdown"]["parameters"] == 2 * (linears + vocab + norms)
    assert est[2]["memory"]["breakdown"]["parameters"] == 2 * ((linears + vocab) / 2 + norms)
    assert est[2]["time"]["breakdown"]["tp_comm"] > 0 == est[1]["time"]["breakdown"]["tp_comm"]


def test_derived_tp_plan_equals_the_config_plan():
    """Without a base_model_tp_plan the pairs come from the linears' dataflow; for Llama they are
    the config's own plan."""
    import transformers

    from autopar.profiles.models.hf import derive_tp_plan

    cfg = transformers.LlamaConfig(**{k: v for k, v in TINY_LLAMA.items() if k not in ("model_type", "architectures")})
    model = transformers.LlamaForCausalLM._from_config(cfg)
    assert derive_tp_plan(model) == dict(cfg.base_model_tp_plan)


@pytest.mark.parametrize("name", ["llama", "mixtral", "qwen2_moe"])
def test_stage_forward_is_the_modules_forward(name):
    """A pipeline stage re-runs the decoder loop (embedding, rotary tables, masks, layers, norm,
    head): with every layer in one stage it gives the module's own logits."""
    import copy

    import torch
    from torch import nn

    from autopar.profiles.models.hf import HFLanguageModel, config_from_dict, model_class

    raw = json.loads((FIXTURES / f"{name}.json").read_text())
    raw.update(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2, vocab_size=256,
               num_hidden_layers=2, moe_intermediate_size=32, shared_expert_intermediate_size=64,
               num_local_experts=4, num_experts=4)
    cfg = config_from_dict(raw)
    cfg._experts_implementation = "eager"
    torch.manual_seed(0)
    lm = HFLanguageModel(model_class(cfg)._from_config(cfg, attn_implementation="sdpa"))
    tokens = torch.randint(0, 256, (2, 24))
    staged = copy.deepcopy(lm)
    dec = staged.hf.model
    dec.layers = nn.ModuleDict({str(i): layer for i, layer in enumerate(dec.layers)})
    staged.staged = True
    torch.testing.assert_close(staged(tokens), lm(tokens), rtol=0, atol=0)


@pytest.mark.parametrize("name, knob, why", [("qwen3", "tp", "replicated_with_grad_allreduce"),
                                             ("gpt_neox", "pp", "not emitted"), ("llama", "pp", "tied")])
def test_what_cannot_be_split_is_refused_at_plan_time(tmp_path, name, knob, why):
    from autopar import techniques
    from autopar.core.strategy import Strategy
    from autopar.profiles.intake import resolve_model

    (tmp_path / "config.json").write_text((FIXTURES / f"{name}.json").read_text())
    spec = resolve_model(f"hf:{tmp_path}")
    msgs = techniques.violations(Strategy.parse(f"{knob}=2,dp=4").resolve(8, 64), spec, 8, 64)
    assert len(msgs) == 1 and why in msgs[0] and "this transformers module supports dp" in msgs[0], msgs


@pytest.mark.parametrize("command", [("profile", "--budget-s", "1"), ("validate", "--nproc", "2")])
def test_profile_and_validate_take_input_dtype_and_shape(run_cli, command):
    """Every command that captures takes --input-dtype / --input-shape (and --hf): checked before any work."""
    code, _, err = run_cli(command[0], "llama-tiny", *command[1:], "--input-dtype", "int8")
    assert code == 2 and "--input-dtype=int8 is not one of" in err
    code, _, err = run_cli(command[0], "llama-tiny", *command[1:], "--input-shape", "2,x")
    assert code == 2 and "--input-shape=2,x" in err
