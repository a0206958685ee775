"""Convert a per-token routing log to an autopar routing trace (format_version 1).

Input: CSV rows ``layer,token,expert`` (a header line is allowed), one row per expert a token
picks in a MoE layer, so top-k routing gives k rows per (layer, token). Layer ids may be any
integers (for example the model's block indices 3..60); they are sorted and renumbered 0..L-1,
and the original ids are kept in ``meta.layer_ids``. Every token must appear in every layer
with the same number of experts.

    python benchmarks/convert_trace.py routes.csv --out trace.json [--experts 64]

Traces from other tools (DeepSpeed, Megatron, vLLM routing dumps) convert the same way once
written as such rows; the counting is ``autopar.profiles.routing.counts_from_routes``.
"""

from __future__ import annotations

import argparse
import sys

import numpy as np

from autopar.errors import InputError
from autopar.profiles.routing import RoutingTrace, counts_from_routes


def read_rows(path: str) -> np.ndarray:
    """[N, 3] int array of (layer, token, expert); skips a non-numeric header line."""
    with open(path) as fh:
        first = fh.readline()
        skip = 0 if first.replace(",", "").replace(" ", "").strip().lstrip("-").isdigit() else 1
    try:
        rows = np.loadtxt(path, delimiter=",", dtype=np.int64, skiprows=skip, ndmin=2)
    except ValueError as exc:
        raise InputError(f"{path}: rows must be integers 'layer,token,expert' ({exc})") from None
    if rows.shape[1] != 3 or len(rows) == 0:
        raise InputError(f"{path}: expected rows 'layer,token,expert', got {rows.shape[1]} columns")
    if rows.min() < 0:
        raise InputError(f"{path}: negative layer, token or expert id")
    return rows


def rows_to_trace(rows: np.ndarray, num_experts: int | None = None, source: str = "") -> RoutingTrace:
    layer_ids = np.unique(rows[:, 0])
    token_ids = np.unique(rows[:, 1])
    E = num_experts or int(rows[:, 2].max()) + 1
    if rows[:, 2].max() >= E:
        raise InputError(f"expert id {rows[:, 2].max()} >= --experts {E}")
    routes = []
    for lid in layer_ids:
        sub = rows[rows[:, 0] == lid]
        sub = sub[np.lexsort((sub[:, 2], sub[:, 1]))]             # by token, then expert
        tokens, per_token = np.unique(sub[:, 1], return_counts=True)
        if len(tokens) != len(token_ids) or per_token.min() != per_token.max():
            raise InputError(f"layer {lid}: every token must pick the same number of experts in every layer")
        routes.append(sub[:, 2].reshape(len(tokens), per_token[0]))
    if len({r.shape[1] for r in routes}) != 1:
        raise InputError("top-k differs between layers")
    load, trans = counts_from_routes(routes, E)
    meta = dict(source=f"converted:{source}", layer_ids=layer_ids.tolist())
    return RoutingTrace.from_arrays(load, trans, topk=routes[0].shape[1], tokens=len(token_ids), meta=meta)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("csv", help="per-token routing rows layer,token,expert")
    ap.add_argument("--out", required=True, help="trace JSON to write")
    ap.add_argument("--experts", type=int, default=None, help="experts per layer (default: max id + 1)")
    args = ap.parse_args(argv)
    try:
        trace = rows_to_trace(read_rows(args.csv), args.experts, source=args.csv)
    except InputError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        sys.exit(2)
    trace.save(args.out)
    print(f"wrote {args.out}: {trace.num_layers} layers x {trace.num_experts} experts, top-{trace.topk}, "
          f"{trace.tokens} tokens")


if __name__ == "__main__":
    main()
