"""Strategy: compact strings, -1 resolution, rule errors; JSON round trips of the core types."""

from __future__ import annotations

import pytest

from autopar import techniques
from autopar.core.cluster import ClusterSpec, LinkClass
from autopar.core.plan import Plan, StageSpec
from autopar.core.strategy import Strategy
from autopar.errors import InputError
from autopar.profiles.intake import preset


def test_compact_round_trip():
    s = Strategy.parse("tp=8,pp=4,dp=-1,mbs=2,zero=1,recompute=selective,sp=1,ep=2,etp=1")
    assert Strategy.parse(s.compact()) == s
    assert (s.tp, s.pp, s.dp, s.micro_batch, s.zero_stage, s.recompute, s.sequence_parallel) == \
        (8, 4, -1, 2, 1, "selective", True)


def test_parse_errors_are_one_line():
    with pytest.raises(InputError, match="unknown key 'tpp'"):
        Strategy.parse("tpp=2")
    with pytest.raises(InputError, match="is not key=value"):
        Strategy.parse("tp8")
    with pytest.raises(InputError, match="must be an integer"):
        Strategy.parse("tp=x")


def test_minus_one_takes_the_rest():
    s = Strategy.parse("tp=8,pp=4,dp=-1").resolve(64)
    assert (s.dp, s.world) == (2, 64)
    assert Strategy.parse("tp=2,dp=4,pp=-1").resolve(16).pp == 2


def test_degrees_must_cover_the_cluster():
    with pytest.raises(InputError) as err:
        Strategy.parse("dp=2,tp=4,pp=2").resolve(32)
    assert str(err.value) == "strategy: dp*tp*pp*cp = 2*4*2*1 = 16, but the cluster has 32 GPUs"
    with pytest.raises(InputError, match="does not divide the cluster's 32 GPUs"):
        Strategy.parse("tp=3,dp=-1").resolve(32)
    with pytest.raises(InputError, match="only one of"):
        Strategy.parse("tp=-1,dp=-1").resolve(8)


def _resolve(text: str, world: int):
    """Degrees, then every technique rule (autopar.techniques owns them since issue 11)."""
    return techniques.resolve(Strategy.parse(text), world)


def test_expert_degrees_divide_a_stage():
    assert _resolve("tp=2,pp=2,dp=4,ep=8", 16).edp == 1
    with pytest.raises(InputError, match=r"ep\*etp = 3\*1 = 3 must divide dp\*tp\*cp = 8"):
        _resolve("tp=2,pp=2,dp=4,ep=3", 16)
    with pytest.raises(InputError, match=r"ep\*etp = 4\*4 = 16 must divide"):
        _resolve("tp=2,pp=2,dp=4,ep=4,etp=4", 16)


def test_interleaved_rules():
    ok = _resolve("pp=4,dp=-1,schedule=interleaved,vpp=2", 8)
    assert (ok.schedule, ok.vpp) == ("interleaved", 2)
    with pytest.raises(InputError, match="interleaved needs pp > 1"):
        _resolve("dp=-1,schedule=interleaved", 8)
    with pytest.raises(InputError, match="vpp=2 needs schedule=interleaved"):
        _resolve("pp=2,dp=-1,vpp=2", 8)
    with pytest.raises(InputError, match="sequence parallel"):
        _resolve("dp=-1,sp=1", 8)


def test_global_batch_divisibility():
    with pytest.raises(InputError, match="global_batch=10 is not divisible by mbs\\*dp = 1\\*4 = 4"):
        _resolve("dp=4,gbs=10", 4)


def _cluster() -> ClusterSpec:
    link = LinkClass(bw_gbps=300.0, latency_s=5e-6)
    return ClusterSpec(name="test", gpu="h100-sxm", nodes=2, gpus_per_node=8, intra_node=link,
                       inter_node=LinkClass(bw_gbps=50.0, latency_s=1e-5))


def test_json_round_trips(tmp_path):
    spec = preset("deepseek-v3")
    assert type(spec).model_validate_json(spec.model_dump_json()) == spec
    strategy = Strategy.parse("tp=8,pp=2,dp=-1,ep=8").resolve(16)
    assert Strategy.model_validate_json(strategy.model_dump_json()) == strategy
    plan = Plan(model=spec, cluster=_cluster(), seq_len=4096, strategy=strategy,
                stages=[StageSpec(index=0, rank=0, layer_start=0, layer_end=31, has_embedding=True),
                        StageSpec(index=1, rank=1, layer_start=31, layer_end=61, has_output=True)])
    path = tmp_path / "plan.json"
    plan.save(path)
    assert Plan.load(path) == plan


def test_plan_load_errors(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        Plan.load(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{")
    with pytest.raises(InputError, match="is not valid JSON"):
        Plan.load(bad)


def test_offload_must_fit_host_memory():
    """Offloaded states count against the GPU's share of host DRAM (DGX H100: 2 TB / 8 GPUs):
    llama3-405b on 16 H100 does not fit with offload (about 400 GiB of states per GPU), 70B on 8
    (about 130 GiB) does."""
    from autopar.core.strategy import Strategy
    from autopar.cost_models.session import Inputs, build_cost_model

    def est(model, nodes, text):
        cm, _, _, _ = build_cost_model(Inputs(model=model, gpu="h100-sxm", nodes=nodes, seq_len=2048))
        return cm.estimate(Strategy.parse(text, global_batch=64).resolve(cm.cluster.world))

    big = est("llama3-405b", 2, "dp=16,zero=3,offload=1,recompute=full")
    assert not big.fits_host and not big.feasible and big.host_peak_bytes > big.host_usable_bytes
    small = est("llama3-70b", 1, "dp=8,zero=3,offload=1,recompute=full")
    assert small.fits_host and 100 * 2**30 < small.host_peak_bytes < 160 * 2**30
