"""Launch scripts a cluster admin accepts, and a run directory that needs only torch.

``sbatch --test-only`` and a Kubeflow API server are not available here, so the generated
sbatch is parsed (its ``#SBATCH`` header and srun line) and checked with ``bash -n``, and the
PyTorchJob is loaded as YAML and checked against the fields of the ``kubeflow.org/v1``
PyTorchJob CRD it uses. The slow test copies an emitted run directory alone to another folder
and runs ``launch_torchrun.sh`` with a virtualenv holding only torch (built once per session).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from helpers_plans import make_plan

from autopar.cli.main import main
from autopar.codegen.emit import emit
from autopar.codegen.emit_launch import LaunchOptions
from autopar.core.cluster import ClusterSpec, LinkClass
from autopar.core.plan import Plan
from autopar.core.strategy import Strategy
from autopar.profiles.intake import preset

OPTS = LaunchOptions(account="proj42", partition="h100", time_limit="2-00:00:00", image="registry.local/train:1",
                     workdir="/job/run", host_network=True, rdma_resource="rdma/ib")
# fields of the kubeflow.org/v1 PyTorchJob CRD (training-operator v1 API) the generated job may use
SPEC_FIELDS = {"pytorchReplicaSpecs", "runPolicy", "elasticPolicy", "nprocPerNode"}
ELASTIC_FIELDS = {"minReplicas", "maxReplicas", "rdzvBackend", "rdzvPort", "rdzvHost", "rdzvId", "rdzvConf",
                  "standalone", "nProcPerNode", "maxRestarts", "metrics"}
RUN_POLICY_FIELDS = {"cleanPodPolicy", "ttlSecondsAfterFinished", "activeDeadlineSeconds", "backoffLimit",
                     "schedulingPolicy", "suspend", "managedBy"}
REPLICA_FIELDS = {"replicas", "template", "restartPolicy"}


def llama70b_4x8() -> Plan:
    cluster = ClusterSpec(name="dgx-h100", gpu="h100-sxm", nodes=4, gpus_per_node=8,
                          intra_node=LinkClass(bw_gbps=450, latency_s=3e-6),
                          inter_node=LinkClass(bw_gbps=48, latency_s=5e-6))
    strategy = Strategy.parse("dp=1,tp=8,pp=4,sp=1,mbs=1,gbs=32,zero=1,recompute=selective").resolve(32, 32)
    return Plan(model=preset("llama3-70b"), cluster=cluster, seq_len=4096, strategy=strategy)


@pytest.fixture(scope="module")
def run70b(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("l70") / "run"
    emit(llama70b_4x8(), out, "cuda", OPTS)
    return out


def test_sbatch_header_and_srun_line(run70b):
    text = (run70b / "launch_slurm.sbatch").read_text()
    assert subprocess.run(["bash", "-n", str(run70b / "launch_slurm.sbatch")]).returncode == 0
    header = dict(re.findall(r"^#SBATCH --([\w-]+)(?:=(\S+))?$", text, re.M))
    assert header["nodes"] == "4" and header["ntasks-per-node"] == "1" and header["gpus-per-node"] == "8"
    assert header["account"] == "proj42" and header["partition"] == "h100" and header["time"] == "2-00:00:00"
    assert "exclusive" in header and "requeue" in header
    # every #SBATCH line comes before the first command (sbatch stops reading at it)
    first_cmd = next(i for i, line in enumerate(text.splitlines()) if line and not line.startswith("#"))
    assert all(i < first_cmd for i, line in enumerate(text.splitlines()) if line.startswith("#SBATCH"))
    srun = text[text.index("srun "):]
    assert "--kill-on-bad-exit=1" in srun and "--rdzv-backend=c10d" in srun and "torch.distributed.run" in srun
    assert "48 GB/s per GPU" in text and "NCCL_IB_HCA" in text and "--preflight" in text


def test_pytorchjob_uses_only_crd_fields(run70b):
    job = yaml.safe_load((run70b / "pytorchjob.yaml").read_text())
    assert job["apiVersion"] == "kubeflow.org/v1" and job["kind"] == "PyTorchJob"
    spec = job["spec"]
    assert set(spec) <= SPEC_FIELDS and set(spec["elasticPolicy"]) <= ELASTIC_FIELDS
    assert set(spec["runPolicy"]) <= RUN_POLICY_FIELDS and spec["nprocPerNode"] == "8"
    assert spec["elasticPolicy"]["minReplicas"] == spec["elasticPolicy"]["maxReplicas"] == 4
    replicas = spec["pytorchReplicaSpecs"]
    assert set(replicas) <= {"Master", "Worker"} and sum(r["replicas"] for r in replicas.values()) == 4
    for r in replicas.values():
        assert set(r) <= REPLICA_FIELDS and r["restartPolicy"] in {"Always", "OnFailure", "Never", "ExitCode"}
        pod = r["template"]["spec"]
        assert pod["hostNetwork"] is True and pod["dnsPolicy"] == "ClusterFirstWithHostNet"
        (c,) = pod["containers"]
        assert c["name"] == "pytorch"  # the operator finds the training container by this name
        assert c["image"] == "registry.local/train:1" and c["workingDir"] == "/job/run"
        assert c["resources"]["limits"] == {"nvidia.com/gpu": 8, "rdma/ib": 1}
        assert "IPC_LOCK" in c["securityContext"]["capabilities"]["add"]
        mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
        vols = {v["name"]: v for v in pod["volumes"]}
        assert mounts["dshm"] == "/dev/shm" and vols["dshm"]["emptyDir"]["medium"] == "Memory"
    assert "48 GB/s per GPU" in (run70b / "pytorchjob.yaml").read_text()


def test_torchrun_script_single_and_multi_node(run70b, tmp_path):
    assert subprocess.run(["bash", "-n", str(run70b / "launch_torchrun.sh")]).returncode == 0
    text = (run70b / "launch_torchrun.sh").read_text()
    assert "NNODES=${NNODES:-4}" in text and "NODE_RANK=<0..3>" in text and "--rdzv-backend=c10d" in text
    res = subprocess.run(["bash", str(run70b / "launch_torchrun.sh")], env=dict(os.environ, NNODES="3"),
                         capture_output=True, text=True)
    assert res.returncode == 2 and "the plan needs 32 ranks" in res.stderr


@pytest.mark.parametrize("flag, value, field", [("--time", "soon", "time"), ("--account", "a b", "account")])
def test_bad_launcher_option_is_one_line(tmp_path, capsys, flag, value, field):
    plan = tmp_path / "plan.json"
    make_plan("gpt-tiny", 2, "dp=2").save(plan)
    with pytest.raises(SystemExit) as exc:
        main(["emit", str(plan), "--out", str(tmp_path / "out"), flag, value])
    assert exc.value.code == 2 and capsys.readouterr().err.startswith(f"error: {field}: ")
    assert not (tmp_path / "out").exists()


# ----- the run directory alone, with only torch ----------------------------------------
@pytest.fixture(scope="session")
def torch_only_python(tmp_path_factory) -> Path:
    """A virtualenv with torch and its own dependencies only: the distributions pip resolved for
    torch in this environment, linked into a fresh venv (a pip install of the wheel took 60 s of
    CI); pip installs them where a distribution's file list is missing."""
    venv = tmp_path_factory.getbasetemp() / "torch-only-venv"
    python = venv / "bin" / "python"
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
        site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                   capture_output=True, text=True, check=True).stdout.strip())
        dists = _requirement_closure("torch")
        if dists and all(d.files for d in dists):
            _link_distributions(dists, site)
        else:
            subprocess.run([str(python), "-m", "ensurepip", "-q"], check=True)
            res = subprocess.run([str(python), "-m", "pip", "install", "-q", f"torch=={_torch_version()}"],
                                 capture_output=True, text=True, timeout=900)
            if res.returncode:
                pytest.skip(f"cannot install torch into a clean venv here: {res.stderr[-300:]}")
    return python


def _requirement_closure(name: str) -> list | None:
    """``name``'s distribution and, recursively, those its requirements (no extras) name; None
    where one is not installed here."""
    from importlib import metadata

    from packaging.requirements import Requirement

    seen: dict = {}
    todo = [name]
    while todo:
        try:
            dist = metadata.distribution(todo.pop())
        except metadata.PackageNotFoundError:
            return None
        key = dist.metadata["Name"].lower().replace("_", "-")
        if key in seen:
            continue
        seen[key] = dist
        for text in dist.requires or []:
            req = Requirement(text)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                todo.append(req.name)
    return list(seen.values())


def _link_distributions(dists: list, site: Path) -> None:
    """Symlink every top-level file or folder each distribution installed into ``site``."""
    for dist in dists:
        for top in {f.parts[0] for f in dist.files} - {"..", "__pycache__"}:
            target = site / top
            if not target.exists():
                target.symlink_to(Path(dist.locate_file(top)).resolve())


def _torch_version() -> str:
    import torch

    return torch.__version__.split("+")[0]


@pytest.mark.slow
def test_run_directory_alone_runs_with_only_torch(torch_only_python, tmp_path):
    emitted = tmp_path / "emitted"
    emit(make_plan("gpt-tiny", 2, "dp=2,zero=3"), emitted, "cpu")
    alone = tmp_path / "elsewhere" / "run"
    shutil.copytree(emitted, alone)
    shutil.rmtree(emitted)
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "PYTHON": str(torch_only_python), "OMP_NUM_THREADS": "1"}
    res = subprocess.run(["bash", str(alone / "launch_torchrun.sh"), "--steps", "2", "--mem-steps", "1"],
                         capture_output=True, text=True, env=env, cwd="/", timeout=600)
    assert res.returncode == 0, (res.stdout + res.stderr)[-3000:]
    steps = [line for line in res.stdout.splitlines() if line.startswith("step=")]
    assert len(steps) == 2 and "loss=" in steps[0]
    # what train.py imports: torch and the standard library, its own autopar_rt, nothing of autopar
    probe = ("import runpy, sys; sys.argv = ['train.py', '--preflight']; "
             "runpy.run_path('train.py', run_name='__main__'); print(' '.join(m.split('.')[0] for m in sys.modules))")
    mods = subprocess.run([str(torch_only_python), "-c", probe], capture_output=True, text=True, env=env,
                          cwd=alone, timeout=300).stdout.split()
    assert "autopar_rt" in mods and "torch" in mods
    assert not {"autopar", "pydantic", "yaml", "scipy", "networkx", "typer", "rich"} & set(mods)


def test_emit_defaults_to_the_device_the_plan_was_priced_for(tmp_path):
    """A plan priced on CPU ranks (`plan --gpu cpu`) emits a gloo program without `--device`
    (it used to default to cuda and fail at `torch.cuda.set_device` on a CPU-only machine)."""
    from autopar.codegen.emit import plan_device

    assert plan_device(make_plan("gpt-tiny", 2, "dp=2")) == "cpu"
    assert plan_device(llama70b_4x8()) == "cuda"
    emit(make_plan("gpt-tiny", 2, "dp=2"), tmp_path / "cpu")
    emit(llama70b_4x8(), tmp_path / "gpu")
    assert 'DEVICE = "cpu"' in (tmp_path / "cpu" / "train.py").read_text()
    assert 'DEVICE = "cuda"' in (tmp_path / "gpu" / "train.py").read_text()
    emit(make_plan("gpt-tiny", 2, "dp=2"), tmp_path / "forced", "cuda")   # an explicit --device wins
    assert 'DEVICE = "cuda"' in (tmp_path / "forced" / "train.py").read_text()
