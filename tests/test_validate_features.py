"""benchmarks/validate_published.py --by-feature: each row's signed error lands in the bin of each feature its
strategy, model and step hold, grouped by source and GPU type (issue 12: a pattern by feature inside one table)."""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture
def vp():
    sys.path.insert(0, str(BENCH))
    import validate_published

    return validate_published


def _row(vp, source: str, gpu: str, seq: int, mbs: int, recompute: str, pub_over_pred: float):
    """A priced row whose published step is ``pub_over_pred`` x the predicted 1 s (error = that - 1)."""
    from autopar.core.strategy import Strategy

    s = Strategy(dp=8, micro_batch=mbs, global_batch=8 * mbs * 4, recompute=recompute)
    est = SimpleNamespace(strategy=s, world=8, tokens=s.global_batch * seq, model_flops=6e9 * s.global_batch * seq)
    case = SimpleNamespace(source=source, gpu=gpu, seq_len=seq)
    return vp.pr.Priced(case, 1.0, pub_over_pred, est)


def test_rows_bin_by_feature_within_their_source_and_gpu(vp):
    rows = [_row(vp, "foundry", "a100-80g", 2048, 4, "full", 0.9),
            _row(vp, "foundry", "a100-80g", 8192, 1, "none", 1.2),
            _row(vp, "foundry", "h100-sxm", 2048, 4, "full", 1.0)]
    table = vp.feature_table(rows)
    a80 = table["foundry", "a100-80g"]
    assert a80["recompute"] == {"full": [pytest.approx(-0.1)], "none": [pytest.approx(0.2)]}
    assert set(a80["tokens/micro-batch"]) == {"<=16384"}   # 8,192 tokens both ways: one bin
    assert set(a80["seq len"]) == {"<=4096", "<=16384"}
    assert a80["micro-batches"] == {"<=4": [pytest.approx(-0.1), pytest.approx(0.2)]}
    assert a80["model GFLOP/token"] == {"<=16": [pytest.approx(-0.1), pytest.approx(0.2)]}  # 6 GFLOP per token
    assert table["foundry", "h100-sxm"]["recompute"] == {"full": [0.0]}


def test_bins_print_in_value_order(vp):
    # one feature's bins are of one kind: powers (numerically, not as text), pp x vpp (pp first), or names
    assert sorted(["<=256", "<=16", "<=1"], key=vp._bin_order) == ["<=1", "<=16", "<=256"]
    assert sorted(["8x5", "16x1", "2x12"], key=vp._bin_order) == ["2x12", "8x5", "16x1"]
    assert sorted(["none", "full"], key=vp._bin_order) == ["full", "none"]
    assert vp._pow_bin(1, 4) == "<=1" and vp._pow_bin(4096, 4) == "<=4096" and vp._pow_bin(4097, 4) == "<=16384"
