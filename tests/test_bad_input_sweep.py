"""Bad input to every subcommand: exit 2, one line on stderr that names the field, no traceback, nothing written.

The guide's rule for user errors, swept over the inputs a user gets wrong: unknown model / preset, malformed
``--strategy`` keys and values, bad ``--cluster`` YAML, bad config.json, output paths that cannot be written,
a corrupt or other-version plan.json for ``emit``, a bad routing trace for ``experts``, a missing, corrupt or mismatched
checkpoint for ``inspect-checkpoint`` / ``reshard``. Each case runs in-process (``cli.main.main``) inside one
folder of fixture files, and the folder's listing must be the same afterwards.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers_plans import make_plan

from autopar.cli.main import main

CLUSTER = {"name": "c", "gpu": "h100-sxm", "nodes": 1, "gpus_per_node": 8,
           "intra_node": {"bw_gbps": 100, "latency_s": 1e-5}, "inter_node": {"bw_gbps": 10, "latency_s": 1e-5}}
LLAMA = {"model_type": "llama", "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
         "intermediate_size": 128, "vocab_size": 128}


def _yaml(d: dict) -> str:
    return json.dumps(d)   # JSON is YAML


def _fixture_texts() -> dict[str, str]:
    """Fixture file name -> contents (the good plan and trace are written by the fixture)."""
    no_inter = {k: v for k, v in CLUSTER.items() if k != "inter_node"}
    neg_link = {**CLUSTER, "intra_node": {"bw_gbps": -1, "latency_s": 1e-5}}
    return {
        "file.txt": "a file where a folder is expected\n",
        "cl_missing.yaml": _yaml(no_inter), "cl_type.yaml": _yaml({**CLUSTER, "nodes": "two"}),
        "cl_extra.yaml": _yaml({**CLUSTER, "colour": "blue"}), "cl_neg.yaml": _yaml(neg_link),
        "cl_gpu.yaml": _yaml({**CLUSTER, "gpu": "z9000"}), "cl_syntax.yaml": "name: [unclosed\n",
        "cl_list.yaml": "- 1\n- 2\n",
        "cfg_ok.json": json.dumps(LLAMA),
        "cfg_syntax.json": "{not json", "cfg_list.json": "[1, 2]", "cfg_missing.json": '{"model_type": "llama"}',
        "cfg_type.json": json.dumps({**LLAMA, "hidden_size": "big"}),
        "cfg_neg.json": json.dumps({**LLAMA, "hidden_size": -64}),
        "cfg_heads.json": json.dumps({**LLAMA, "num_attention_heads": 5}),
        "plan_corrupt.json": "{not json", "plan_list.json": "[1]",
        "trace_corrupt.json": "{not json", "trace_empty.json": "{}",
        "strategies.txt": "dp=1\ntp=2,,pp\n",
        "ck_meta/step-00000003/COMPLETE": "", "ck_meta/step-00000003/meta.json": "{bad",
        "ck_index/step-00000003/COMPLETE": "", "ck_index/step-00000003/meta.json": '{"step": 3, "world": 1}',
        "ck_vocab/step-00000003/COMPLETE": "", "ck_vocab/step-00000003/.metadata": "",
        "ck_vocab/step-00000003/train_state.pt": "",
        "ck_train/step-00000003/COMPLETE": "", "ck_train/step-00000003/.metadata": "",
        "ck_train/step-00000003/meta.json": '{"step": 3, "world": 1}',
        "ck_index_bad/step-00000003/COMPLETE": "", "ck_index_bad/step-00000003/.metadata": "junk",
        "ck_index_bad/step-00000003/meta.json": '{"step": 3, "world": 1}',
        "ck_index_bad/step-00000003/train_state.pt": "",
        "ck_vocab/step-00000003/meta.json": json.dumps({"step": 3, "world": 1, "model": {"name": "gpt-tiny",
                                                                                         "vocab": 999}}),
    }


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("bad-input")
    for name, text in _fixture_texts().items():
        (d / name).parent.mkdir(parents=True, exist_ok=True)
        (d / name).write_text(text)
    (d / "a_folder").mkdir()
    _checkpoint_with_corrupt_train_state(d / "ck_state_bad" / "step-00000003")
    plan = make_plan("gpt-tiny", 2, "dp=-1")
    plan.save(d / "plan.json")
    data = json.loads((d / "plan.json").read_text())
    (d / "plan_v2.json").write_text(json.dumps({**data, "format_version": 2}))
    (d / "plan_extra.json").write_text(json.dumps({**data, "extra_thing": 1}))
    (d / "plan_lr.json").write_text(json.dumps({**data, "layer_recompute": ["none"]}))
    (d / "plan_world.json").write_text(json.dumps({**data, "strategy": {**data["strategy"], "tp": 3}}))
    half = [{"index": 0, "rank": 0, "layer_start": 0, "layer_end": 2, "has_embedding": True, "has_output": True}]
    (d / "plan_stages.json").write_text(json.dumps({**data, "stages": half}))   # pp=1, 2 of gpt-tiny's 4 layers
    try:
        main(["trace-routing", "--synthetic", "--experts", "8", "--layers", "2", "--out", str(d / "trace.json")])
    except SystemExit as exc:
        assert not exc.code, exc.code
    return d


def _checkpoint_with_corrupt_train_state(step: Path) -> None:
    """A step folder whose tensors' index loads (a one-tensor DCP save) but whose train_state.pt does not."""
    import warnings

    import torch
    import torch.distributed.checkpoint as dcp

    with warnings.catch_warnings():   # "assuming the intent is to save in a single process": it is
        warnings.simplefilter("ignore", UserWarning)
        dcp.save({"x": torch.zeros(2)}, checkpoint_id=str(step), no_dist=True)
    for name, text in (("meta.json", '{"step": 3, "world": 1}'), ("train_state.pt", "not a pickle"),
                       ("COMPLETE", "")):
        (step / name).write_text(text)


EST = ("estimate", "gpt-tiny", "--gpu", "h100-sxm", "--seq-len", "64", "--global-batch", "8")
GOOD = (*EST, "--strategy", "dp=-1")
CASES = [  # (id, argv with {d} for the fixture folder, what the one line must name)
    # unknown model / preset, each command that takes one
    ("estimate-model", ("estimate", "no-such-model", "--strategy", "dp=-1"), "model"),
    ("plan-model", ("plan", "no-such-model"), "model"),
    ("inspect-model", ("inspect", "no-such-model"), "model"),
    ("profile-model", ("profile", "no-such-model", "--out", "{d}/p.json"), "model"),
    ("trace-model", ("trace-routing", "no-such-model", "--out", "{d}/t.json"), "model"),
    ("trace-dense", ("trace-routing", "gpt-tiny", "--out", "{d}/t.json"), "MoE"),
    ("trace-none", ("trace-routing", "--out", "{d}/t.json"), "--synthetic"),
    ("validate-model", ("validate", "no-such-model", "--nproc", "1", "--out", "{d}/v"), "model"),
    ("plan-seq-len-huge", ("plan", "llama3-8b", "--seq-len", "1000000000"), "--seq-len"),  # was a capture traceback
    # --strategy keys and values
    ("tp-negative", (*EST, "--strategy", "tp=-2"), "tp=-2"),
    ("tp-zero", (*EST, "--strategy", "tp=0"), "tp=0"),
    ("tp-fraction", (*EST, "--strategy", "tp=1.5"), "tp=1.5"),
    ("tp-word", (*EST, "--strategy", "tp=abc"), "tp=abc"),
    ("unknown-key", (*EST, "--strategy", "tpx=2"), "tpx"),
    ("no-value", (*EST, "--strategy", "tp"), "'tp'"),
    ("only-commas", (*EST, "--strategy", ",,,"), "--strategy"),
    ("tp-heads", (*EST, "--strategy", "tp=8,dp=1"), "heads=4"),
    ("tp-world", (*EST, "--strategy", "tp=3"), "tp"),
    ("mbs-zero", (*EST, "--strategy", "mbs=0"), "mbs=0"),
    ("zero-stage", (*EST, "--strategy", "zero=5"), "zero=5"),
    ("recompute-mode", (*EST, "--strategy", "recompute=sometimes"), "recompute=sometimes"),
    ("schedule", (*EST, "--strategy", "schedule=zigzag"), "schedule=zigzag"),
    ("sp-value", (*EST, "--strategy", "sp=2"), "sp=2"),
    ("offload-value", (*EST, "--strategy", "offload=maybe"), "offload=maybe"),
    ("ep-dense", (*EST, "--strategy", "ep=2"), "ep=2"),
    ("vpp-layers", (*EST, "--strategy", "pp=2,vpp=3"), "vpp"),
    ("plan-tp-zero", ("plan", "gpt-tiny", "--tp", "0"), "tp=0"),
    ("plan-max-tp", ("plan", "gpt-tiny", "--max-tp", "0"), "--max-tp"),
    ("plan-zero", ("plan", "gpt-tiny", "--zero", "7"), "zero=7"),
    ("plan-top", ("plan", "gpt-tiny", "--top", "0"), "--top"),
    ("plan-strategy-key", ("plan", "gpt-tiny", "--strategy", "tpx=3"), "tpx"),
    # other options of the pricing commands
    ("gpu", (*GOOD, "--gpu", "z9000"), "gpu"),
    ("dtype", (*GOOD, "--dtype", "fp7"), "--dtype"),
    ("runtime", (*GOOD, "--runtime", "jax"), "--runtime"),
    ("compile", (*GOOD, "--compile", "always"), "--compile"),
    ("profile-missing", (*GOOD, "--profile", "{d}/nope.json"), "--profile"),
    ("profile-corrupt", (*GOOD, "--profile", "{d}/cfg_syntax.json"), "--profile"),
    ("preset-input-shape", ("plan", "gpt-tiny", "--input-shape", "2,128"), "--input-shape"),
    ("config-input-dtype", ("inspect", "{d}/cfg_ok.json", "--input-dtype", "float32"), "--input-dtype"),
    ("memory-strategy", ("memory", "gpt-tiny", "--strategy", "zero=9", "--json"), "zero=9"),
    # --cluster YAML
    ("cluster-missing-field", ("estimate", "gpt-tiny", "--cluster", "{d}/cl_missing.yaml", "--strategy", "dp=-1"),
     "inter_node"),
    ("cluster-type", ("estimate", "gpt-tiny", "--cluster", "{d}/cl_type.yaml", "--strategy", "dp=-1"), "nodes"),
    ("cluster-extra-key", ("plan", "gpt-tiny", "--cluster", "{d}/cl_extra.yaml"), "colour"),
    ("cluster-negative", ("plan", "gpt-tiny", "--cluster", "{d}/cl_neg.yaml"), "intra_node.bw_gbps"),
    ("cluster-gpu", ("plan", "gpt-tiny", "--cluster", "{d}/cl_gpu.yaml"), "gpu"),
    ("cluster-syntax", ("plan", "gpt-tiny", "--cluster", "{d}/cl_syntax.yaml"), "cluster"),
    ("cluster-list", ("plan", "gpt-tiny", "--cluster", "{d}/cl_list.yaml"), "cluster"),
    ("cluster-missing-file", ("plan", "gpt-tiny", "--cluster", "{d}/nope.yaml"), "cluster"),
    ("cluster-preset", ("plan", "gpt-tiny", "--cluster", "dgx-zzz"), "cluster"),
    # config.json
    ("config-syntax", ("plan", "{d}/cfg_syntax.json"), "model"),
    ("config-list", ("inspect", "{d}/cfg_list.json"), "model"),
    ("config-missing", ("plan", "{d}/cfg_missing.json"), "hidden_size"),
    ("config-type", ("inspect", "{d}/cfg_type.json"), "hidden_size"),
    ("config-negative", ("plan", "{d}/cfg_neg.json"), "hidden"),
    ("config-heads", ("inspect", "{d}/cfg_heads.json"), "heads=5"),
    # output paths that cannot be written: refused before any work
    ("plan-out-under-file", ("plan", "gpt-tiny", "--out", "{d}/file.txt/plan.json"), "--out"),
    ("plan-out-folder", ("plan", "gpt-tiny", "--out", "{d}/a_folder"), "--out"),
    ("plan-plot-file", ("plan", "gpt-tiny", "--plot", "{d}/file.txt"), "--plot"),
    ("emit-out-file", ("emit", "{d}/plan.json", "--out", "{d}/file.txt"), "--out"),
    ("emit-out-under-file", ("emit", "{d}/plan.json", "--out", "{d}/file.txt/run"), "--out"),
    ("experts-out", ("experts", "{d}/trace.json", "--ep", "2", "--out", "{d}/file.txt/p.json"), "--out"),
    ("experts-plot", ("experts", "{d}/trace.json", "--ep", "2", "--plot", "{d}/a_folder"), "--plot"),
    ("trace-out", ("trace-routing", "--synthetic", "--out", "{d}/file.txt/t.json"), "--out"),
    ("profile-out", ("profile", "gpt-tiny", "--out", "{d}/file.txt/p.json"), "--out"),
    ("profile-comm-out", ("profile-comm", "--nproc", "2", "--out", "{d}/a_folder"), "--out"),
    ("validate-out", ("validate", "gpt-tiny", "--nproc", "1", "--out", "{d}/file.txt"), "--out"),
    ("reshard-out", ("reshard", "{d}/ck_vocab", "--to", "{d}/plan.json", "--out", "{d}/file.txt"), "--out"),
    # emit of a missing, corrupt, other-version or inconsistent plan.json
    ("emit-missing", ("emit", "{d}/nope.json", "--out", "{d}/run"), "plan"),
    ("emit-corrupt", ("emit", "{d}/plan_corrupt.json", "--out", "{d}/run"), "plan"),
    ("emit-list", ("emit", "{d}/plan_list.json", "--out", "{d}/run"), "plan"),
    ("emit-version", ("emit", "{d}/plan_v2.json", "--out", "{d}/run"), "format_version"),
    ("emit-extra-key", ("emit", "{d}/plan_extra.json", "--out", "{d}/run"), "extra_thing"),
    ("emit-recompute", ("emit", "{d}/plan_lr.json", "--out", "{d}/run"), "layer_recompute"),
    ("emit-stages", ("emit", "{d}/plan_stages.json", "--out", "{d}/run"), "stages"),
    ("emit-world", ("emit", "{d}/plan_world.json", "--out", "{d}/run"), "strategy"),
    ("emit-device", ("emit", "{d}/plan.json", "--out", "{d}/run", "--device", "tpu"), "device"),
    ("emit-time", ("emit", "{d}/plan.json", "--out", "{d}/run", "--time", "forever"), "time"),
    ("emit-account", ("emit", "{d}/plan.json", "--out", "{d}/run", "--account", "a b"), "account"),
    ("plan-from-corrupt", ("plan", "--from", "{d}/plan_corrupt.json", "--gpus", "4"), "plan"),
    # experts of a bad trace or impossible ranks
    ("experts-corrupt", ("experts", "{d}/trace_corrupt.json", "--ep", "2"), "trace"),
    ("experts-empty", ("experts", "{d}/trace_empty.json", "--ep", "2"), "num_layers"),
    ("experts-missing", ("experts", "{d}/nope.json", "--ep", "2"), "trace"),
    ("experts-a-plan", ("experts", "{d}/plan.json", "--ep", "2"), "num_layers"),
    ("experts-ep", ("experts", "{d}/trace.json", "--ep", "3"), "ep"),
    ("experts-ep-too-many", ("experts", "{d}/trace.json", "--ep", "16"), "ep"),
    ("experts-solver", ("experts", "{d}/trace.json", "--ep", "2", "--solver", "gurobi"), "solver"),
    ("experts-bytes", ("experts", "{d}/trace.json", "--ep", "2", "--bytes-per-token", "-5"), "--bytes-per-token"),
    ("experts-method", ("experts", "{d}/trace.json", "--ep", "2", "--method", "magic"), "method"),
    ("trace-topk", ("trace-routing", "--synthetic", "--experts", "8", "--topk", "9", "--out", "{d}/t.json"), "topk"),
    # checkpoints: missing, corrupt, of another model
    ("inspect-ckpt-missing", ("inspect-checkpoint", "{d}/nope"), "checkpoint"),
    ("inspect-ckpt-meta", ("inspect-checkpoint", "{d}/ck_meta"), "meta.json"),
    ("inspect-ckpt-index", ("inspect-checkpoint", "{d}/ck_index"), ".metadata"),
    ("inspect-ckpt-train", ("inspect-checkpoint", "{d}/ck_train"), "train_state.pt"),
    ("inspect-ckpt-index-corrupt", ("inspect-checkpoint", "{d}/ck_index_bad"), ".metadata does not load"),
    ("inspect-ckpt-train-corrupt", ("inspect-checkpoint", "{d}/ck_state_bad"), "train_state.pt does not load"),
    ("reshard-train", ("reshard", "{d}/ck_train", "--to", "{d}/plan.json", "--out", "{d}/o"), "train_state.pt"),
    ("reshard-missing", ("reshard", "{d}/nope", "--to", "{d}/plan.json", "--out", "{d}/o"), "checkpoint"),
    ("reshard-meta", ("reshard", "{d}/ck_meta", "--to", "{d}/plan.json", "--out", "{d}/o"), "meta.json"),
    ("reshard-plan", ("reshard", "{d}/ck_vocab", "--to", "{d}/plan_v2.json", "--out", "{d}/o"), "format_version"),
    ("reshard-mismatch", ("reshard", "{d}/ck_vocab", "--to", "{d}/plan.json", "--out", "{d}/o"), "vocabulary"),
    # profile, profile-comm, validate
    ("profile-device", ("profile", "gpt-tiny", "--device", "tpu", "--out", "{d}/p.json"), "--device"),
    ("profile-alias", ("profile", "gpt-tiny", "--alias", "", "--out", "{d}/p.json"), "--alias"),
    ("profile-dtype", ("profile", "gpt-tiny", "--dtype", "fp7", "--out", "{d}/p.json"), "--dtype"),
    ("comm-backend", ("profile-comm", "--nproc", "2", "--backend", "mpi", "--out", "{d}/c.yaml"), "--backend"),
    ("comm-gpu", ("profile-comm", "--nproc", "2", "--gpu", "z9000", "--out", "{d}/c.yaml"), "gpu"),
    ("validate-strategies-missing", ("validate", "gpt-tiny", "--nproc", "1", "--strategies", "{d}/nope.txt",
                                     "--out", "{d}/v"), "--strategies"),
    ("validate-strategies-line", ("validate", "gpt-tiny", "--nproc", "1", "--strategies", "{d}/strategies.txt",
                                  "--out", "{d}/v"), "--strategies"),
    ("validate-device", ("validate", "gpt-tiny", "--nproc", "1", "--device", "tpu", "--out", "{d}/v"), "--device"),
    ("validate-runtime", ("validate", "gpt-tiny", "--nproc", "1", "--runtime", "jax", "--out", "{d}/v"), "--runtime"),
]


def _listing(d: Path) -> set[str]:
    return {str(p.relative_to(d)) for p in d.rglob("*")}


@pytest.mark.parametrize("argv,field", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_exit_2_and_nothing_written(folder, capsys, argv, field):
    before = _listing(folder)
    with pytest.raises(SystemExit) as exc:
        main([a.format(d=folder) for a in argv])
    err = capsys.readouterr().err
    assert exc.value.code == 2, err
    assert "Traceback" not in err and err.startswith("error: ") and err.count("\n") == 1, err
    assert field in err, err
    assert _listing(folder) == before   # no output, no temporary file left behind


@pytest.mark.parametrize("argv", [("plan", "gpt-tiny", "--out", "{d}/file.txt/plan.json", "--json"),   # click's
                                  ("plan", "gpt-tiny", "--max-tp", "0", "--json"),
                                  ("estimate", "no-such-model", "--strategy", "dp=-1", "--json")])   # the command's
def test_with_json_stdout_holds_the_error_object_too(folder, capsys, argv):
    with pytest.raises(SystemExit) as exc:
        main([a.format(d=folder) for a in argv])
    out, err = capsys.readouterr()
    obj = json.loads(out)
    assert exc.value.code == obj["exit_code"] == 2 and obj["error"] == "input"
    assert err == f"error: {obj['message']}\n" and obj["reasons"]
