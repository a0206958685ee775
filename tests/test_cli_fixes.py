"""Fixes a new user asked for: numeric inputs checked, help that names presets, strategy keys and
the network, 'memory-tight' wording, readable plots, JSON on failure, public hardware sources."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from autopar.profiles.intake import PRESETS

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("args,field", [
    (["estimate", "gpt-tiny", "--seq-len", "0", "--strategy", "dp=-1"], "--seq-len"),
    (["estimate", "gpt-tiny", "--nodes", "0", "--strategy", "dp=-1"], "--nodes"),
    (["memory", "gpt-tiny", "--gpus-per-node", "-2", "--strategy", "dp=-1"], "--gpus-per-node"),
    (["plan", "gpt-tiny", "--global-batch", "0"], "--global-batch"),
    (["plan", "gpt-tiny", "--input-shape", "2,x"], "--input-shape"),
    (["inspect", "gpt-tiny", "--micro-batch", "0"], "--micro-batch"),
    (["experts", "t.json", "--ep", "0"], "--ep"),
    (["trace-routing", "--synthetic", "--affinity", "2", "--out", "t.json"], "--affinity"),
])
def test_numeric_inputs_are_checked_in_one_line(run_cli, args, field):
    code, out, err = run_cli(*args)
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("error: ") and field in err and "Traceback" not in err


@pytest.mark.parametrize("cmd", ["plan", "estimate", "memory"])
def test_help_names_presets_keys_and_network(run_cli, cmd):
    code, out, _ = run_cli(cmd, "--help")
    text = re.sub(r"-\s+", "-", " ".join(out.split()))  # help is wrapped, also at hyphens
    assert code == 0
    assert all(name in text for name in ("llama3-70b", "deepseek-v3", "gpt3-175b"))
    assert len([p for p in PRESETS if p in text]) == len(PRESETS)
    for key in ("tp tensor parallel", "pp pipeline stages", "zero ZeRO stage", "mbs micro-batch", "gbs global batch"):
        assert key in text, key
    assert "--gpu G --nodes N assumes" in text and "InfiniBand" in text and "48 GB/s" in text


def test_winner_near_capacity_is_memory_tight_not_memory_bound(monkeypatch):
    from autopar.cost_models.session import Inputs, build_cost_model
    from autopar.planner import explain
    from autopar.planner.search import Constraints, search

    cm, *_ = build_cost_model(Inputs(model="gpt-tiny", gpu="cpu", gpus_per_node=2, seq_len=64))
    res = search(cm, 8, Constraints(), top_k=1)
    monkeypatch.setattr(explain, "TIGHT_MEMORY", 1.01)   # every plan counts as near capacity
    line = explain.why(res.candidates)[0]
    assert "memory-tight" in line and "memory-bound" not in line
    assert "compute-bound" in line or "limited by" in line   # the time limit is still named


def test_timeline_of_pp1_is_drawn(run_cli, tmp_path):
    import matplotlib.image as mpimg
    import numpy as np

    code, _, err = run_cli("plan", "gpt-tiny", "--gpu", "cpu", "--gpus-per-node", "2", "--seq-len", "64",
                           "--global-batch", "8", "--pp", "1", "--plot", str(tmp_path))
    assert code == 0, err
    img = mpimg.imread(tmp_path / "timeline.png")[..., :3]
    forward = np.array([0x4C, 0x72, 0xB0]) / 255   # plots.COLORS["forward"]
    share = np.mean(np.all(np.abs(img - forward) < 0.02, axis=-1))
    assert share > 0.05, share   # the one stage's bars fill a visible part of the figure


def test_nothing_fits_prints_json_and_exits_3(run_cli):
    code, out, err = run_cli("plan", "llama3-70b", "--gpu", "a100-80g", "--gpus-per-node", "1", "--max-pp", "1",
                             "--seq-len", "4096", "--global-batch", "8", "--json")
    assert code == 3 and err.startswith("error: ")
    obj = json.loads(out)
    assert obj["error"] == "does_not_fit" and obj["exit_code"] == 3 and obj["reasons"]
    assert isinstance(obj["fixes"], list)


@pytest.mark.parametrize("name", ["h100-sxm", "a100-80g"])
def test_hardware_profiles_cite_public_sources(name):
    text = (ROOT / "profiles" / "hardware" / f"{name}.yaml").read_text()
    assert "/work/" not in text and "hardware_facts.yaml" not in text
    assert "datasheet" in text
