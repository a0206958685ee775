"""The launch scripts of a run directory: torchrun (single and multi node), SLURM, Kubeflow PyTorchJob.

Every script states the network the plan was priced with (per-GPU bandwidth inside and
between nodes) and runs ``train.py --preflight`` first, so a bad data file fails in one
line before any rank starts. SLURM: one ``torchrun`` per node (``srun --ntasks-per-node=1``)
with c10d rendezvous on the first node, ``--kill-on-bad-exit``, ``--requeue`` (train.py
resumes from the newest complete checkpoint), account/partition/time/exclusive from
``emit`` options, the NCCL / InfiniBand variables commented with what they do. PyTorchJob
(``kubeflow.org/v1``): image, working directory, GPU and RDMA resources, a shared-memory
volume, optional host networking, an elastic policy that restarts failed pods.
"""

from __future__ import annotations

import re
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from autopar.core.plan import Plan
from autopar.errors import InputError

TEMPLATES = Path(__file__).with_name("templates")


class LaunchOptions(BaseModel):
    """``autopar emit`` options that end up in the launch scripts."""

    model_config = ConfigDict(extra="forbid")

    account: str | None = Field(None, description="SLURM --account (charged project)")
    partition: str | None = Field(None, description="SLURM --partition")
    time_limit: str = Field("01:00:00", description="SLURM --time, [D-]HH:MM:SS")
    exclusive: bool = Field(True, description="SLURM --exclusive: whole nodes, no neighbours on the NICs")
    image: str = Field("REPLACE_WITH_YOUR_IMAGE", description="PyTorchJob container image (torch inside)")
    workdir: str = Field("/workspace/run", description="where the run directory is inside the container")
    host_network: bool = Field(False, description="PyTorchJob hostNetwork: NCCL on the node's NICs, no pod overlay")
    rdma_resource: str | None = Field(
        None, description="extended resource of the RDMA device plugin, e.g. rdma/ib (cuda only)")
    steps: int = Field(10, ge=1, description="--steps the scripts pass to train.py")


def _check(opts: LaunchOptions) -> None:
    if not re.fullmatch(r"(\d+-)?\d{1,2}(:\d{2}){0,2}", opts.time_limit):
        raise InputError(f"time: '{opts.time_limit}' is not a SLURM time; fix: HH:MM:SS or D-HH:MM:SS")
    for name in ("account", "partition", "image", "workdir", "rdma_resource"):
        value = getattr(opts, name)
        if value is not None and (not value or re.search(r"[\s\"'`$\\]", value)):
            raise InputError(f"{name.replace('_', '-')}: {value!r} holds spaces or quotes; fix: a plain name")


def _fill(template: str, **values) -> str:
    text = (TEMPLATES / template).read_text()
    for key, val in values.items():
        text = text.replace("{{" + key + "}}", str(val))
    if "{{" in text:
        raise RuntimeError(f"template {template}: unfilled placeholder near {text[text.index('{{'):][:40]!r}")
    return text


def network_line(plan: Plan) -> str:
    """The links the plan was priced with, in one line for the scripts' headers."""
    c = plan.cluster
    inter = f", between nodes {c.inter_node.bw_gbps:g} GB/s per GPU" if c.nodes > 1 else ""
    return f"inside a node {c.intra_node.bw_gbps:g} GB/s per GPU{inter} (cluster '{c.name}')"


def _unit(device: str) -> str:
    return "GPUs" if device == "cuda" else "CPU processes"


def job_name(plan: Plan) -> str:
    name = "".join(c if c.isalnum() else "-" for c in plan.model.name.lower()).strip("-") or "model"
    return f"autopar-{name}"[:52].rstrip("-")


def render_torchrun(plan: Plan, device: str, opts: LaunchOptions) -> str:
    c = plan.cluster
    return _fill("launch_torchrun.sh.tmpl", TITLE=plan.model.name, NODES=c.nodes, PROCS=c.gpus_per_node,
                 WORLD=c.world, UNIT=_unit(device), LAST_NODE=c.nodes - 1, NETWORK=network_line(plan))


def render_slurm(plan: Plan, device: str, opts: LaunchOptions) -> str:
    _check(opts)
    c = plan.cluster
    lines = [f"#SBATCH --time={opts.time_limit}"]
    lines += [f"#SBATCH --account={opts.account}"] if opts.account else []
    lines += [f"#SBATCH --partition={opts.partition}"] if opts.partition else []
    lines += ["#SBATCH --exclusive"] if opts.exclusive else []
    lines += [f"#SBATCH --gpus-per-node={c.gpus_per_node}"] if device == "cuda" else []
    cpus = max(c.gpus_per_node * 4, 4) if device == "cuda" else c.gpus_per_node
    return _fill("launch_slurm.sbatch.tmpl", TITLE=plan.model.name, NODES=c.nodes, PROCS=c.gpus_per_node,
                 WORLD=c.world, UNIT=_unit(device), JOB=job_name(plan), SBATCH_LINES="\n".join(lines), CPUS=cpus,
                 NETWORK=network_line(plan), NCCL=_nccl_block(device, c.nodes))


def _nccl_block(device: str, nodes: int) -> str:
    if device != "cuda":
        return "# cpu plan: gloo over TCP, no NCCL settings"
    rows = [
        "# NCCL / InfiniBand (uncomment what your site needs; NCCL picks sensible defaults):",
        "# export NCCL_IB_HCA=mlx5            # which InfiniBand adapters NCCL may use (prefix match)",
        "# export NCCL_SOCKET_IFNAME=ib0,eth0 # interface for NCCL's bootstrap and TCP fallback",
        "# export NCCL_IB_GID_INDEX=3         # RoCE: the GID index carrying RoCEv2 (ask your admin)",
        "# export NCCL_NET_GDR_LEVEL=PHB      # GPUDirect RDMA when GPU and NIC share a PCIe host bridge",
        "# export NCCL_CROSS_NIC=0            # keep each ring on one NIC rail (rail-optimised fabrics)",
        "export NCCL_DEBUG=${NCCL_DEBUG:-WARN}  # INFO prints the transport chosen: check it says IB/RoCE, not Socket",
        "export TORCH_NCCL_ASYNC_ERROR_HANDLING=1  # a failed collective aborts the job instead of hanging it",
    ]
    if nodes > 1:
        rows.append("# The plan assumed RDMA between nodes: 'NET/Socket' in the NCCL_DEBUG=INFO log means TCP, "
                    "far slower than priced.")
    return "\n".join(rows)


def render_pytorchjob(plan: Plan, device: str, opts: LaunchOptions) -> str:
    _check(opts)
    c = plan.cluster
    roles = [("Worker", c.nodes)]  # elastic jobs: workers only, the operator points rendezvous at worker 0
    blocks = [_replica(role, n, plan, device, opts) for role, n in roles]
    elastic = (f"  elasticPolicy:\n    rdzvBackend: c10d\n    minReplicas: {c.nodes}\n    maxReplicas: {c.nodes}\n"
               f"    maxRestarts: 3  # failed pods restart; train.py resumes from the newest checkpoint\n")
    return _fill("pytorchjob.yaml.tmpl", TITLE=plan.model.name, NODES=c.nodes, PROCS=c.gpus_per_node, WORLD=c.world,
                 UNIT=_unit(device), JOB=job_name(plan), REPLICAS="\n".join(blocks), ELASTIC=elastic,
                 NETWORK=network_line(plan), WORKDIR=opts.workdir)


def _replica(role: str, n: int, plan: Plan, device: str, opts: LaunchOptions) -> str:
    procs = plan.cluster.gpus_per_node
    limits = [f"nvidia.com/gpu: {procs}"] if device == "cuda" else [f'cpu: "{procs}"']
    if opts.rdma_resource and device == "cuda":
        limits.append(f"{opts.rdma_resource}: 1")
    limit_text = "\n".join(f"                  {x}" for x in limits)
    host = "          hostNetwork: true\n          dnsPolicy: ClusterFirstWithHostNet\n" if opts.host_network else ""
    caps = ("              securityContext:\n                capabilities:\n                  add: [\"IPC_LOCK\"]"
            "  # RDMA pins memory\n") if opts.rdma_resource and device == "cuda" else ""
    cmd = (f'["sh", "-c", "python train.py --preflight && torchrun --nproc-per-node={procs} train.py '
           f'--steps {opts.steps}"]')
    return f"""    {role}:
      replicas: {n}
      restartPolicy: OnFailure
      template:
        spec:
{host}          containers:
            - name: pytorch
              image: {opts.image}
              imagePullPolicy: IfNotPresent
              workingDir: {opts.workdir}
              command: {cmd}
              resources:
                limits:
{limit_text}
{caps}              volumeMounts:
                - name: dshm
                  mountPath: /dev/shm
          volumes:
            - name: dshm  # NCCL and data loaders share memory; the container default (64 MiB) is too small
              emptyDir:
                medium: Memory"""
