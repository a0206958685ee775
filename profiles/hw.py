"""GPU (and CPU) hardware profiles and cluster presets, loaded from data files.

Profiles live in ``profiles/hardware/<name>.yaml`` (or ``.json``, e.g. the measured
``cpu-*.json`` the profiler writes); cluster presets in ``profiles/hardware/cluster-<name>.yaml``.
Every number in a profile names where it comes from in ``sources`` (keys = field names;
``REQUIRED_SOURCES`` lists the ones that must be present). Peak FLOP/s are DENSE tensor
numbers (vendor sheets often print the 2:4-sparsity figure, which is 2x).

Efficiency curves are data, never constants in code: an ``EffCurve`` is a list of
``[x, eff]`` points, interpolated piecewise-linearly in log10(x) and clamped at both ends.

- ``matmul_eff``: x = FLOPs of one GEMM call (2*m*n*k); eff = fraction of ``peak_tflops``.
- ``membound_eff``: x = bytes one memory-bound op moves; eff = fraction of ``mem_bw_gbps``.
- ``attention_eff``: x = FLOPs of one attention-core call (fused SDPA); fraction of peak.
"""

from __future__ import annotations

import itertools
import json
import math
from importlib import resources
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, RootModel, ValidationError, model_validator

from autopar.errors import InputError
from autopar.profiles.cluster import ClusterSpec

Precision = Literal["fp32", "tf32", "bf16", "fp16", "fp8"]
CurveName = Literal["matmul", "membound", "attention"]
REQUIRED_SOURCES = ("peak_tflops", "mem_capacity_bytes", "mem_bw_gbps", "framework_overhead_bytes",
                    "usable_mem_fraction", "matmul_eff", "membound_eff", "attention_eff")
CLUSTER_PREFIX = "cluster-"
# GPU profile name prefix -> cluster preset used by default_cluster_for_gpu (first match wins).
GPU_TO_CLUSTER = (("a100", "dgx-a100"), ("h100", "dgx-h100"), ("h200", "dgx-h200"),
                  ("h800", "h800"), ("cpu", "cpu"))


class EffCurve(RootModel[list[tuple[float, float]]]):
    """``[[x, eff], ...]`` with x > 0 increasing and 0 < eff <= 1."""

    @model_validator(mode="after")
    def _check(self) -> EffCurve:
        pts = self.root
        if not pts:
            raise ValueError("an efficiency curve needs at least one [x, eff] point")
        if any(x <= 0 for x, _ in pts) or any(b[0] <= a[0] for a, b in itertools.pairwise(pts)):
            raise ValueError("curve x values must be positive and strictly increasing")
        if any(not 0 < e <= 1 for _, e in pts):
            raise ValueError("curve efficiencies must lie in (0, 1]")
        return self

    def at(self, x: float) -> float:
        """Piecewise-linear in log10(x), clamped outside the first/last point."""
        pts = self.root
        if x <= pts[0][0]:
            return pts[0][1]
        if x >= pts[-1][0]:
            return pts[-1][1]
        lx = math.log10(x)
        for (x0, e0), (x1, e1) in itertools.pairwise(pts):
            if x <= x1:
                t = (lx - math.log10(x0)) / (math.log10(x1) - math.log10(x0))
                return e0 + t * (e1 - e0)
        return pts[-1][1]  # unreachable: x < pts[-1][0] is inside some segment


class GpuProfile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    description: str = ""
    aliases: list[str] = Field(default_factory=list, description="other names load_gpu_profile accepts")
    peak_tflops: dict[Precision, float] = Field(..., description="dense tensor-core TFLOP/s per precision")
    mem_capacity_bytes: int = Field(..., gt=0)
    mem_bw_gbps: float = Field(..., gt=0, description="HBM (or DRAM) bandwidth, GB/s")
    framework_overhead_bytes: int = Field(
        ..., ge=0, description="CUDA context + NCCL buffers + cuBLAS workspace, never available to tensors")
    usable_mem_fraction: float = Field(
        ..., gt=0, le=1, description="fraction of the rest the caching allocator can fill (fragmentation)")
    host_link_gbps: float | None = Field(
        None, gt=0, description="achievable GPU<->host copy bandwidth per GPU, GB/s per direction (PCIe)")
    host_optimizer_gbps: float | None = Field(
        None, gt=0, description="host memory bandwidth one GPU's share of the CPU gets for an offloaded Adam step")
    fused_elementwise: bool = Field(
        True, description="chains of elementwise ops run as one kernel (Megatron fused softmax / bias-GeLU / "
                          "bias-dropout-add, torch.compile); false for eager PyTorch on CPU")
    matmul_eff: EffCurve
    membound_eff: EffCurve
    attention_eff: EffCurve
    sources: dict[str, str] = Field(..., description="field -> where its value comes from")
    # ----- written by `autopar profile` / `autopar profile-comm` (measured profiles only) -----
    cores: int | None = Field(None, ge=1, description="CPU cores the ranks of one node share (None: a GPU)")
    threads_per_rank: int = Field(1, ge=1, description="torch intra-op threads of one rank (CPU)")
    measured_ops: dict[str, list[float]] = Field(
        default_factory=dict, description="op signature -> [forward s, backward s, relative spread]")
    comm_fits: list[dict] = Field(
        default_factory=list, description="measured collective fits (cost_models.comm.CommFit fields)")
    op_overhead_s: float = Field(
        0.0, ge=0, description="host time a training step spends per captured op and micro-batch beyond the "
                               "op's own price (module calls, autograd bookkeeping, allocation; forward + "
                               "backward); 0 where the host runs ahead of the device (GPUs)")
    shared_core_sync_s: float = Field(
        0.0, ge=0, description="wall time a blocking collective or send/receive costs when the node's ranks "
                               "share cores (its members wait to be scheduled together); 0 for GPUs")
    dtensor_call_overhead_s: float = Field(
        0.0, ge=0, description="host CPU time DTensor adds to one tensor-parallel module call, forward + "
                               "backward (sharding propagation, redistribution in Python); 0 where the host "
                               "runs ahead of the device (GPUs)")
    meta: dict = Field(default_factory=dict, description="how it was measured: device, torch, dtype, "
                                                         "threads, date, command")

    @model_validator(mode="after")
    def _check_sources(self) -> GpuProfile:
        missing = [k for k in REQUIRED_SOURCES if not self.sources.get(k, "").strip()]
        if missing:
            raise ValueError(f"sources must name where each number comes from; missing: {', '.join(missing)}")
        if not self.peak_tflops or any(v <= 0 for v in self.peak_tflops.values()):
            raise ValueError("peak_tflops needs at least one positive entry")
        return self

    def peak_flops(self, precision: str = "bf16") -> float:
        """Dense peak in FLOP/s for ``precision``."""
        if precision not in self.peak_tflops:
            raise InputError(f"precision: {self.name} has no {precision} peak; "
                             f"known: {', '.join(self.peak_tflops)}")
        return self.peak_tflops[precision] * 1e12

    @property
    def mem_bw_bytes_per_s(self) -> float:
        return self.mem_bw_gbps * 1e9

    @property
    def usable_mem_bytes(self) -> int:
        """Bytes tensors may use: (capacity - framework overhead) * usable fraction."""
        return int((self.mem_capacity_bytes - self.framework_overhead_bytes) * self.usable_mem_fraction)

    def eff(self, curve_name: str, x: float) -> float:
        """Efficiency from curve ``matmul`` | ``membound`` | ``attention`` (``*_eff`` also accepted)."""
        key = curve_name if curve_name.endswith("_eff") else f"{curve_name}_eff"
        curve = getattr(self, key, None) if key in ("matmul_eff", "membound_eff", "attention_eff") else None
        if curve is None:
            raise InputError(f"curve: unknown efficiency curve '{curve_name}'; known: matmul, membound, attention")
        return curve.at(x)


# ----- file helpers -------------------------------------------------------------------
def _hardware_dir() -> Path:
    return Path(str(resources.files("autopar.profiles.hardware")))


def _read_mapping(path: Path, what: str) -> dict:
    """YAML or JSON file -> dict, with one-line errors."""
    if not path.is_file():
        raise InputError(f"{what}: {path} does not exist")
    text = path.read_text()
    try:
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except json.JSONDecodeError as exc:
        raise InputError(f"{what}: {path} is not valid JSON (line {exc.lineno}: {exc.msg})") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}: " if mark is not None else ""
        raise InputError(f"{what}: {path} is not valid YAML ({where}{getattr(exc, 'problem', exc)})") from None
    if not isinstance(data, dict):
        raise InputError(f"{what}: {path} must hold a mapping of field: value")
    return data


def _validation_error(what: str, path: Path | str, exc: ValidationError) -> InputError:
    err = exc.errors()[0]
    loc = ".".join(str(x) for x in err["loc"])
    msg = err["msg"].removeprefix("Value error, ")
    return InputError(f"{what}: {path}: field '{loc}': {msg}" if loc else f"{what}: {path}: {msg}")


def _looks_like_path(name: str) -> bool:
    return Path(name).suffix in (".yaml", ".yml", ".json") or "/" in name or Path(name).is_file()


# ----- GPU profiles -------------------------------------------------------------------
def _builtin_profile_files() -> dict[str, Path]:
    """Built-in profile name -> file (cluster presets excluded)."""
    files = {}
    for p in sorted(_hardware_dir().iterdir()):
        if p.suffix in (".yaml", ".json") and not p.stem.startswith(CLUSTER_PREFIX):
            files[p.stem] = p
    return files


def list_gpu_profiles() -> list[str]:
    """Names of the built-in hardware profiles (including measured ``cpu-*.json`` ones)."""
    return list(_builtin_profile_files())


def _profile_from_file(path: Path) -> GpuProfile:
    data = _read_mapping(path, "gpu")
    try:
        return GpuProfile.model_validate(data)
    except ValidationError as exc:
        raise _validation_error("gpu", path, exc) from None


def _alias_index() -> dict[str, Path]:
    """Lower-case name or alias -> file of every built-in profile."""
    index = {}
    for stem, path in _builtin_profile_files().items():
        index[stem.lower()] = path
        for alias in _read_mapping(path, "gpu").get("aliases", []) or []:
            index.setdefault(str(alias).lower(), path)
    return index


def load_gpu_profile(name_or_path: str | Path) -> GpuProfile:
    """A built-in profile name or alias (``a100-80g``, ``h100``, ``cpu``...) or a YAML/JSON file."""
    name = str(name_or_path)
    files = _builtin_profile_files()
    if name.lower() in files:
        return _profile_from_file(files[name.lower()])
    if _looks_like_path(name):
        return _profile_from_file(Path(name))
    path = _alias_index().get(name.lower())
    if path is None:
        raise InputError(f"gpu: unknown hardware profile '{name}'; known: {', '.join(files)} "
                         "(or pass a path to a profile YAML/JSON)")
    return _profile_from_file(path)


# ----- clusters -----------------------------------------------------------------------
def list_cluster_presets() -> list[str]:
    return sorted(p.stem[len(CLUSTER_PREFIX):] for p in _hardware_dir().glob(f"{CLUSTER_PREFIX}*.yaml"))


def _preset_path(name: str) -> Path:
    key = name.lower().removeprefix(CLUSTER_PREFIX)
    path = _hardware_dir() / f"{CLUSTER_PREFIX}{key}.yaml"
    if not path.is_file():
        raise InputError(f"cluster: unknown cluster preset '{name}'; known: {', '.join(list_cluster_presets())} "
                         "(or pass a path to a cluster YAML)")
    return path


def _cluster_fields(name_or_path: str | Path) -> tuple[dict, Path]:
    """Raw fields of a preset or user file; a user file may say ``preset: NAME`` to inherit from one."""
    name = str(name_or_path)
    path = Path(name) if _looks_like_path(name) else _preset_path(name)
    data = _read_mapping(path, "cluster")
    base = data.pop("preset", None)
    if base is not None:
        inherited = _read_mapping(_preset_path(str(base)), "cluster")
        inherited.pop("description", None)
        data = _merge_one_level(inherited, data)
    return data, path


def _merge_one_level(base: dict, over: dict) -> dict:
    """Dict values merge key by key, so `intra_node: {latency_s: 2e-6}` keeps the preset's bandwidth."""
    merged = dict(base)
    for key, val in over.items():
        both = isinstance(val, dict) and isinstance(base.get(key), dict)
        merged[key] = {**base[key], **val} if both else val
    return merged


def _resolve_gpu_name(gpu: str, cluster_file: Path) -> str:
    """Keep built-in names; make a profile path relative to the cluster file absolute; check it loads."""
    if not _looks_like_path(gpu):
        load_gpu_profile(gpu)
        return gpu
    path = Path(gpu)
    if not path.is_absolute() and not path.is_file() and (cluster_file.parent / path).is_file():
        path = cluster_file.parent / path
    load_gpu_profile(path)
    return str(path)


def load_cluster(name_or_path: str | Path, nodes: int | None = None, gpus_per_node: int | None = None,
                 gpu: str | None = None) -> ClusterSpec:
    """A preset (``dgx-a100``, ``dgx-h100``, ``dgx-h200``, ``h800``, ``cpu``) or a user YAML/JSON file.

    ``nodes``, ``gpus_per_node`` and ``gpu`` override the file. A user file holds ClusterSpec
    fields and may start from a preset with ``preset: dgx-h100``.
    """
    data, path = _cluster_fields(name_or_path)
    overrides = {"nodes": nodes, "gpus_per_node": gpus_per_node, "gpu": gpu}
    data.update({k: v for k, v in overrides.items() if v is not None})
    try:
        spec = ClusterSpec.model_validate(data)
    except ValidationError as exc:
        raise _validation_error("cluster", path, exc) from None
    return spec.model_copy(update={"gpu": _resolve_gpu_name(spec.gpu, path)})


def cluster_preset_for_gpu(gpu_name: str) -> str:
    """The preset whose hardware matches a GPU profile (by the profile's canonical name; a
    measured CPU profile, one with ``cores``, of any name runs on the ``cpu`` preset)."""
    prof = load_gpu_profile(gpu_name)
    canonical = "cpu" if prof.cores is not None else prof.name.lower()
    for prefix, preset in GPU_TO_CLUSTER:
        if canonical.startswith(prefix):
            return preset
    raise InputError(f"gpu: no cluster preset matches hardware profile '{gpu_name}'; "
                     "pass a cluster YAML (--cluster FILE) naming its links")


def default_cluster_for_gpu(gpu_name: str, nodes: int = 1, gpus_per_node: int | None = None) -> ClusterSpec:
    """``--gpu h100-sxm --nodes 4 --gpus-per-node 8`` -> the matching preset with those sizes."""
    preset = cluster_preset_for_gpu(gpu_name)
    gpu = gpu_name if _looks_like_path(str(gpu_name)) else load_gpu_profile(gpu_name).name
    return load_cluster(preset, nodes=nodes, gpus_per_node=gpus_per_node, gpu=gpu)
