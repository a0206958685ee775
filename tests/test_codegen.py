"""``autopar emit``: generated files (lint, compile, launch script fields), emit-time errors,
and the runtime pieces that need no process group (data, positions, stages, memory, AC)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from helpers_plans import make_plan, parse_steps, reference_losses

from autopar.codegen import runtime as rt
from autopar.codegen.emit import FILES, emit
from autopar.codegen.runtime_mem import LiveTensorBytes
from autopar.core.plan import Plan
from autopar.errors import InputError
from autopar.profiles.intake import preset
from autopar.profiles.models import build_model

ROOT = Path(__file__).resolve().parents[1]
RUFF = Path(sys.executable).with_name("ruff")

# (model, world, strategy, nodes, extra make_plan kwargs): one plan per code path of emit
PLANS = {
    "dense_dp": ("gpt-tiny", 2, "dp=2", 1, {}),
    "zero1": ("gpt-tiny", 4, "dp=4,zero=1", 1, {}),
    "tp_sp_fsdp": ("llama-tiny", 8, "dp=4,tp=2,sp=1,zero=3,recompute=selective", 2, {}),
    "pp_interleaved": ("llama-tiny", 8, "pp=2,vpp=2,tp=2,schedule=interleaved,mbs=1", 2,
                       {"stages": [(0, 1), (1, 2), (2, 3), (3, 4)]}),
    "cp": ("llama-tiny", 4, "cp=2,dp=2,zero=2", 1, {}),
    "moe_ep": ("moe-tiny", 16, "dp=8,ep=4,pp=2,mbs=1", 4,
               {"global_batch": 32, "layer_recompute": ["full", "none", "selective", "full"]}),
    "mla": ("deepseek-tiny", 4, "tp=2,dp=2", 1, {}),
    "custom": ("helpers_plans:tiny_custom_lm", 2, "dp=2,zero=3,recompute=full", 1, {}),
}


def _emit(name: str, tmp_path: Path, device: str = "cuda") -> tuple[Plan, Path]:
    model, world, strategy, nodes, kw = PLANS[name]
    plan = make_plan(model, world, strategy, nodes=nodes, **kw)
    out = tmp_path / f"{name}-{device}"
    emit(plan, out, device)
    return plan, out


@pytest.fixture(scope="module")
def emitted(tmp_path_factory) -> dict[str, tuple[Plan, Path]]:
    root = tmp_path_factory.mktemp("emit")
    return {f"{n}-{d}": _emit(n, root, d) for n in PLANS for d in ("cuda", "cpu")}


# ----- generated files ----------------------------------------------------------------
def test_emit_writes_every_file(emitted):
    plan, out = emitted["moe_ep-cuda"]
    assert sorted(p.name for p in out.iterdir() if p.is_file()) == sorted(FILES)
    assert (out / "autopar_rt" / "runtime.py").is_file() and (out / "data" / "sample.bin").is_file()
    assert Plan.load(out / "plan.json") == plan
    for name in ("train.py", "launch_torchrun.sh", "launch_slurm.sbatch"):
        assert (out / name).stat().st_mode & 0o111, f"{name} is not executable"
    text = (out / "train.py").read_text()
    # the docstring holds the summary and the exact commands; the plan's knobs appear as constants
    assert "torchrun --nnodes=4 --nproc-per-node=4" in text and "sbatch launch_slurm.sbatch" in text
    assert "EXPERT_PLACEMENT = " in text and "RECOMPUTE = {0: 'full', 2: 'selective', 3: 'full'}" in text
    assert "rt.apply_ep(" in text and "rt.apply_pp(" in text and "rt.apply_tp(" not in text


def test_generated_files_pass_ruff_and_py_compile(emitted):
    outs = [str(out) for _, out in emitted.values()]
    # autopar_rt/ holds copies of autopar's linted runtime (imports renamed, so their order differs)
    res = subprocess.run([str(RUFF), "check", "--config", str(ROOT / "pyproject.toml"), "--extend-exclude",
                          "autopar_rt", *outs],
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr
    for out in outs:
        res = subprocess.run([sys.executable, "-m", "py_compile", str(Path(out) / "train.py")],
                             capture_output=True, text=True)
        assert res.returncode == 0, res.stderr


def test_launch_scripts_pass_bash_n(emitted):
    for _, out in emitted.values():
        for name in ("launch_torchrun.sh", "launch_slurm.sbatch"):
            res = subprocess.run(["bash", "-n", str(out / name)], capture_output=True, text=True)
            assert res.returncode == 0, f"{out / name}: {res.stderr}"


def _sbatch(text: str) -> dict[str, str]:
    rows = [line.split(None, 1)[1] for line in text.splitlines() if line.startswith("#SBATCH ")]
    pairs = (r.split("#", 1)[0].strip().lstrip("-").partition("=") for r in rows)  # flags (--exclusive) have no value
    return {k: v for k, _, v in pairs}


@pytest.mark.parametrize("name", ["tp_sp_fsdp", "moe_ep", "dense_dp"])
def test_sbatch_has_the_plan_layout(emitted, name):
    plan, out = emitted[f"{name}-cuda"]
    text = (out / "launch_slurm.sbatch").read_text()
    fields = _sbatch(text)
    assert int(fields["nodes"]) == plan.cluster.nodes
    assert int(fields["gpus-per-node"]) == plan.cluster.gpus_per_node
    assert fields["ntasks-per-node"] == "1"  # one torchrun per node, it starts the ranks
    assert {"job-name", "time", "output", "cpus-per-task"} <= set(fields)
    assert f"WORLD_SIZE={plan.cluster.world}" in text and f"NPROC_PER_NODE={plan.cluster.gpus_per_node}" in text
    assert "srun" in text and "torchrun" in text
    for var in ("SLURM_JOB_NODELIST", "SLURM_JOB_NUM_NODES", "SLURM_JOB_ID"):  # rendezvous from Slurm
        assert var in text
    cpu = _sbatch((emitted[f"{name}-cpu"][1] / "launch_slurm.sbatch").read_text())
    assert "gpus-per-node" not in cpu and int(cpu["cpus-per-task"]) == plan.cluster.gpus_per_node


@pytest.mark.parametrize("name", ["tp_sp_fsdp", "moe_ep", "dense_dp"])
def test_torchrun_script_has_the_plan_layout(emitted, name):
    plan, out = emitted[f"{name}-cuda"]
    text = (out / "launch_torchrun.sh").read_text()
    assert f"NNODES=${{NNODES:-{plan.cluster.nodes}}}" in text
    assert f"NPROC_PER_NODE=${{NPROC_PER_NODE:-{plan.cluster.gpus_per_node}}}" in text
    assert f"WORLD_SIZE={plan.cluster.world}" in text and "--node-rank" in text and "train.py" in text


@pytest.mark.parametrize("name", ["tp_sp_fsdp", "moe_ep", "dense_dp"])
def test_pytorchjob_has_the_plan_layout(emitted, name):
    plan, out = emitted[f"{name}-cuda"]
    job = yaml.safe_load((out / "pytorchjob.yaml").read_text())
    assert job["apiVersion"] == "kubeflow.org/v1" and job["kind"] == "PyTorchJob"
    assert job["metadata"]["name"] and job["metadata"]["labels"]["autopar/world-size"] == str(plan.cluster.world)
    spec = job["spec"]
    assert spec["nprocPerNode"] == str(plan.cluster.gpus_per_node)
    replicas = spec["pytorchReplicaSpecs"]
    # elastic jobs run workers only (no Master): the operator points rendezvous at worker 0
    assert set(replicas) == {"Worker"} and replicas["Worker"]["replicas"] == plan.cluster.nodes
    for role in replicas.values():
        (container,) = role["template"]["spec"]["containers"]
        command = " ".join(container["command"])
        assert container["image"] and "torchrun" in command and "train.py" in command
        assert container["resources"]["limits"]["nvidia.com/gpu"] == plan.cluster.gpus_per_node
    cpu = yaml.safe_load((emitted[f"{name}-cpu"][1] / "pytorchjob.yaml").read_text())
    limits = cpu["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert "nvidia.com/gpu" not in limits


def test_readme_lists_the_commands(emitted):
    _, out = emitted["tp_sp_fsdp-cuda"]
    text = (out / "README.md").read_text()
    assert "launch_torchrun.sh" in text and "sbatch launch_slurm.sbatch" in text and "pytorchjob.yaml" in text


def test_cpu_program_defaults_to_gloo(emitted):
    assert 'DEVICE = "cpu"' in (emitted["dense_dp-cpu"][1] / "train.py").read_text()
    assert 'DEVICE = "cuda"' in (emitted["dense_dp-cuda"][1] / "train.py").read_text()


# ----- emit-time errors -----------------------------------------------------------------
BAD_PLANS = [
    (lambda: make_plan("llama-tiny", 4, "tp=4"), "does not divide kv_heads=2"),
    (lambda: make_plan("gpt-tiny", 8, "tp=8"), "does not divide heads=4"),
    (lambda: make_plan("gpt-tiny", 2, "cp=2", seq_len=30), "divisible by 2*cp"),
    (lambda: make_plan("gpt-tiny", 2, "dp=2,ep=2"), "needs a mixture-of-experts model"),
    (lambda: make_plan("moe-tiny", 2, "dp=2,ep=2", expert_placement=[[[0, 1, 2, 3], [3, 4, 5, 6]]] * 3),
     "exactly once"),
    (lambda: make_plan("moe-tiny", 2, "dp=2,ep=2", expert_placement=[[[0, 1, 2, 3], [4, 5, 6, 7]]]), "3 MoE layers"),
    (lambda: make_plan("gpt-tiny", 4, "pp=4,mbs=4", global_batch=8), "1f1b needs at least pp=4 microbatches"),
    (lambda: make_plan("gpt-tiny", 2, "pp=2", stages=[(0, 1), (2, 4)]), "should start at 1"),
    (lambda: make_plan("gpt-tiny", 2, "pp=2", stages=[(0, 2), (2, 3)]), "cover 3 layers"),
    (lambda: make_plan("gpt-tiny", 3, "pp=3", stages=[(0, 2), (2, 2), (2, 4)]), "stage 1 holds no layer"),
    (lambda: make_plan("gpt-tiny", 2, "dp=2", layer_recompute=["full"]), "lists 1 layers"),
    (lambda: make_plan("helpers_plans:no_block_lm", 2, "dp=2"), "has no block list"),
    (lambda: make_plan("helpers_plans:image_model", 2, "dp=2"), "no nn.Embedding"),
    (lambda: make_plan("helpers_plans:tiny_custom_lm", 2, "tp=2"), "supports dp, zero stages and recompute"),
    (lambda: make_plan("helpers_plans:tiny_custom_lm", 2, "dp=2,recompute=selective"), "recompute=full"),
]


@pytest.mark.parametrize("build,message", BAD_PLANS)
def test_emit_refuses_what_cannot_run(tmp_path, build, message):
    with pytest.raises(InputError, match=message.replace("*", r"\*")) as err:
        emit(build(), tmp_path / "out", "cpu")
    assert "\n" not in err.value.message
    assert not (tmp_path / "out").exists()  # nothing half-written
    assert list(tmp_path.iterdir()) == []   # no temporary folder left behind


def test_emit_refuses_a_cluster_mismatch(tmp_path):
    plan = make_plan("gpt-tiny", 2, "dp=2")
    plan = plan.model_copy(update={"cluster": plan.cluster.model_copy(update={"gpus_per_node": 4})})
    with pytest.raises(InputError, match="cluster has 4"):
        emit(plan, tmp_path / "out", "cpu")


def test_emit_into_an_existing_folder_keeps_other_files(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "checkpoints").mkdir()
    (out / "notes.txt").write_text("mine")
    emit(make_plan("gpt-tiny", 2, "dp=2"), out, "cpu")
    assert (out / "notes.txt").read_text() == "mine" and (out / "checkpoints").is_dir()
    assert all((out / f).is_file() for f in FILES)
    assert [p.name for p in tmp_path.iterdir()] == ["run"]


def test_cli_emit(tmp_path, capsys):
    from autopar.cli.main import main

    plan_path = tmp_path / "plan.json"
    make_plan("llama-tiny", 4, "tp=2,dp=2").save(plan_path)
    main(["emit", str(plan_path), "--out", str(tmp_path / "out"), "--device", "cpu"])
    assert (tmp_path / "out" / "train.py").is_file()
    assert "torchrun --standalone --nproc-per-node=4" in capsys.readouterr().out
    make_plan("llama-tiny", 4, "tp=4").save(plan_path)
    with pytest.raises(SystemExit) as exc:
        main(["emit", str(plan_path), "--out", str(tmp_path / "bad")])
    assert exc.value.code == 2
    assert capsys.readouterr().err.startswith("error: strategy: tp=4")


# ----- runtime pieces ------------------------------------------------------------------
def test_synthetic_batch_depends_on_seed_and_step_only():
    a = rt.synthetic_batch(0, 3, 8, 16, 100)
    assert torch.equal(a, rt.synthetic_batch(0, 3, 8, 16, 100))
    assert not torch.equal(a, rt.synthetic_batch(0, 4, 8, 16, 100))
    assert not torch.equal(a, rt.synthetic_batch(1, 3, 8, 16, 100))
    assert a.shape == (8, 17) and int(a.max()) < 100


def test_token_file_windows_read_only_the_rows_asked(tmp_path):
    path = tmp_path / "t.bin"
    np.arange(1000, dtype=np.uint16).tofile(path)
    full = rt.make_sampler(str(path), 1000, 16, 8, seed=0).next_batch()
    part = rt.make_sampler(str(path), 1000, 16, 8, seed=0).next_batch(rows=slice(2, 4))
    assert torch.equal(part, full[2:4])
    assert torch.equal(full[:, 1:] - full[:, :-1], torch.ones(8, 16, dtype=torch.int64))  # contiguous windows


@pytest.mark.parametrize("cp", [1, 2, 4])
def test_cp_positions_partition_the_sequence_with_equal_causal_work(cp):
    seq = 32
    parts = [rt.cp_positions(seq, cp, r) for r in range(cp)]
    assert sorted(torch.cat(parts).tolist()) == list(range(seq))
    work = [int((p + 1).sum()) for p in parts]  # keys each query attends to
    assert len(set(work)) == 1


def test_even_stages():
    assert rt.even_stages(10, 4) == [(0, 3), (3, 6), (6, 8), (8, 10)]
    assert rt.even_stages(4, 4) == [(0, 1), (1, 2), (2, 3), (3, 4)]


def test_initial_values_equal_init_weights():
    spec = preset("moe-tiny")
    model = build_model(spec, "cpu")
    model.init_weights(7)
    values = dict(rt.initial_values(spec, 7))
    for name, p in model.named_parameters():
        assert torch.equal(p.detach(), values[name]), name


def test_live_tensor_bytes_tracks_allocation_free_and_resize():
    tracker = LiveTensorBytes()
    with tracker:
        a = torch.empty(1000, dtype=torch.float32)
        assert tracker.current == 4000
        b = a * 2
        assert tracker.current == 8000
        del b
        assert tracker.current == 4000
        a.untyped_storage().resize_(0)  # how FSDP2 frees unsharded parameters
        assert tracker.current == 0
        a.untyped_storage().resize_(400)
        assert tracker.current == 400
    assert tracker.peak == 8000


def test_selective_and_full_recompute_save_activation_memory():
    spec = preset("llama-tiny").model_copy(update={"max_seq_len": 128, "attention": "eager"})
    tokens = rt.synthetic_batch(0, 1, 2, 128, spec.vocab)
    after_forward, losses = {}, {}
    for mode in ("none", "selective", "full"):
        model = build_model(spec, "cpu")
        model.init_weights(0)
        rt.apply_ac(model, {i: mode for i in range(spec.layers)})
        names = {n.replace("._checkpoint_wrapped_module", "") for n, _ in model.named_parameters()}
        assert names == {n for n, _ in build_model(spec, "meta").named_parameters()}
        tracker = LiveTensorBytes()
        with tracker:
            loss = rt.lm_loss(model(tokens[:, :-1]), tokens[:, 1:])
            after_forward[mode] = tracker.current
            loss.backward()
        losses[mode] = loss.item()
    assert after_forward["full"] < after_forward["selective"] < after_forward["none"]
    assert losses["none"] == pytest.approx(losses["full"]) == pytest.approx(losses["selective"])


@pytest.mark.slow
def test_train_py_runs_as_a_single_process(tmp_path):
    # `python train.py` without torchrun: a world of one, the same losses as the reference
    out = tmp_path / "single"
    emit(make_plan("llama-tiny", 1, "dp=1,mbs=2,recompute=full"), out, "cpu")
    res = subprocess.run([sys.executable, str(out / "train.py"), "--steps", "2", "--lr", "1e-2", "--data", "synthetic",
                          "--warmup-steps", "0", "--lr-decay", "constant", "--grad-clip", "0"],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    rows = parse_steps(res.stdout)
    np.testing.assert_allclose([rows[1]["loss"], rows[2]["loss"]], reference_losses("llama-tiny", 2), rtol=1e-5)
