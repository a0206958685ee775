"""The CPU peak-memory tracker (codegen/runtime_mem.py): views allocate nothing, and the
peak dump (``AUTOPAR_MEM_PEAK_DUMP``) names what is live at the peak."""

from __future__ import annotations

import torch

from autopar.codegen.runtime_mem import LiveTensorBytes


def test_views_of_storages_made_before_the_mode_are_not_counted():
    tokens = torch.frombuffer(bytearray(4096), dtype=torch.uint16)  # like runtime_data's mapped file
    tracker = LiveTensorBytes()
    with tracker:
        window = tokens[10:42]           # a view: allocates nothing
        assert tracker.current == 0
        batch = window.to(torch.int64)   # a copy: 32 * 8 bytes
        assert tracker.current == 256
        row = batch[:16]                 # a view of a counted storage: still 256
        assert tracker.current == 256
        del batch, row
        assert tracker.current == 0
    assert tracker.peak == 256


def test_peak_dump_lists_what_is_live_at_the_peak(tmp_path, monkeypatch):
    monkeypatch.setenv("AUTOPAR_MEM_PEAK_DUMP", str(tmp_path))
    tracker = LiveTensorBytes()
    with tracker:
        a = torch.ones(100, 10)
        b = torch.zeros(50)
        del b                            # the peak (4000 + 200) had both
        tracker.stop()
    del a
    lines = (tmp_path / "peak_rank0.txt").read_text().splitlines()
    assert lines[0] == "peak 4200 bytes"
    assert "aten.ones.default (100, 10) float32" in lines[1] and lines[1].split()[0] == "4000"
    assert "aten.zeros.default (50,) float32" in lines[2]


def test_trace_records_every_change_after_reset_peak(tmp_path, monkeypatch):
    monkeypatch.setenv("AUTOPAR_MEM_TRACE", str(tmp_path))
    tracker = LiveTensorBytes()
    with tracker:
        a = torch.ones(100, 10)          # before reset_peak: not in the trace
        tracker.reset_peak()
        b = torch.zeros(50)
        del b
        tracker.stop()
    del a
    lines = (tmp_path / "trace_rank0.txt").read_text().splitlines()
    assert lines == ["4200 200 aten.zeros.default (50,) float32", "4000 -200 free aten.zeros.default (50,) float32"]
