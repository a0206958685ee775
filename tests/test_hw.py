"""Hardware profiles and cluster presets: numbers match hardware_facts.yaml, loaders fail in one line."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from autopar.core.gpu import REQUIRED_SOURCES, EffCurve
from autopar.errors import InputError
from autopar.profiles.hw import (
    default_cluster_for_gpu,
    list_cluster_presets,
    list_gpu_profiles,
    load_cluster,
    load_gpu_profile,
)

GiB = 2**30
FACTS = Path(__file__).resolve().parents[2] / "shared" / "validation" / "hardware_facts.yaml"  # ../shared
BUILTIN = ["a100-40g", "a100-80g", "h100-sxm", "h200", "h800", "cpu"]
PRESETS = ["cpu", "dgx-a100", "dgx-h100", "dgx-h200", "h800"]


# ----- GPU profiles ---------------------------------------------------------------------
def test_builtin_profiles_listed():
    assert set(BUILTIN) <= set(list_gpu_profiles())


@pytest.mark.parametrize("name", list_gpu_profiles())
def test_every_profile_loads_with_sources(name):
    p = load_gpu_profile(name)
    assert p.name == name
    for key in REQUIRED_SOURCES:
        assert p.sources[key].strip(), key
    assert all(v > 0 for v in p.peak_tflops.values())
    assert 0 < p.usable_bytes() < p.mem_capacity_bytes


# Values from the vendor datasheets as shared/validation/hardware_facts.yaml records them (dense tensor
# peaks, HBM GiB, GB/s): carried here, so these checks run without the shared folder.
@pytest.mark.parametrize("name,precision,tflops", [
    ("a100-80g", "bf16", 312), ("a100-80g", "fp16", 312), ("a100-80g", "tf32", 156), ("a100-80g", "fp32", 19.5),
    ("a100-40g", "bf16", 312), ("a100-40g", "tf32", 156),
    ("h100-sxm", "bf16", 989.4), ("h100-sxm", "fp16", 989.4), ("h100-sxm", "fp8", 1978.9),
    ("h100-sxm", "tf32", 494.7), ("h200", "bf16", 989.4), ("h200", "fp8", 1978.9),
])
def test_peak_matches_facts(name, precision, tflops):
    p = load_gpu_profile(name)
    assert p.peak_tflops[precision] == tflops
    assert p.peak_flops(precision) == pytest.approx(tflops * 1e12)


@pytest.mark.parametrize("name,gib,bw", [
    ("a100-80g", 80, 2039), ("a100-40g", 40, 1555), ("h100-sxm", 80, 3350), ("h200", 141, 4800),
])
def test_memory_matches_facts(name, gib, bw):
    p = load_gpu_profile(name)
    assert p.mem_capacity_bytes == gib * GiB
    assert p.mem_bw_gbps == bw


def test_dense_not_sparse_peaks():
    # vendor sheets print 2:4-sparse figures (1979 bf16 for H100/H200); profiles hold dense ones
    for name in ("h100-sxm", "h200", "h800"):
        assert load_gpu_profile(name).peak_tflops["bf16"] < 1000


@pytest.mark.skipif(not FACTS.is_file(), reason="shared hardware_facts.yaml not present")
def test_profiles_agree_with_facts_file():
    gpus = yaml.safe_load(FACTS.read_text())["gpus"]
    pairs = {"a100-80g": "A100-SXM4-80GB", "a100-40g": "A100-SXM4-40GB", "h100-sxm": "H100-SXM5-80GB",
             "h200": "H200-SXM-141GB"}
    for name, key in pairs.items():
        p, fact = load_gpu_profile(name), gpus[key]
        for prec, val in fact["peak_tflops_dense"].items():
            if prec in p.peak_tflops:
                assert p.peak_tflops[prec] == val, (name, prec)
        assert p.mem_capacity_bytes == fact["hbm_gib"] * GiB
        assert p.mem_bw_gbps == fact["hbm_bandwidth_gbs"]


def test_aliases_and_case():
    assert load_gpu_profile("a100").name == "a100-80g"
    assert load_gpu_profile("H100").name == "h100-sxm"
    assert load_gpu_profile("h200-sxm").name == "h200"


def test_unknown_profile_one_line_lists_known():
    with pytest.raises(InputError) as ei:
        load_gpu_profile("tpu-v9")
    msg = ei.value.message
    assert "\n" not in msg and "tpu-v9" in msg and "a100-80g" in msg and "h100-sxm" in msg


def test_precision_missing_is_input_error():
    with pytest.raises(InputError, match="fp8"):
        load_gpu_profile("a100-80g").peak_flops("fp8")


def test_cpu_is_measured():
    """The shipped cpu profile comes from `autopar profile` on the 2-core build machine (docs/profiling.md)."""
    p = load_gpu_profile("cpu")
    assert p.peak_tflops["fp32"] <= 1 and p.cores and p.meta["measured"]
    assert "autopar profile" in p.sources["peak_tflops"]


# ----- efficiency curves -----------------------------------------------------------------
def test_effcurve_log_linear_and_clamped():
    c = EffCurve([[1e6, 0.1], [1e8, 0.5]])
    assert c.at(1e7) == pytest.approx(0.3)          # halfway in log10(x)
    assert c.at(1e6 * 10**0.25) == pytest.approx(0.15)
    assert c.at(1.0) == 0.1 and c.at(1e12) == 0.5   # clamped


@pytest.mark.parametrize("points", [[], [[1e6, 0.1], [1e5, 0.2]], [[1e6, 1.5]], [[0, 0.5]]])
def test_effcurve_rejects_bad_points(points):
    with pytest.raises(ValueError):
        EffCurve(points)


@pytest.mark.parametrize("name", BUILTIN)
def test_curves_monotone_and_bounded(name):
    p = load_gpu_profile(name)
    xs = [10.0**k for k in range(2, 14)]
    for curve in ("matmul", "membound", "attention"):
        effs = [p.eff(curve, x) for x in xs]
        assert all(0 < e <= 1 for e in effs)
        if curve == "membound" and p.meta.get("measured"):
            continue  # measured on CPU it falls past ~32 MB (docs/profiling.md); search.curves_monotone knows
        assert effs == sorted(effs), curve


def test_large_gemm_efficiency_physical():
    a100, h100 = load_gpu_profile("a100-80g"), load_gpu_profile("h100-sxm")
    big = 2 * 8192**3
    assert 0.70 <= a100.eff("matmul", big) <= 0.87       # below the best cuBLAS bf16 shape (0.87 of peak)
    assert a100.eff("matmul", 2 * 256**3) < 0.1           # small GEMMs are launch bound
    assert 0.5 <= a100.eff("membound", 1e9) <= 0.85      # fused elementwise kernels vs HBM (calibrated 0.6)
    assert h100.eff("matmul_eff", big) == h100.eff("matmul", big)


def test_unknown_curve_is_input_error():
    with pytest.raises(InputError, match="matmul, membound, attention"):
        load_gpu_profile("a100").eff("softmax", 1e9)


def _write(tmp_path: Path, name: str, data) -> Path:
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return path


def test_profile_from_user_file(tmp_path):
    data = load_gpu_profile("a100-80g").model_dump()
    data.update(name="my-gpu", aliases=[])
    p = load_gpu_profile(_write(tmp_path, "my.yaml", data))
    assert p.name == "my-gpu" and p.peak_tflops["bf16"] == 312


def test_profile_without_sources_is_rejected(tmp_path):
    data = load_gpu_profile("a100-80g").model_dump()
    del data["sources"]["mem_bw_gbps"]
    with pytest.raises(InputError, match="mem_bw_gbps") as ei:
        load_gpu_profile(_write(tmp_path, "nosrc.yaml", data))
    assert "\n" not in ei.value.message


def test_profile_missing_field_names_field_and_file(tmp_path):
    data = load_gpu_profile("a100-80g").model_dump()
    del data["mem_bw_gbps"]
    path = _write(tmp_path, "missing.yaml", data)
    with pytest.raises(InputError, match="mem_bw_gbps") as ei:
        load_gpu_profile(path)
    assert str(path) in ei.value.message


# ----- clusters ----------------------------------------------------------------------------
def test_presets_listed():
    assert list_cluster_presets() == PRESETS


@pytest.mark.parametrize("name", PRESETS)
def test_every_preset_loads(name):
    c = load_cluster(name)
    load_gpu_profile(c.gpu)
    assert c.intra_node.source and c.inter_node.source
    assert c.intra_node.bw_gbps > c.inter_node.bw_gbps


def test_preset_link_numbers():
    a100 = load_cluster("dgx-a100")
    assert a100.gpu == "a100-80g" and a100.gpus_per_node == 8
    assert a100.intra_node.bw_gbps == 200
    assert a100.inter_node.bw_gbps * 8 == 192        # 192 GB/s node all-reduce busbw / 8 GPUs
    h100 = load_cluster("dgx-h100")
    assert (h100.intra_node.bw_gbps, h100.intra_node.allreduce_bw_gbps, h100.inter_node.bw_gbps) == (370, 480, 48)
    h800 = load_cluster("h800")
    assert (h800.intra_node.bw_gbps, h800.inter_node.bw_gbps) == (160, 50)
    assert load_cluster("dgx-h200").intra_node.allreduce_bw_gbps == 475
    for c in (a100, h100, h800):
        assert 1e-6 <= c.intra_node.latency_s <= c.inter_node.latency_s <= 2e-5


def test_overrides_and_cluster_prefix():
    c = load_cluster("cluster-dgx-a100", nodes=4, gpus_per_node=4, gpu="a100-40g")
    assert (c.nodes, c.gpus_per_node, c.gpu, c.world) == (4, 4, "a100-40g", 16)


def test_unknown_preset_lists_known():
    with pytest.raises(InputError, match="dgx-h100"):
        load_cluster("dgx-b200")


def test_default_cluster_for_gpu():
    c = default_cluster_for_gpu("h100-sxm", nodes=4, gpus_per_node=8)
    assert (c.name, c.gpu, c.world) == ("dgx-h100", "h100-sxm", 32)
    assert default_cluster_for_gpu("a100-40g", 2).gpu == "a100-40g"
    assert default_cluster_for_gpu("a100", 2).name == "dgx-a100"
    assert default_cluster_for_gpu("h800", 1).inter_node.bw_gbps == 50
    assert default_cluster_for_gpu("cpu", 1, 4).gpus_per_node == 4


def test_user_cluster_with_node_pair_matrix(tmp_path):
    m = [[48, 48, 48], [48, 48, 10], [48, 10, 48]]
    path = _write(tmp_path, "c.yaml", {
        "name": "lab", "gpu": "h100", "nodes": 3, "gpus_per_node": 8,
        "intra_node": {"bw_gbps": 370, "latency_s": 3e-6}, "inter_node": {"bw_gbps": 48, "latency_s": 1e-5},
        "node_pair_bw_gbps": m})
    c = load_cluster(path)
    assert c.node_pair_bw_gbps == m and c.world == 24


def test_user_cluster_inherits_preset(tmp_path):
    path = _write(tmp_path, "c.yaml", {"preset": "dgx-h100", "name": "mine", "nodes": 2,
                                       "node_pair_bw_gbps": [[48, 20], [20, 48]]})
    c = load_cluster(path)
    assert (c.name, c.nodes, c.intra_node.bw_gbps, c.gpu) == ("mine", 2, 370, "h100-sxm")
    path = _write(tmp_path, "e.yaml", {"preset": "dgx-h100", "intra_node": {"latency_s": 2e-6}})
    c = load_cluster(path)                      # link classes merge with the preset's
    assert (c.intra_node.latency_s, c.intra_node.bw_gbps) == (2e-6, 370)


def test_user_cluster_gpu_path_relative_to_file(tmp_path):
    data = load_gpu_profile("a100-80g").model_dump()
    data.update(name="labgpu", aliases=[])
    _write(tmp_path, "labgpu.yaml", data)
    path = _write(tmp_path, "c.yaml", {"preset": "dgx-a100", "gpu": "labgpu.yaml"})
    c = load_cluster(path)
    assert load_gpu_profile(c.gpu).name == "labgpu"


def test_malformed_yaml_is_one_line(tmp_path):
    path = _write(tmp_path, "bad.yaml", "name: x\nintra_node: {bw_gbps: 3\n  latency: [\n")
    with pytest.raises(InputError, match="not valid YAML") as ei:
        load_cluster(path)
    assert str(path) in ei.value.message and "\n" not in ei.value.message


def test_missing_field_names_field_and_file(tmp_path):
    path = _write(tmp_path, "c.yaml", {"gpu": "a100", "inter_node": {"bw_gbps": 24, "latency_s": 1e-5}})
    with pytest.raises(InputError, match="'intra_node'") as ei:
        load_cluster(path)
    assert str(path) in ei.value.message
    path = _write(tmp_path, "d.yaml", {"gpu": "a100", "intra_node": {"latency_s": 1e-6},
                                       "inter_node": {"bw_gbps": 24, "latency_s": 1e-5}})
    with pytest.raises(InputError, match="intra_node.bw_gbps"):
        load_cluster(path)


def test_bad_matrix_and_unknown_gpu(tmp_path):
    path = _write(tmp_path, "c.yaml", {"preset": "dgx-a100", "nodes": 2, "node_pair_bw_gbps": [[24, 24]]})
    with pytest.raises(InputError, match="node_pair_bw_gbps"):
        load_cluster(path)
    good = _write(tmp_path, "g.yaml", {"preset": "dgx-a100", "nodes": 2, "node_pair_bw_gbps": [[24, 24], [24, 24]]})
    with pytest.raises(InputError, match="node_pair_bw_gbps"):
        load_cluster(good, nodes=3)                    # the matrix no longer matches the node count
    with pytest.raises(InputError, match="unknown hardware profile"):
        load_cluster("dgx-a100", gpu="a200")
    with pytest.raises(InputError, match="does not exist"):
        load_cluster(tmp_path / "nope.yaml")
