"""The A100 rows of ``published_modern.yaml`` outside llm-foundry (MT-NLG, MegaScale): the mapping
``benchmarks/published_rows.py`` / ``published_dense_rows.py`` gives them and the arithmetic
docs/validation.md's "Outlier rows, by mechanism" argues from."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
MODERN = Path(__file__).resolve().parents[2] / "shared" / "validation" / "published_modern.yaml"


@pytest.fixture(scope="module")
def dense():
    sys.path.insert(0, str(BENCH))
    import published_dense_rows

    return published_dense_rows


def _eq3_flops(batch: int, seq: int, layers: int, hidden: int, vocab: int) -> float:
    """Narayanan et al. 2021 eq. 3: training FLOPs per iteration with full recompute."""
    return 96 * batch * seq * layers * hidden**2 * (1 + seq / (6 * hidden) + vocab / (16 * layers * hidden))


def test_mt_nlg_step_times_are_the_papers_tflops(dense):
    """The three MT-NLG iteration times (typed in from Smith et al. 2022, Sec. 2.4) agree with the
    paper's 126 / 121 / 113 TFLOP/s per GPU under eq. 3 (530B: 105 layers, h 20480, vocab 50272), so
    the constants the micro-batch is read from carry no typo."""
    flops = _eq3_flops(dense.MT_NLG_GLOBAL_BATCH, 2048, 105, 20480, 50272)
    for (nodes, step), tflops in zip(sorted(dense.MT_NLG_STEP_S.items()), (126, 121, 113)):
        assert flops / (nodes * 8 * step) / 1e12 == pytest.approx(tflops, rel=0.006)


def test_one_f_one_b_microbatch_recovers_a_synthetic_pipeline(dense):
    """A pipeline built as (m + p - 1) x t with k sequences per micro-batch gives k back."""
    p, batch, nodes_per_replica, t_seq = 8, 768, 8, 0.2
    for k in (1, 2, 4):
        steps = {n: (batch / (n // nodes_per_replica) / k + p - 1) * k * t_seq for n in (16, 32, 64)}
        assert dense.one_f_one_b_microbatch(steps, batch, p, nodes_per_replica) == pytest.approx(k)


def test_mt_nlg_runs_two_sequences_per_micro_batch(dense):
    """The paper's scaling pins k = 1.95 (not 1: one sequence per micro-batch would put the 420-node
    step at 42.6 s, published 44.4); only the MT-NLG source is mapped so."""
    k = dense.one_f_one_b_microbatch(dense.MT_NLG_STEP_S, dense.MT_NLG_GLOBAL_BATCH, dense.MT_NLG_PP,
                                     dense.MT_NLG_REPLICA_NODES)
    assert 1.8 < k < 2.1
    assert dense.mt_nlg_microbatch("mt-nlg") == 2
    assert dense.mt_nlg_microbatch("narayanan21") == 0


@pytest.mark.skipif(not MODERN.is_file(), reason="shared/validation/published_modern.yaml absent")
def test_mt_nlg_row_maps_to_the_micro_batch(dense):
    """The row (microbatch null) is priced with 2 sequences per micro-batch, 96 micro-batches per
    pipeline; a row that states its micro-batch keeps it."""
    import published_rows as pr

    row = next(r for r in pr.load_runs(MODERN) if pr.source_key(r) == "mt-nlg")
    knobs = dict(kv.split("=") for kv in pr.case_for(row).strategy.split(","))
    assert (knobs["mbs"], knobs["gbs"], knobs["dp"], knobs["pp"]) == ("2", "1920", "10", "35")
    stated = dict(row, parallel=dict(row["parallel"], microbatch=1))
    assert "mbs=1," in pr.case_for(stated).strategy


def test_megascale_probe_line_splits_per_micro_batch_and_per_step():
    """``megascale_probe.line`` recovers a·m + c from steps built that way (the probe's two-term reading)."""
    sys.path.insert(0, str(BENCH))
    from megascale_probe import line

    a, c = line([192, 64, 48], [0.1946 * m + 2.65 for m in (192, 64, 48)])
    assert (a, c) == (pytest.approx(0.1946), pytest.approx(2.65))
