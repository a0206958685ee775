"""The llm-foundry (MPT) rows of ``published_modern.yaml``: the mapping ``benchmarks/published_rows.py``
gives them, and the facts docs/validation.md's "Outlier rows, by mechanism" (llm-foundry) argues from
(``benchmarks/foundry_probe.py`` prints them with the priced errors)."""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
MODERN = Path(__file__).resolve().parents[2] / "shared" / "validation" / "published_modern.yaml"
pytestmark = pytest.mark.skipif(not MODERN.is_file(), reason="shared/validation/published_modern.yaml absent")


@pytest.fixture(scope="module")
def pr():
    sys.path.insert(0, str(BENCH))
    import published_rows

    return published_rows


@pytest.fixture(scope="module")
def foundry(pr):
    return [r for r in pr.load_runs(MODERN) if pr.source_key(r) == "llm-foundry"]


def _strategy(case) -> dict[str, str]:
    return dict(kv.split("=") for kv in case.strategy.split(","))


def test_rows_map_as_their_table_states(pr, foundry):
    """Every llm-foundry row runs autopar's torch program with FSDP (full shard: zero 3; the three
    SHARD_GRAD_OP rows: zero 2), no tensor or
    pipeline parallelism, the table's micro-batch, its global batch (= micro-batch x grad accum x GPUs:
    the table's own columns agree), and full recompute exactly where activation checkpointing is on."""
    assert len(foundry) == 108
    for run in foundry:
        par, case = run["parallel"], pr.case_for(run)
        s = _strategy(case)
        assert case.runtime == "torch" and case.stack == "llm-foundry", run["id"]
        zero = "2" if par["sharding"] == "SHARD_GRAD_OP" else "3"  # FSDP ZeRO-2 / full shard
        assert (s["tp"], s["pp"], s["zero"], s["dp"]) == ("1", "1", zero, str(run["hardware"]["num_gpus"])), run["id"]
        assert int(s["mbs"]) == par["microbatch"], run["id"]
        assert int(s["gbs"]) == par["global_batch"] == par["microbatch"] * par["grad_accum"] * int(s["dp"]), run["id"]
        assert (s["recompute"] == "full") == str(par["recompute"]).startswith("full"), run["id"]
        assert case.dtype == ("fp8" if "fp8" in run["precision"] else "bf16"), run["id"]


def test_published_step_is_the_rows_tokens_per_gpu(pr, foundry):
    """The published step is the priced global batch's tokens over the table's tokens/s per GPU, so
    the micro-batch and recompute mapping cannot move the published figure, only the priced one."""
    run = next(r for r in foundry if r["id"].endswith("760m_seq512_8gpu_121"))
    tokens = run["parallel"]["global_batch"] * run["model"]["seq_len"]
    fake = SimpleNamespace(world=8, tokens=tokens, model_flops=0.0, hardware_flops=0.0)
    assert pr.published_step_s(run, fake) == pytest.approx(tokens / (29446 * 8))


def test_760m_rows_of_one_table_do_the_same_work_per_step(pr, foundry):
    """The A100-80GB MPT-760m rows at 512 / 1,024 / 2,048 tokens hold the same tokens per step in the
    same number of micro-batches of the same token count: every per-step, per-micro-batch, per-kernel
    or per-token cost is the same in the three; only per-sequence work and attention differ."""
    rows = {r["model"]["seq_len"]: r for r in foundry if r["model"]["name"] == "MPT-760m"
            and r["hardware"]["gpu"] == "A100-80GB" and r["model"]["seq_len"] <= 2048}
    assert sorted(rows) == [512, 1024, 2048]
    work = {(r["parallel"]["global_batch"] * s, r["parallel"]["grad_accum"], r["parallel"]["microbatch"] * s)
            for s, r in rows.items()}
    assert work == {(786432, 2, 49152)}
    published = {s: r["measured"]["tokens_per_sec_per_gpu"] for s, r in rows.items()}
    assert published[512] < published[1024] < published[2048]  # shorter sequences ran slower


def test_autocast_cast_bytes_counts_each_pass_over_the_weights():
    """The probe's hypothesis (fp32 parameters under autocast, Composer FSDP ``DEFAULT``): 6 bytes per
    parameter per cast, three casts per micro-batch (forward, its backward, reduce dtype), a fourth
    for the recomputed forward."""
    sys.path.insert(0, str(BENCH))
    import foundry_probe as fp

    assert fp.autocast_cast_bytes(1e6, recompute_full=False) == pytest.approx(18e6)
    assert fp.autocast_cast_bytes(1e6, recompute_full=True) == pytest.approx(24e6)
    pure = SimpleNamespace(case=SimpleNamespace(run={"parallel": {"mp_mode": "PURE"}}))
    assert fp.cast_seconds(pure) == 0.0  # bf16 parameters (FSDP PURE, autopar's own program): nothing to cast
