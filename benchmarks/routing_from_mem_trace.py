"""The routing an expert-parallel program ran, read from its allocation traces, as a routing trace.

    AUTOPAR_MEM_TRACE=DIR autopar validate moe-tiny --nproc 4 --strategies FILE ...   # one ep strategy
    python benchmarks/routing_from_mem_trace.py DIR --moe-layers 3 --experts 8 --topk 2 --out routing.json

Every MoE layer of ``codegen/runtime_moe.py`` sends the expert id of each dispatched row with an
``all_to_all_single`` (int64): its output's length on rank r is the number of routed token copies r
received. ``AUTOPAR_MEM_TRACE`` (``codegen/runtime_mem.py``) records that allocation, in order, for
each micro-batch's forward; the backward sends no ids. Per layer, the copies of every rank summed
over the traced step's micro-batches are split evenly over ``experts / ep`` contiguous experts of
the rank (the placement the cost model assumes for a trace alone, ``moe_load``), so that
``autopar memory/estimate/validate --trace`` prices the busiest rank's load as the program had it.
Transitions are left independent between layers (only the rank loads are measured).
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import numpy as np

from autopar.profiles.routing import RoutingTrace

IDS = re.compile(r"^\d+ \d+ _c10d_functional\.all_to_all_single\.default \((\d+),\) int64$")


def received_copies(trace_file: Path) -> list[int]:
    """Routed copies received per MoE layer call, in program order (the id exchanges)."""
    return [int(m.group(1)) for line in trace_file.read_text().splitlines() if (m := IDS.match(line))]


def rank_loads(folder: Path, moe_layers: int) -> np.ndarray:
    """[layers, ranks] routed copies received, summed over the traced micro-batches."""
    files = sorted(folder.glob("trace_rank*.txt"), key=lambda p: int(p.stem.removeprefix("trace_rank")))
    loads = []
    for f in files:
        calls = np.array(received_copies(f))
        if len(calls) == 0 or len(calls) % moe_layers:
            raise SystemExit(f"{f}: {len(calls)} id exchanges, not a multiple of --moe-layers {moe_layers}")
        loads.append(calls.reshape(-1, moe_layers).sum(axis=0))
    return np.stack(loads, axis=1)


def to_trace(per_rank: np.ndarray, experts: int, topk: int) -> RoutingTrace:
    layers, ep = per_rank.shape
    load = np.zeros((layers, experts), dtype=np.int64)
    block = experts // ep
    for r in range(ep):
        share = per_rank[:, r] // block
        load[:, r * block:(r + 1) * block] = share[:, None]
        load[:, r * block] += per_rank[:, r] - share * block
    tokens = int(load[0].sum()) // topk
    trans = np.zeros((max(layers - 1, 0), experts, experts), dtype=np.int64)
    for l in range(layers - 1):
        t = np.floor(np.outer(load[l], load[l + 1]) / (tokens * topk)).astype(np.int64)
        t[0, 0] += tokens * topk * topk - t.sum()
        trans[l] = t
    return RoutingTrace.from_arrays(load, trans, topk=topk, tokens=tokens,
                                    meta={"source": "routing_from_mem_trace.py (per-rank loads of a run)"})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folder", type=Path, help="AUTOPAR_MEM_TRACE folder (trace_rank<R>.txt)")
    ap.add_argument("--moe-layers", type=int, required=True)
    ap.add_argument("--experts", type=int, required=True)
    ap.add_argument("--topk", type=int, default=2)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    per_rank = rank_loads(args.folder, args.moe_layers)
    trace = to_trace(per_rank, args.experts, args.topk)
    trace.save(args.out)
    mean = per_rank.mean(axis=1, keepdims=True)
    print(f"copies per layer and rank:\n{per_rank}\nbusiest rank over the mean per layer: "
          f"{np.round(per_rank.max(axis=1) / mean[:, 0], 3)}; rank totals over the mean: "
          f"{np.round(per_rank.sum(axis=0) / per_rank.sum(axis=0).mean(), 3)}\nwrote {args.out}")


if __name__ == "__main__":
    main()
