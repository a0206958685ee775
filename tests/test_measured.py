"""Measured profiles in the cost model: `--profile`, exact hits, CPU contention, per-term
sources in the JSON, and `autopar profile-comm` (fits, held-out error, files it writes)."""

from __future__ import annotations

import json

import pytest
import yaml

from autopar.core.cluster import ClusterSpec, LinkClass
from autopar.core.gpu import GpuProfile
from autopar.core.strategy import Strategy
from autopar.cost_models.comm import CommFit, collective_time
from autopar.cost_models.compute import OpTimer, cpu_contention
from autopar.cost_models.layer_cost import PricingContext, price_layer
from autopar.cost_models.measured import load_measured_profile
from autopar.cost_models.report import estimate_dict
from autopar.cost_models.session import Inputs, build_cost_model
from autopar.cost_models.templates import build_templates
from autopar.errors import InputError
from autopar.profiles.comm_profiler import CommPoint, fit_alpha_beta, fit_points, link_class
from autopar.profiles.hw import load_cluster, load_gpu_profile
from autopar.profiles.intake import preset

SEQ = 32
FIT = {"kind": "all_reduce", "group_size": 2, "link": "intra_node", "alpha_s": 1e-4, "beta_s_per_byte": 1e-9,
       "r2": 0.99, "source": "measured"}


def _block():
    return next(t for t in build_templates(preset("gpt-tiny"), SEQ, "fp32", fuse=False) if t.kind == "block")


def _measured_profile(tmp_path, comm=True, **extra) -> str:
    """A CPU profile whose table holds every gpt-tiny block op at seq 32 with 1 ms / 2 ms."""
    data = load_gpu_profile("h100-sxm").model_dump()
    data.update(name="cpu-fake", aliases=[], peak_tflops={"fp32": 0.15}, mem_bw_gbps=100.0, cores=2,
                threads_per_rank=1, fused_elementwise=False, meta={"measured": True, "device": "test CPU"},
                measured_ops={op.sig: [1e-3, 2e-3, 0.01] for op in _block().ops},
                comm_fits=[FIT] if comm else [])
    data.update(extra)
    path = tmp_path / "cpu-fake.json"
    path.write_text(json.dumps(data))
    return str(path)


def _cluster(gpu: str = "cpu", ranks: int = 1) -> ClusterSpec:
    link = LinkClass(bw_gbps=1.0, latency_s=1e-5)
    return ClusterSpec(gpu=gpu, nodes=1, gpus_per_node=ranks, intra_node=link, inter_node=link)


# ----- load_measured_profile --------------------------------------------------------------
def test_load_measured_profile(tmp_path):
    timer, fits = load_measured_profile(_measured_profile(tmp_path), load_gpu_profile("cpu"), "fp32")
    assert timer.source == "fit" and len(timer.measured) == len({op.sig for op in _block().ops})
    assert fits == [CommFit.model_validate(FIT)]
    _, none = load_measured_profile(_measured_profile(tmp_path, comm=False), None, "fp32")
    assert none is None


def test_load_measured_profile_refuses_wrong_inputs(tmp_path):
    path = _measured_profile(tmp_path)
    with pytest.raises(InputError, match="not bf16"):
        load_measured_profile(path, None, "bf16")
    with pytest.raises(InputError, match="measured on test CPU"):
        load_measured_profile(path, load_gpu_profile("h100-sxm"), "fp32")
    with pytest.raises(InputError, match="no measurements"):
        load_measured_profile(str(_datasheet_copy(tmp_path)), None, "bf16")



@pytest.mark.parametrize("text,why", [("{not json", "is not valid JSON"), ('{"name": 3}', "name"),
                                      (None, "does not exist")])
def test_an_unreadable_profile_file_is_named_as_the_input_that_gave_it(tmp_path, text, why):
    """The loader names the input it was given (``field``), whole: '--profile: PATH: ...', never 'gpu:'."""
    path = tmp_path / "p.json"
    if text is not None:
        path.write_text(text)
    for load in (lambda: load_measured_profile(path, None, "fp32"), lambda: load_gpu_profile(path, "--profile")):
        with pytest.raises(InputError) as exc:
            load()
        assert exc.value.message.startswith(f"--profile: {path}") and why in exc.value.message, exc.value.message


def _datasheet_copy(tmp_path):
    p = tmp_path / "h100.json"
    p.write_text(load_gpu_profile("h100-sxm").model_dump_json())
    return p


# ----- exact hits and curves ---------------------------------------------------------------
def test_exact_hit_only_at_the_captured_shape(tmp_path):
    prof = load_gpu_profile(_measured_profile(tmp_path))
    block = _block()
    timer = OpTimer(gpu=prof, dtype="fp32")
    c = price_layer(block, Strategy.parse("dp=1").resolve(1, 1), PricingContext(_cluster(), timer, 4, 64, SEQ))
    n = len(block.ops)
    assert c.fwd_s == pytest.approx(n * 1e-3) and c.bwd_s == pytest.approx(n * 2e-3)
    assert c.source_counts == {"measurement": n, "fit": 0, "datasheet": 0}
    timer2 = OpTimer(gpu=prof, dtype="fp32")
    c2 = price_layer(block, Strategy.parse("dp=1,mbs=2").resolve(1, 2), PricingContext(_cluster(), timer2, 4, 64, SEQ))
    assert c2.source_counts["measurement"] == 0 and c2.source_counts["fit"] == n


def test_datasheet_profiles_unchanged():
    t = OpTimer(gpu=load_gpu_profile("h100-sxm"), dtype="bf16")
    assert t.source == "datasheet" and not t.measured and t.contention == 1.0
    f, b = t.gemm_fb(4096, 4096, 4096, 1, 2.0)
    assert f == pytest.approx(t.gemm(4096, 4096, 4096)) and b == pytest.approx(2 * f)


def test_cpu_contention_scales_with_ranks_per_core(tmp_path):
    prof = load_gpu_profile(_measured_profile(tmp_path))
    assert cpu_contention(prof, 1) == 1.0 and cpu_contention(prof, 2) == 1.0 and cpu_contention(prof, 4) == 2.0
    assert cpu_contention(load_gpu_profile("h100-sxm"), 8) == 1.0
    block, s = _block(), Strategy.parse("dp=1,mbs=2").resolve(1, 2)
    one = price_layer(block, s, PricingContext(_cluster(ranks=1), OpTimer(gpu=prof, dtype="fp32"), 4, 64, SEQ))
    four = price_layer(block, s, PricingContext(_cluster(ranks=4), OpTimer(gpu=prof, dtype="fp32"), 4, 64, SEQ))
    assert four.fwd_s == pytest.approx(2 * one.fwd_s)


# ----- the JSON says where each term came from ----------------------------------------------------
def test_estimate_json_sources_per_term(tmp_path):
    path = _measured_profile(tmp_path)
    inp = Inputs(model="gpt-tiny", gpu="cpu", gpus_per_node=2, seq_len=SEQ, dtype="fp32", profile=path)
    cm, _, cl, _ = build_cost_model(inp)
    e = cm.estimate(Strategy.parse("dp=2,mbs=1").resolve(cl.world, 2))
    d = estimate_dict(e, cm)
    terms = d["sources"]["terms"]
    assert terms["compute"]["measurement"] >= 4 * len(_block().ops)  # 4 blocks (+ the final norm) as captured
    assert terms["compute"]["fit"] > 0 and terms["compute"]["datasheet"] == 0
    assert terms["dp_comm"] == "measurement" and d["sources"]["communication"] == "measurement"
    plain, _, cl2, _ = build_cost_model(Inputs(model="gpt-tiny", gpu="h100-sxm", gpus_per_node=2, seq_len=SEQ))
    t2 = estimate_dict(plain.estimate(Strategy.parse("dp=2").resolve(2, 2)), plain)["sources"]["terms"]
    assert t2["compute"]["fit"] == 0 and t2["compute"]["datasheet"] > 0 and t2["dp_comm"] == "datasheet"


def test_gpu_cpu_uses_the_shipped_measurements():
    cm, _, cl, _ = build_cost_model(Inputs(model="gpt-tiny", gpu="cpu", gpus_per_node=4, dtype="fp32"))
    assert cl.gpus_per_node == 4 and cm.timer.source == "fit" and cm.timer.contention == 2.0
    assert cm.ctx.fits and all(f.source == "measured" for f in cm.ctx.fits)
    assert collective_time("all_reduce", 1e6, 4, 1, cl, fits=cm.ctx.fits).source == "measurement"


# ----- profile-comm -------------------------------------------------------------------------
def test_fit_alpha_beta_recovers_a_line():
    sizes = [2**k for k in range(10, 26, 2)]
    times = [5e-5 + 2e-9 * s for s in sizes]
    alpha, beta, r2 = fit_alpha_beta(sizes, times)
    assert alpha == pytest.approx(5e-5) and beta == pytest.approx(2e-9) and r2 == pytest.approx(1.0)


def test_fit_points_held_out_and_link_class():
    pts = [CommPoint("all_reduce", 4, s, 1e-4 + 3e-9 * s) for s in (1024, 4096, 16384, 65536, 262144)]
    (fit,) = fit_points(pts)
    assert fit.held_out_bytes == 65536 and abs(fit.held_out_error) < 1e-6
    link = link_class([fit], 4, "test")
    assert link["bw_gbps"] == pytest.approx(2 * 3 / 4 / 3e-9 / 1e9, rel=1e-3)   # ring: 2(n-1)/n S/B
    assert link["latency_s"] == pytest.approx(1e-4 / 6, rel=1e-3)


@pytest.mark.slow
def test_profile_comm_two_ranks(run_cli, tmp_path):
    prof = _measured_profile(tmp_path, comm=False)
    out = tmp_path / "cluster-two.yaml"
    code, stdout, err = run_cli("profile-comm", "--nproc", "2", "--budget-s", "4", "--max-mib", "1",
                                "--out", str(out), "--profile", prof)
    assert code == 0, err
    cluster = load_cluster(str(out))
    assert cluster.gpus_per_node == 2 and cluster.intra_node.bw_gbps > 0 and "fitted" in cluster.intra_node.source
    assert yaml.safe_load(out.read_text())["name"] == "two"
    kinds = {f.kind for f in load_measured_profile(prof, None, "fp32")[1]}
    assert kinds == {"all_reduce", "all_gather", "reduce_scatter", "all_to_all", "p2p"}
    assert "held-out" in stdout


def test_profile_comm_bad_input(run_cli, tmp_path):
    code, _, err = run_cli("profile-comm", "--nproc", "1")
    assert code == 2 and "--nproc" in err and "2" in err
    code, _, err = run_cli("profile-comm", "--nproc", "2", "--backend", "mpi")
    assert code == 2 and "gloo or nccl" in err
    code, _, err = run_cli("profile-comm", "--nproc", "2", "--profile", str(tmp_path / "none.json"))
    assert code == 2 and "does not exist" in err


def test_measured_profile_roundtrip_fields(tmp_path):
    p = load_gpu_profile(_measured_profile(tmp_path))
    assert isinstance(p, GpuProfile) and p.cores == 2 and p.comm_fits[0]["kind"] == "all_reduce"
