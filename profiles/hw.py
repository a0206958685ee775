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

import hashlib
import json
from pathlib import Path

from pydantic import ValidationError

from autopar.core.cluster import ClusterSpec
from autopar.core.gpu import GpuProfile
from autopar.errors import InputError, first_error

CLUSTER_PREFIX = "cluster-"
# GPU profile name prefix -> cluster preset used by default_cluster_for_gpu (first match wins).
GPU_TO_CLUSTER = (("a100", "dgx-a100"), ("h100", "dgx-h100"), ("h200", "dgx-h200"),
                  ("h800", "h800"), ("cpu", "cpu"))


_HARDWARE_DIR = Path(__file__).with_name("hardware")
YAML_NAMESPACE = "yaml-v1"   # the capture cache's JSON copies of parsed YAML files (_parse_yaml)


# ----- file helpers -------------------------------------------------------------------
def _hardware_dir() -> Path:
    # the package's folder, as importlib.resources.files would give it for an installed (unzipped) autopar,
    # without importing importlib.resources' readers (5 ms of a warm plan; intake reads hf_presets.json so too)
    return _HARDWARE_DIR


def _read_mapping(path: Path, what: str) -> dict:
    """YAML or JSON file -> dict, with one-line errors."""
    if not path.is_file():
        raise InputError(f"{what}: {path} does not exist")
    text = path.read_text()
    try:
        data = json.loads(text) if path.suffix == ".json" else _parse_yaml(text, path, what)
    except json.JSONDecodeError as exc:
        raise InputError(f"{what}: {path} is not valid JSON (line {exc.lineno}: {exc.msg})") from None
    if not isinstance(data, dict):
        raise InputError(f"{what}: {path} must hold a mapping of field: value")
    return data


def _parse_yaml(text: str, path: Path, what: str) -> object:
    """YAML text -> data, read back from the capture cache's JSON copy of an earlier parse of the
    same text (keyed by its SHA-256; ``profiles.capture_cache``): a warm ``plan`` reads six profile
    files and then neither imports PyYAML (0.02 s) nor parses them (2 ms each). Data that JSON
    would not give back equal (dates, non-string keys) is not copied: parsed every time."""
    from autopar.profiles import capture_cache

    key = {"sha256": hashlib.sha256(text.encode()).hexdigest()}
    hit = capture_cache.lookup(YAML_NAMESPACE, key, redo="parsing the YAML again")
    if hit is not None:
        return hit[0]
    data = _yaml_load(text, path, what)
    try:
        same = json.loads(json.dumps(data)) == data
    except (TypeError, ValueError):  # a date, a set: no JSON form
        same = False
    if same:
        capture_cache.store(YAML_NAMESPACE, key, data)
    return data


def _yaml_load(text: str, path: Path, what: str) -> object:
    """libyaml's parser where PyYAML was built with it: the same safe constructors, about 10x faster
    than the pure-Python one (0.1-0.2 s of CPU for the six files of a plan); one-line errors."""
    import yaml

    try:
        return yaml.load(text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}: " if mark is not None else ""
        raise InputError(f"{what}: {path} is not valid YAML ({where}{getattr(exc, 'problem', exc)})") from None


def _validation_error(what: str, path: Path | str, exc: ValidationError) -> InputError:
    return InputError(f"{what}: {path}: {first_error(exc)}")


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


def _profile_from_file(path: Path, field: str = "gpu") -> GpuProfile:
    data = _read_mapping(path, field)
    try:
        return GpuProfile.model_validate(data)
    except ValidationError as exc:
        raise _validation_error(field, path, exc) from None


def _alias_index() -> dict[str, Path]:
    """Lower-case name or alias -> file of every built-in profile."""
    index = {}
    for stem, path in _builtin_profile_files().items():
        index[stem.lower()] = path
        for alias in _read_mapping(path, "gpu").get("aliases", []) or []:
            index.setdefault(str(alias).lower(), path)
    return index


def load_gpu_profile(name_or_path: str | Path, field: str = "gpu") -> GpuProfile:
    """A built-in profile name or alias (``a100-80g``, ``h100``, ``cpu``...) or a YAML/JSON file. ``field``: the
    input that named it, which a one-line error names (``--profile`` for a measured profile)."""
    name = str(name_or_path)
    files = _builtin_profile_files()
    if name.lower() in files:
        return _profile_from_file(files[name.lower()], field)
    if _looks_like_path(name):
        return _profile_from_file(Path(name), field)
    path = _alias_index().get(name.lower())
    if path is None:
        raise InputError(f"{field}: unknown hardware profile '{name}'; known: {', '.join(files)} "
                         "(or pass a path to a profile YAML/JSON)")
    return _profile_from_file(path, field)


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
