"""ZeRO-1's bucket memory as the program allocates it (``runtime_zero1.Bucket``) and as
``cost_models.memory.zero1_reduce_bytes`` prices it: the bytes beyond the whole gradients, counted on CPU by
``codegen.runtime_mem.LiveTensorBytes`` over a fake process group (the collectives allocate nothing of their own
there, as NCCL writes into the buffers the program gives it). A parameter larger than a span is reduced alone: in
place where its elements divide by the group, else copied whole into a zero-padded flat buffer while its gradient
lives (``memory.packed_bytes``)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from autopar.codegen import runtime_zero1
from autopar.codegen.runtime_mem import LiveTensorBytes
from autopar.core.strategy import Strategy
from autopar.cost_models import memory
from autopar.cost_models.runtime_memory import zero1_bucket_bytes

CAP = 4096                           # bytes per span, the program's and the price's
SMALL = (300, 500, 700, 900, 1200)   # the rest of the bucket: several spans, some packed


def _measured_excess(table: int, n: int, dtype: torch.dtype, table_first: bool = True) -> tuple[int, int]:
    """(peak live bytes beyond the whole gradients, elements in the bucket) of one step's backward and reduce
    of a bucket whose first parameter (reduced last, as the input embedding) has ``table`` elements."""
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore

    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=n)
    try:
        sizes = (table, *SMALL) if table_first else (*SMALL, table)
        params = [torch.nn.Parameter(torch.ones(k, dtype=dtype)) for k in sizes]
        bucket = runtime_zero1.Bucket(params, dist.group.WORLD, n, dtype, backwards=1, cap_bytes=CAP)
        bucket.arm()
        with LiveTensorBytes() as live:
            sum((p * 1.5).sum() for p in params).backward()
            bucket.reduce()
        numel = sum(sizes)
        return live.peak - numel * params[0].element_size(), numel
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("dtype,n,table", [
    ("fp32", 2, 3001 * 7),   # odd: the embedding copied whole beside the fp32 outputs
    ("bf16", 5, 3001 * 7),   # not divisible by 5: the copy beside the issued outputs outgrows outputs + fp32 grads
    ("fp32", 2, 3000 * 8),   # divisible: reduced in place, nothing copied at the end
    ("bf16", 5, 3000 * 8),
])
def test_the_price_is_what_the_bucket_allocates(monkeypatch, dtype, n, table):
    monkeypatch.setattr(memory, "ZERO1_BUCKET_BYTES", CAP)
    excess, numel = _measured_excess(table, n, torch.float32 if dtype == "fp32" else torch.bfloat16)
    s = Strategy.parse(f"dp={n},zero=1").resolve(n)
    priced = memory.zero1_reduce_bytes(numel, 0.0, s, dtype, last_numel=table)
    # the program pads each parameter to n rows and holds the loss's scalars: a few elements per parameter
    assert excess == pytest.approx(priced, abs=8 * n * (len(SMALL) + 1))


def test_a_head_reduced_first_is_copied_before_anything_is_issued(monkeypatch):
    """An untied output head (the bucket's first span): its copy beside nothing issued yet."""
    monkeypatch.setattr(memory, "ZERO1_BUCKET_BYTES", CAP)
    excess, numel = _measured_excess(3001 * 7, 5, torch.bfloat16, table_first=False)
    s = Strategy.parse("dp=5,zero=1").resolve(5)
    assert excess <= memory.zero1_reduce_bytes(numel, 0.0, s, "bf16", first_numel=3001 * 7) + 8 * 5 * 6
    assert memory.packed_bytes(3001 * 7, 5, 2) == 5 * 4202 * 2 and memory.packed_bytes(3000 * 8, 5, 2) == 0.0


def _cm(vocab: int, hidden: int, tied: bool, dtype: str = "fp32"):
    table = float(vocab * hidden)
    return SimpleNamespace(spec=SimpleNamespace(vocab=vocab, hidden=hidden), dtype=dtype,
                           embedding=SimpleNamespace(params_vocab=table),
                           output=SimpleNamespace(params_vocab=0.0 if tied else table,
                                                  params_tied=table if tied else 0.0))


def test_the_ranks_vocab_tables_reach_the_price():
    """The first rank prices its embedding as the last span, the last rank an untied head as the first span and a
    pipeline's tied copy as a late (last) one; ceil(vocab / tp) rows per tp rank."""
    vocab, hidden = 50001, 4096   # 50001 * 4096 / 3 rows is not whole
    table = vocab * hidden
    dp3 = Strategy.parse("dp=3,zero=1").resolve(3)
    blocks = 1e9
    untied, tied = _cm(vocab, hidden, False), _cm(vocab, hidden, True)
    dense = blocks + 2 * table
    got = zero1_bucket_bytes(untied, dp3, dense, 0.0, True, True)
    assert got == memory.zero1_reduce_bytes(dense, 0.0, dp3, "fp32", table, table)
    assert zero1_bucket_bytes(untied, dp3, blocks, 0.0, False, False) == memory.zero1_reduce_bytes(blocks, 0.0, dp3,
                                                                                                   "fp32")
    pp = Strategy.parse("dp=3,pp=2,zero=1").resolve(6)
    assert zero1_bucket_bytes(tied, pp, blocks, 0.0, False, True) == memory.zero1_reduce_bytes(
        blocks + table, 0.0, pp, "fp32", 0.0, table)
    tp = Strategy.parse("dp=3,tp=2,zero=1").resolve(6)
    assert zero1_bucket_bytes(tied, tp, blocks, 0.0, True, True) == memory.zero1_reduce_bytes(
        blocks, 0.0, tp, "fp32", 0.0, 25001 * hidden)
