"""Models outside the catalog, captured as the transformers module itself (no hub, config only):
an encoder (BERT, RoBERTa), an encoder-decoder (T5), a vision transformer, a recurrent model
(Mamba) and a decoder family newer than the catalog (SmolLM3) plan end to end."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("transformers")

OUTSIDE = Path(__file__).resolve().parent / "fixtures" / "hf" / "outside"
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
