"""The emitted training loop as people run it: data, LR schedule, clipping, metrics.

Fast checks of the runtime pieces (sampler, data errors, schedule, MFU basis, the pydantic-free
model spec) and one 4-rank torchrun launch (tests/codegen_harness.py) where DP, FSDP, ZeRO-1
with TP, TP, PP (tied embeddings across the pipeline ends; 4 stages) and EP programs train with warm-up + cosine decay
and active gradient clipping; their loss and global gradient norm at every step must equal a
single process with ``torch.nn.utils.clip_grad_norm_`` (the norm before clipping is logged; the
next step's loss depends on the clipped update, so equal losses mean equal updated weights).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers_plans import make_plan, reference_losses

from autopar.cli.main import main
from autopar.codegen import runtime as rt
from autopar.codegen.emit import default_lr, emit
from autopar.codegen.emit_vendor import vendored_runtime
from autopar.codegen.runtime_metrics import mfu, tflops_per_gpu
from autopar.codegen.runtime_optim import lr_lambda
from autopar.codegen.runtime_spec import RunSpec
from autopar.codegen.sample_data import ALPHABET, sample_bytes
from autopar.core.plan import Plan
from autopar.profiles.intake import preset

HARNESS = Path(__file__).with_name("codegen_harness.py")
TORCHRUN = Path(sys.executable).with_name("torchrun")


# ----- data ---------------------------------------------------------------------------
def _bin(path: Path, values, dtype=np.uint16) -> Path:
    np.asarray(values, dtype=dtype).tofile(path)
    return path


def test_sampler_is_deterministic_resumable_and_split_by_rows(tmp_path):
    path = _bin(tmp_path / "t.bin", np.arange(2000) % 500)
    a = rt.make_sampler(str(path), 500, 16, 8, seed=3)
    first = [a.next_batch() for _ in range(3)]
    state = a.state_dict()
    after = a.next_batch()
    b = rt.make_sampler(str(path), 500, 16, 8, seed=3)
    b.load_state_dict(state)
    assert torch.equal(b.next_batch(), after)  # a restart goes on with the next unseen windows
    c = rt.make_sampler(str(path), 500, 16, 8, seed=3)
    halves = [torch.cat([c.next_batch(slice(0, 4)), c.next_batch(slice(4, 8))]) for _ in range(1)]
    assert not torch.equal(halves[0], first[0])  # each next_batch is a new step, rows or not
    d = rt.make_sampler(str(path), 500, 16, 8, seed=3)
    assert torch.equal(d.next_batch(slice(2, 4)), first[0][2:4])
    windows = torch.cat(first)  # 124 windows per epoch: 24 distinct starts in 3 steps
    assert len({int(w[0]) for w in windows}) == 24 and windows.shape == (24, 17)


def test_shard_folder_reads_every_shard(tmp_path):
    folder = tmp_path / "shards"
    folder.mkdir()
    _bin(folder / "a.bin", np.full(170, 7))
    _bin(folder / "b.bin", np.full(170, 9))
    s = rt.make_sampler(str(folder), 10, 16, 20, seed=0)  # 2 x 10 windows: one epoch per step
    assert s.windows == 20 and sorted(set(s.next_batch().flatten().tolist())) == [7, 9]


@pytest.mark.parametrize("case, expect", [
    ("missing", "no such file"), ("truncated", "not a whole number"), ("wide", "looks like 32-bit"),
    ("range", "outside the vocabulary"), ("short", "fewer than seq_len"), ("empty_dir", "no *.bin shards")])
def test_bad_data_is_one_line(tmp_path, case, expect):
    path = tmp_path / "d.bin"
    if case == "truncated":
        path.write_bytes(b"\x01\x00" * 100 + b"\x01")
    elif case == "wide":
        _bin(path, np.arange(1, 1000) % 300, np.uint32)
    elif case == "range":
        _bin(path, [5] * 100 + [900])
    elif case == "short":
        _bin(path, [1] * 10)
    elif case == "empty_dir":
        path.mkdir()
    with pytest.raises(rt.DataError) as exc:
        rt.make_sampler(str(path), 512, 16, 4, seed=0)
    assert expect in str(exc.value) and "fix:" in str(exc.value) and "\n" not in str(exc.value)


def test_train_py_refuses_bad_data_before_any_rank_starts(tmp_path):
    out = tmp_path / "run"
    emit(make_plan("gpt-tiny", 2, "dp=2"), out, "cpu")
    (tmp_path / "bad.bin").write_bytes(b"\x01\x00\x02")
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    res = subprocess.run(["bash", str(out / "launch_torchrun.sh"), "--data", str(tmp_path / "bad.bin")],
                         capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 2
    assert res.stderr.strip().count("\n") == 0 and res.stderr.startswith("error: --data ")
    assert "torch.distributed" not in res.stderr + res.stdout  # torchrun never started


def test_sample_is_learnable_text_over_a_small_alphabet():
    data, text = sample_bytes(4096)
    tokens = np.frombuffer(data, dtype=np.uint16)
    assert len(tokens) == len(text) == 1 << 16 and tokens.max() < len(ALPHABET)
    assert "the " in text and text.count(".") > 1000  # sentences of the grammar
    assert np.frombuffer(sample_bytes(70000)[0], dtype=np.uint32).max() < len(ALPHABET)  # wide vocab: uint32


# ----- optimizer ----------------------------------------------------------------------
def test_lr_follows_warmup_then_cosine_or_linear_decay():
    assert [lr_lambda(i, 4, 20) for i in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_lambda(12, 4, 20) == pytest.approx(0.1 + 0.9 * 0.5)  # half-way down the cosine
    assert lr_lambda(20, 4, 20) == pytest.approx(0.1) and lr_lambda(50, 4, 20) == pytest.approx(0.1)
    assert lr_lambda(12, 4, 20, "linear") == pytest.approx(0.55)
    assert lr_lambda(12, 4, 20, "constant") == 1.0
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))], lr=1e-3)
    (sched,) = rt.make_schedulers([opt], 3, 10, "cosine", 0.1)
    seen = []
    for _ in range(12):  # the lr each optimizer step uses, as train.py logs it
        seen.append(rt.current_lr([opt]))
        opt.step()
        sched.step()
    assert seen == pytest.approx([1e-3 * lr_lambda(i, 3, 10, "cosine", 0.1) for i in range(12)])


def test_default_lr_follows_published_recipes():
    assert default_lr(1.07e7) == 1e-3 and default_lr(1.25e8) == 6e-4 and default_lr(1.75e11) == 6e-5
    assert 1.2e-4 > default_lr(1e10) > 1e-4  # between 6.7B and 13B, log-log


# ----- metrics ------------------------------------------------------------------------
def test_mfu_is_estimates_definition():
    from autopar.cost_models.estimate import Estimate

    # Estimate.mfu / tflops_per_gpu: model (hardware) FLOPs / step time / world (/ dense peak)
    e = type("E", (), {"model_flops": 6e15, "hardware_flops": 8e15, "step_time_s": 2.0, "world": 8,
                       "peak_flops": 1e15})()
    assert Estimate.mfu.fget(e) == mfu(6e15, 2.0, 8, 1e15)
    assert Estimate.tflops_per_gpu.fget(e) == tflops_per_gpu(8e15, 2.0, 8)
    assert math.isnan(mfu(0.0, 1.0, 8, 1e15))  # a plan without predictions


def test_metrics_interval_means_and_jsonl(tmp_path, capsys):
    basis = rt.FlopBasis(model_flops_per_step=8e9, hardware_flops_per_step=1e10, peak_flops_per_gpu=1e11)
    log = rt.MetricsLogger(2, tokens_per_step=100, world=2, basis=basis, metrics_file=str(tmp_path / "m.jsonl"))
    rows = [log.record(step, torch.tensor(100.0 * step), True, 1e-3, torch.tensor(0.5), 0.1 * step, 10 * step)
            for step in range(1, 5)]
    log.close()
    assert rows[0] is None and rows[2] is None  # one line per interval of 2 steps
    assert rows[1]["loss"] == pytest.approx(1.5) and rows[3]["loss"] == pytest.approx(3.5)
    assert rows[3]["step_time_s"] == pytest.approx(0.35) and rows[3]["peak_mem_bytes"] == 40
    assert rows[3]["mfu"] == pytest.approx(8e9 / (0.35 * 2 * 1e11))
    assert [json.loads(line)["step"] for line in (tmp_path / "m.jsonl").read_text().splitlines()] == [2, 4]
    assert "step=4 loss=3.5 " in capsys.readouterr().out


def test_profiler_traces_only_the_chosen_steps(tmp_path):
    prof = rt.StepProfiler(rt.parse_step_list("2"), tmp_path)
    for step in (1, 2, 3):
        with prof.step(step):
            torch.ones(8) @ torch.ones(8)
    assert [p.name for p in tmp_path.iterdir()] == ["trace_step2_rank0.json"]


def test_vendored_runtime_refuses_a_module_importing_autopar():
    from autopar.codegen.emit_vendor import _check_closure

    _check_closure("ok.py", "import torch\ndef f():\n    import autopar.cost_models\n")  # lazy: fine
    with pytest.raises(RuntimeError, match="would import autopar.core.plan"):
        _check_closure("bad.py", "import torch\nfrom autopar.core.plan import Plan\n")


# ----- the plan's model without pydantic ----------------------------------------------
@pytest.mark.parametrize("name", ["gpt-tiny", "llama-tiny", "moe-tiny", "deepseek-tiny", "llama3-70b"])
def test_run_spec_matches_model_spec(name):
    spec = preset(name)
    ns: dict = {}
    exec(compile(vendored_runtime()["autopar_rt/runtime_spec.py"], "runtime_spec", "exec"), ns)
    for cls in (RunSpec, ns["RunSpec"]):  # inside autopar, and the run directory's copy
        run = cls(**json.loads(spec.model_dump_json()))
        for prop in ("is_moe", "moe_layers", "shared_width", "resolved_norm", "resolved_mlp"):
            if hasattr(spec, prop):
                assert getattr(run, prop) == getattr(spec, prop), prop
        assert [run.is_moe_layer(i) for i in range(spec.layers)] == [spec.is_moe_layer(i) for i in range(spec.layers)]
        assert run.short() == spec.short()


# ----- clipping and schedule on 4 ranks against one process ---------------------------
CLIP, WARMUP, STEPS = 0.5, 1, 3
TIED = {"spec_update": {"tie_embeddings": True}}
CASES = {
    "dp": ("gpt-tiny", "dp=4", {}),
    "fsdp": ("gpt-tiny", "dp=4,zero=3", {}),
    "zero1_tp": ("llama-tiny", "dp=2,tp=2,sp=1,zero=1", {}),  # ShardedAdamW: clipping sees reduced slices
    "tp": ("llama-tiny", "dp=2,tp=2,sp=1", {}),
    "pp_tied": ("gpt-tiny", "dp=2,pp=2,mbs=1", TIED),
    "pp4": ("gpt-tiny", "pp=4,mbs=1", {}),  # middle stages read no tokens
    "ep": ("moe-tiny", "dp=4,ep=2", {}),
}


@pytest.fixture(scope="module")
def clipped_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("clip")
    jobs = []
    for name, (model, strategy, kw) in CASES.items():
        emit(make_plan(model, 4, strategy, **kw), root / name, "cpu")
        jobs.append({"name": name, "dir": str(root / name), "args": [
            "--steps", str(STEPS), "--lr", "1e-2", "--data", "synthetic", "--grad-clip", str(CLIP),
            "--warmup-steps", str(WARMUP), "--lr-decay", "cosine", "--timeout", "60",
            "--metrics-file", str(root / f"{name}.jsonl")]})
    # a plan from the planner: its predictions carry the FLOP basis the logged MFU uses
    main(["plan", "gpt-tiny", "--gpu", "cpu", "--gpus-per-node", "4", "--seq-len", "32", "--global-batch", "8",
          "--out", str(root / "plan.json")])
    emit(Plan.load(root / "plan.json"), root / "planned", "cpu")
    jobs.append({"name": "planned", "dir": str(root / "planned"), "args": [
        "--steps", "2", "--timeout", "60", "--metrics-file", str(root / "planned.jsonl")]})
    (root / "jobs.json").write_text(json.dumps(jobs))
    path = os.pathsep.join(filter(None, [str(Path(__file__).parent), os.environ.get("PYTHONPATH")]))
    env = dict(os.environ, OMP_NUM_THREADS="1", HARNESS_TIMEOUT="60", PYTHONPATH=path)
    proc = subprocess.run([str(TORCHRUN), "--standalone", "--nproc-per-node=4", str(HARNESS), str(root / "jobs.json")],
                          capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    runs = {name: [json.loads(line) for line in (root / f"{name}.jsonl").read_text().splitlines()]
            for name in [*CASES, "planned"]}
    return runs | {"__plan__": Plan.load(root / "plan.json")}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CASES))
def test_clipped_training_matches_one_process(clipped_runs, name):
    model, _, kw = CASES[name]
    norms: list[float] = []
    ref = reference_losses(model, STEPS, lr=1e-2, spec_update=kw.get("spec_update"), grad_clip=CLIP,
                           warmup_steps=WARMUP, decay="cosine", norms=norms)
    rows = clipped_runs[name]
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    np.testing.assert_allclose([r["loss"] for r in rows], ref, rtol=1e-4, err_msg=f"{name}: loss")
    np.testing.assert_allclose([r["grad_norm"] for r in rows], norms, rtol=1e-4, err_msg=f"{name}: grad norm")
    assert min(norms) > CLIP  # clipping was active at every step
    expect_lr = [1e-2 * lr_lambda(i, WARMUP, STEPS) for i in range(STEPS)]
    np.testing.assert_allclose([r["lr"] for r in rows], expect_lr, rtol=1e-6)


@pytest.mark.slow
def test_logged_mfu_is_estimates_definition_on_the_measured_time(clipped_runs):
    plan, rows = clipped_runs["__plan__"], clipped_runs["planned"]
    p, world = plan.predictions, plan.cluster.world
    # the plan's own figures are estimate's: MFU = model FLOPs / (step time x world x peak)
    assert p["mfu"] == pytest.approx(p["model_flops_per_step"] / (p["step_time_s"] * world * p["peak_flops_per_gpu"]))
    for r in rows:
        t = r["step_time_s"]
        assert r["mfu"] == pytest.approx(p["model_flops_per_step"] / (t * world * p["peak_flops_per_gpu"]), rel=1e-9)
        assert r["tflops_per_gpu"] == pytest.approx(p["hardware_flops_per_step"] / t / world / 1e12, rel=1e-9)
        assert r["tokens_per_s"] == pytest.approx(plan.strategy.global_batch * plan.seq_len / t, rel=1e-9)
        assert r["pred_mfu"] == p["mfu"] and r["pred_step_time_s"] == p["step_time_s"]
        assert r["peak_mem_bytes"] > 0 or r["step"] > 1  # cpu: live tensor bytes (first step at least)
