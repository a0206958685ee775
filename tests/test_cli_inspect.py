"""`autopar inspect`: the table and --json on gpt-tiny, a preset and a factory."""

from __future__ import annotations

import json

from autopar.profiles.intake import preset


def test_inspect_table_gpt_tiny(run_cli):
    code, out, err = run_cli("inspect", "gpt-tiny", "--seq-len", "64")
    assert code == 0, err
    for text in ("gpt-tiny", "embedding", "block", "output", "0-3", "params:", "6N =", "capture:"):
        assert text in out


def test_inspect_json_gpt_tiny(run_cli):
    code, out, _ = run_cli("inspect", "gpt-tiny", "--seq-len", "64", "--micro-batch", "2", "--json")
    assert code == 0
    report = json.loads(out)
    spec = preset("gpt-tiny")
    h, f, v, l = spec.hidden, spec.ffn_hidden, spec.vocab, spec.layers
    assert report["totals"]["params"] == l * (4 * h * h + 2 * h * f + f + 9 * h) + 2 * v * h + 128 * h + 2 * h
    assert (report["seq_len"], report["micro_batch"], report["dtype"]) == (64, 2, "bf16")
    block = next(g for g in report["groups"] if g["kind"] == "block")
    assert (block["count"], block["layers"]) == (4, "0-3")
    assert report["totals"]["train_flops_per_token"] > report["totals"]["fwd_flops_per_token"] > 0


def test_inspect_json_preset(run_cli):
    code, out, _ = run_cli("inspect", "mixtral-8x7b", "--seq-len", "1024", "--json")
    assert code == 0
    report = json.loads(out)
    assert [(g["name"], g["count"]) for g in report["groups"]] == [("embedding", 1), ("moe_block", 32),
                                                                     ("output", 1)]
    assert report["totals"]["params"] == 46_702_792_704
    assert report["totals"]["params_active"] < report["totals"]["params"]
    assert next(g for g in report["groups"] if g["name"] == "output")["temp_bytes_per_token"] == 6 * 32000


def test_inspect_factory(run_cli):
    code, out, err = run_cli("inspect", "conftest:stack_model", "--input-shape", "2,16,32",
                             "--input-dtype", "float32", "--dtype", "fp32", "--json")
    assert code == 0, err
    report = json.loads(out)
    assert [(g["kind"], g["count"]) for g in report["groups"]] == [("embedding", 1), ("block", 3), ("output", 1)]


def test_inspect_bad_dtype(run_cli):
    code, _, err = run_cli("inspect", "gpt-tiny", "--dtype", "int3")
    assert code == 2 and err.startswith("error: dtype:") and "Traceback" not in err
