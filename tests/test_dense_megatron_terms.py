"""Megatron-Core's --tp-comm-overlap (Transformer Engine userbuffers): the exposed-time formula, the option's
path from the CLI to the priced layers, and which published rows state it."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import yaml

from autopar.core.strategy import Strategy
from autopar.cost_models.overlap import UB_PIPELINE_SPLITS, userbuffers_tp_exposed
from autopar.cost_models.session import Inputs, build_cost_model
from autopar.errors import InputError

SHARED = Path(__file__).resolve().parents[2] / "shared"
MODERN = SHARED / "validation" / "published_modern.yaml"


def test_only_the_last_split_of_each_forward_reduce_scatter_shows_behind_enough_compute():
    ag, rs = 1.0e-3, 1.5e-3
    assert userbuffers_tp_exposed(ag, rs, 2, window_s=1.0) == pytest.approx(2 * rs / UB_PIPELINE_SPLITS)
    assert userbuffers_tp_exposed(ag, rs, 1, window_s=1.0) == pytest.approx(rs / UB_PIPELINE_SPLITS)
    assert userbuffers_tp_exposed(ag, rs, 0, window_s=1.0) == 0.0


def test_what_outlasts_the_compute_window_shows_too():
    ag, rs, n = 1.0e-3, 1.0e-3, 2
    total = 2 * n * (ag + rs)
    tail = n * rs / UB_PIPELINE_SPLITS
    assert userbuffers_tp_exposed(ag, rs, n, window_s=0.0) == pytest.approx(total)
    assert userbuffers_tp_exposed(ag, rs, n, window_s=0.004) == pytest.approx(tail + (total - tail - 0.004))
    shrinking = [userbuffers_tp_exposed(ag, rs, n, w) for w in (0.0, 0.002, 0.004, 0.008, 0.1)]
    assert shrinking == sorted(shrinking, reverse=True) and shrinking[-1] == pytest.approx(tail)


def _tp_comm(runtime: str, flag: bool, sp: int) -> float:
    cm, *_ = build_cost_model(Inputs(model="gpt-tiny", runtime=runtime, tp_comm_overlap=flag))
    s = Strategy.parse(f"tp=2,dp=-1,mbs=1,sp={sp},gbs=64").resolve(cm.cluster.world)
    return cm.estimate(s).time["tp_comm"]


def test_the_flag_prices_userbuffers_under_sequence_parallel_only():
    fitted, ub = _tp_comm("megatron", False, 1), _tp_comm("megatron", True, 1)
    assert 0 < ub < fitted  # the fitted share hides less than the userbuffers pipeline on these shapes
    assert _tp_comm("megatron", True, 0) == pytest.approx(_tp_comm("megatron", False, 0))  # Megatron needs sp for it


def test_other_runtimes_refuse_the_flag():
    with pytest.raises(InputError, match="--tp-comm-overlap.*--runtime megatron"):
        build_cost_model(Inputs(model="gpt-tiny", runtime="torch", tp_comm_overlap=True))


def test_the_cli_prices_and_records_the_flag(run_cli, tmp_path):
    import json

    args = ["estimate", "gpt-tiny", "--runtime", "megatron", "--strategy", "tp=2,dp=-1,mbs=1,sp=1,gbs=64", "--json"]
    code, plain, err = run_cli(*args)
    assert code == 0, err
    code, ub, err = run_cli(*args, "--tp-comm-overlap")
    assert code == 0, err
    assert json.loads(ub)["time"]["breakdown"]["tp_comm"] < json.loads(plain)["time"]["breakdown"]["tp_comm"]
    code, _, err = run_cli("estimate", "gpt-tiny", "--strategy", "dp=8", "--tp-comm-overlap")
    assert code == 2 and "--tp-comm-overlap" in err and "Traceback" not in err
    out = tmp_path / "p.json"
    code, _, err = run_cli("plan", "gpt-tiny", "--runtime", "megatron", "--tp-comm-overlap", "--top", "1",
                           "--out", str(out))
    assert code == 0, err
    from autopar.core.plan import Plan

    plan = Plan.model_validate_json(out.read_text())
    assert plan.tp_comm_overlap and "--tp-comm-overlap" in plan.provenance.command


def test_the_flag_without_sequence_parallel_is_refused_and_never_searched(run_cli):
    """Megatron-Core asserts sequence parallel under --tp-comm-overlap: estimate refuses tp > 1 without it in one
    line, and plan searches sp=1 only wherever tp > 1."""
    import json

    code, _, err = run_cli("estimate", "gpt-tiny", "--runtime", "megatron", "--tp-comm-overlap",
                           "--strategy", "tp=2,dp=-1,mbs=1,sp=0,gbs=64")
    assert code == 2 and "sp=1" in err and "Traceback" not in err
    sps = {}
    for flag in ([], ["--tp-comm-overlap"]):
        code, out, err = run_cli("plan", "gpt-tiny", "--runtime", "megatron", *flag, "--tp", "2", "--top", "200",
                                 "--json")
        assert code == 0, err
        sps[bool(flag)] = {p["strategy"]["sp"] for p in json.loads(out)["candidates"]}
    assert sps == {False: {0, 1}, True: {1}}


@pytest.mark.skipif(not MODERN.is_file(), reason="shared/validation is absent")
def test_only_rows_that_state_the_flag_get_it():
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from published_dense_rows import tp_comm_overlap_of

    runs = yaml.safe_load(MODERN.read_text())
    runs = runs["runs"] if isinstance(runs, dict) else runs
    stating = {r["id"] for r in runs if tp_comm_overlap_of(r)}
    assert stating == {f"megatron_core_h100_weak_{size}" for size in ("32B", "119B", "177B", "314B")}
