"""`autopar trace-routing` (record or synthesise a MoE routing trace) and `autopar experts`
(place experts on expert-parallel ranks from a trace)."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import typer
from rich.console import Console
from rich.table import Table

from autopar.cli import paths
from autopar.cli.app import app
from autopar.errors import InputError
from autopar.fileio import write_atomic

if TYPE_CHECKING:  # numpy loads inside the commands that use it (fast --help)
    import numpy as np

console = Console()


# ----- trace-routing ------------------------------------------------------------------------
@app.command("trace-routing")
def trace_routing(
    model: str | None = typer.Argument(None, help="MoE model: preset, config.json or pkg.mod:fn "
                                       "(omit with --synthetic)"),
    tokens: str | None = typer.Option(None, "--tokens", help="model: token-id file (.pt, .npy, .txt) or a count of "
                                      "random tokens; --synthetic: number of tokens"),
    synthetic: bool = typer.Option(False, "--synthetic", help="generate a trace instead of running a model"),
    experts: int = typer.Option(64, "--experts", min=1, help="synthetic: experts per layer"),
    layers: int = typer.Option(8, "--layers", min=1, help="synthetic: MoE layers"),
    topk: int = typer.Option(2, "--topk", min=1, help="synthetic: experts per token"),
    skew: float = typer.Option(1.0, "--skew", min=0.0,
                               help="synthetic: Zipf exponent of expert popularity (0 = uniform)"),
    affinity: float = typer.Option(0.0, "--affinity", min=0.0, max=1.0,
                                   help="synthetic: 0 = independent layers, 1 = fixed successor"),
    seed: int = typer.Option(0, "--seed", help="RNG seed (synthetic draws, random tokens, model init; "
                      "with --data: train.py's --seed, weights and data order)"),
    data: str | None = typer.Option(None, "--data", help="model: route exactly what an emitted train.py trains on "
                                    "with the same --data, --seed, sequence length and global batch: a token file "
                                    "or folder of *.bin shards, 'sample' (emit's data/sample.bin, train.py's "
                                    "default) or 'synthetic'. Routing depends on the data: without --data the "
                                    "trace is of uniform random tokens, not of the program's"),
    data_dtype: str = typer.Option("auto", "--data-dtype", help="model: --data token dtype, as train.py's"),
    global_batch: int = typer.Option(8, "--global-batch", min=1, help="model: --data sequences per step "
                                     "(the plan's global batch)"),
    steps: int = typer.Option(1, "--steps", min=1, help="model: --data steps traced (all at the initial weights)"),
    seq_len: int = typer.Option(128, "--seq-len", min=1, help="model: sequence length of random tokens / .txt rows "
                                "/ --data windows (the plan's)"),
    batch_size: int = typer.Option(8, "--batch-size", min=1, help="model: sequences per forward pass"),
    out: Path = typer.Option(..., "--out", callback=paths.out_file, help="trace file to write (JSON)"),
    json_out: bool = typer.Option(False, "--json", help="print a JSON summary"),
) -> None:
    """Record per-layer expert loads and layer-to-layer transitions of a MoE model."""
    from autopar.profiles.routing import synthetic_trace

    if synthetic:
        if model is not None:
            raise InputError("trace-routing: give either MODEL or --synthetic, not both")
        trace = synthetic_trace(experts, layers, topk, _count(tokens, 4096), skew, affinity, seed)
    elif model is None:
        raise InputError("trace-routing: give a MODEL (preset, config.json, pkg.mod:fn) or --synthetic")
    else:
        source = _DataSource(data=data, dtype=data_dtype, global_batch=global_batch, steps=steps)
        trace = _trace_model(model, tokens, seq_len, batch_size, seed, source)
    trace.save(out)
    _print_trace_summary(trace, out, json_out)


def _count(text: str | None, default: int, what: str = "--synthetic takes --tokens N") -> int:
    if text is None:
        return default
    try:
        count = int(text)
    except ValueError:
        raise InputError(f"tokens: '{text}' is not a token count; {what}") from None
    if count < 1:
        raise InputError(f"tokens: {count} must be >= 1")
    return count


class _DataSource(NamedTuple):
    """``--data`` and what picks its windows: as the emitted ``train.py`` reads them."""
    data: str | None
    dtype: str
    global_batch: int
    steps: int


def _trace_model(name: str, tokens: str | None, seq_len: int, batch_size: int, seed: int, source: _DataSource):
    import torch

    # Imported here: model code is heavy and only this path needs it.
    from autopar.profiles.intake import resolve_model
    from autopar.profiles.models import build_model
    from autopar.profiles.routing import record_trace

    spec = resolve_model(name)
    if spec.family != "custom" and not spec.is_moe:
        raise InputError(f"model: {spec.short()} has no MoE layers; trace-routing needs num_experts > 0")
    torch.manual_seed(seed)
    net = build_model(spec, device="cpu")
    if hasattr(net, "init_weights"):
        net.init_weights(seed)
    if source.data is not None:
        if tokens is not None:
            raise InputError("trace-routing: give either --tokens or --data, not both")
        ids = _program_inputs(source, _vocab(spec, net), seq_len, seed)
    else:
        ids = _load_tokens(tokens, _vocab(spec, net), seq_len, seed)
    meta = dict(model=name, hidden=spec.hidden or None, seed=seed)
    if source.data is not None:
        meta.update(data=source.data, seq_len=seq_len, global_batch=source.global_batch, steps=source.steps)
    return record_trace(net, ids, batch_size=batch_size, meta=meta)


def _vocab(spec, net) -> int:
    if spec.vocab:
        return spec.vocab
    emb = next((m for m in net.modules() if type(m).__name__ == "Embedding"), None)
    return int(emb.num_embeddings) if emb is not None else 0


def _program_inputs(source: _DataSource, vocab: int, seq_len: int, seed: int):
    """The inputs of an emitted program's steps 1..``steps`` (all its data-parallel rows): its own
    sampler (``codegen.runtime_data``) on the same data, seed, sequence length and global batch."""
    import torch

    from autopar.codegen.runtime_data import DataError, TokenSampler, make_sampler
    from autopar.codegen.sample_data import ALPHABET, sample_bytes, sample_size

    try:
        if source.data == "sample":  # the bytes emit writes to data/sample.bin for this sequence length
            if vocab < len(ALPHABET):
                raise InputError(f"--data: vocab {vocab} cannot hold the sample's {len(ALPHABET)} symbols; fix: give "
                                 "a token file")
            raw, _ = sample_bytes(vocab, sample_size(seq_len))
            shard = torch.frombuffer(bytearray(raw), dtype=torch.uint16 if vocab <= 1 << 16 else torch.uint32)
            sampler = TokenSampler([shard], seq_len, source.global_batch, seed)
        else:
            sampler = make_sampler(source.data, vocab, seq_len, source.global_batch, seed, source.dtype)
    except DataError as exc:
        raise InputError(str(exc)) from None
    return torch.cat([sampler.next_batch()[:, :-1] for _ in range(source.steps)])


def _load_tokens(tokens: str | None, vocab: int, seq_len: int, seed: int):
    """A token-id file (.pt tensor, .npy, or text rows of ids), else N random ids."""
    import torch

    if tokens is not None and Path(tokens).is_file():
        ids = _read_token_file(Path(tokens), seq_len)
    else:
        if vocab <= 0:
            raise InputError("tokens: cannot tell the model's vocabulary size; pass --tokens FILE with token ids")
        count = _count(tokens, 8 * seq_len, "give an existing token-id file or a number of random tokens")
        n_seq = max(1, -(-count // seq_len))
        ids = torch.randint(0, vocab, (n_seq, seq_len), generator=torch.Generator().manual_seed(seed))
    if ids.numel() == 0 or ids.min() < 0 or (vocab and ids.max() >= vocab):
        raise InputError(f"tokens: ids must lie in 0..{vocab - 1} (got {int(ids.min())}..{int(ids.max())})")
    return ids


def _read_token_file(path: Path, seq_len: int):
    import numpy as np
    import torch

    try:
        if path.suffix == ".pt":
            ids = torch.as_tensor(torch.load(path, map_location="cpu", weights_only=True))
        elif path.suffix == ".npy":
            ids = torch.as_tensor(np.load(path))
        else:
            flat = np.array(path.read_text().replace(",", " ").split(), dtype=np.int64)
            ids = torch.as_tensor(flat[: len(flat) // seq_len * seq_len]).reshape(-1, seq_len)
    except Exception as exc:  # any unreadable file is an input problem
        raise InputError(f"tokens: cannot read {path}: {type(exc).__name__}: {exc}") from None
    if ids.dtype.is_floating_point or ids.dim() not in (1, 2):
        raise InputError(f"tokens: {path} must hold integer ids shaped [batch, seq] or [seq]")
    return ids.long().reshape(1, -1) if ids.dim() == 1 else ids.long()


def _print_trace_summary(trace, out: Path, json_out: bool) -> None:
    import numpy as np

    load, C = trace.load_array, trace.transitions_array
    mean = load.sum(axis=1) / trace.num_experts
    summary = dict(out=str(out), num_layers=trace.num_layers, num_experts=trace.num_experts, topk=trace.topk,
                   tokens=trace.tokens, max_expert_load_over_mean=float((load.max(axis=1) / np.maximum(mean, 1)).max()),
                   top_successor_share=float(C.max(axis=2).sum() / C.sum()) if C.sum() else 0.0)
    if json_out:
        print(json.dumps(summary))
        return
    console.print(f"wrote {out}: {trace.num_layers} MoE layers x {trace.num_experts} experts, top-{trace.topk}, "
                  f"{trace.tokens} tokens; hottest expert {summary['max_expert_load_over_mean']:.2f}x the mean, "
                  f"{summary['top_successor_share']:.1%} of transitions go to each expert's top successor")


# ----- experts ---------------------------------------------------------------------------------
@app.command("experts")
def experts_cmd(
    trace_path: Path = typer.Argument(..., metavar="TRACE", help="routing trace from `autopar trace-routing`"),
    ep: int = typer.Option(..., "--ep", min=1, help="expert-parallel ranks G"),
    replicas: int = typer.Option(0, "--replicas", min=0, help="extra copies of hot experts per layer"),
    time_limit: float = typer.Option(60.0, "--time-limit", min=0.001, help="seconds for bound + search (or the ILP)"),
    solver: str | None = typer.Option(None, "--solver", help="exact ILP backend: cbc or highs "
                                      "(default: highs if installed)"),
    method: str = typer.Option("auto", "--method", help="auto, exact (pulp ILP) or search (scales)"),
    a2a_cost: float = typer.Option(1.0, "--a2a-cost", min=0.0, help="time to move one token copy over the time to "
                                   "compute it on one expert"),
    bytes_per_token: float | None = typer.Option(None, "--bytes-per-token", min=0.0,
                                                 help="default: 2 * hidden (bf16), 8192 if unknown"),
    gap: float = typer.Option(0.0, "--gap", min=0.0,
                              help="search: stop once the proven gap is at most this (0.02 = 2%)"),
    seed: int = typer.Option(0, "--seed", help="seed of the search restarts and the random baseline"),
    out: Path | None = typer.Option(None, "--out", callback=paths.out_file, help="placement file to write (JSON)"),
    plot: Path | None = typer.Option(None, "--plot", callback=paths.out_file,
                                     help="heat map PNG of load per rank per layer"),
    json_out: bool = typer.Option(False, "--json", help="print the report as JSON"),
) -> None:
    """Assign each MoE layer's experts to EP ranks: balanced load, few cross-rank tokens."""
    import numpy as np

    from autopar.planner.experts import (
        contiguous,
        make_problem,
        placement_stats,
        random_placement,
        round_robin,
        solve_placement,
    )
    from autopar.profiles.routing import RoutingTrace

    if solver is not None and solver not in ("cbc", "highs"):
        raise InputError(f"solver: '{solver}' is not one of cbc, highs")
    if not 0 <= gap < 1:
        raise InputError(f"gap: {gap} must be in [0, 1)")
    if time_limit <= 0:
        raise InputError(f"time-limit: {time_limit} must be > 0 seconds")
    trace = RoutingTrace.load_file(trace_path)
    placement = solve_placement(trace, ep, replicas, method=method, time_limit_s=time_limit, solver=solver,
                                a2a_cost=a2a_cost, seed=seed, target_gap=gap)
    bpt = bytes_per_token or 2.0 * (trace.meta.get("hidden") or 4096)
    p = make_problem(trace, ep, replicas, a2a_cost=a2a_cost)
    rows = {"placement": placement_stats(trace, placement, bpt, a2a_cost)}
    default = contiguous(p)
    if default is not None:   # what the emitted program runs without --placement
        rows["default"] = placement_stats(trace, default, bpt, a2a_cost)
    rows |= {"round-robin": placement_stats(trace, round_robin(p), bpt, a2a_cost),
            "random": placement_stats(trace, random_placement(p, seed), bpt, a2a_cost)}
    if out is not None:
        placement.save(out)
    if plot is not None:
        plot_load_heatmap({k: np.asarray(v["rank_load"]) for k, v in rows.items() if k != "random"}, plot)
    report = _report(placement, rows, bpt)
    if json_out:
        print(json.dumps(report))
    else:
        _print_report(report, rows, out, plot)


def _report(placement, rows: dict, bpt: float) -> dict:
    mine, rr, rnd = rows["placement"], rows["round-robin"], rows["random"]
    return dict(
        cross_rank_tokens=mine["cross_rank_tokens"], round_robin_cross_rank_tokens=rr["cross_rank_tokens"],
        random_cross_rank_tokens=rnd["cross_rank_tokens"],
        cross_rank_reduction_vs_round_robin=1 - mine["cross_rank_tokens"] / rr["cross_rank_tokens"]
        if rr["cross_rank_tokens"] else 0.0,
        max_load_ratio=mine["max_load_ratio"], round_robin_max_load_ratio=rr["max_load_ratio"],
        random_max_load_ratio=rnd["max_load_ratio"],
        a2a_bytes_per_rank_max=mine["a2a_bytes_per_rank_max"], a2a_bytes_per_rank_mean=mine["a2a_bytes_per_rank_mean"],
        round_robin_a2a_bytes_per_rank_max=rr["a2a_bytes_per_rank_max"], bytes_per_token=bpt,
        objective=placement.objective, lower_bound=placement.lower_bound, gap=placement.gap,
        solve_time_s=placement.solve_time_s, method=placement.method, solver=placement.solver,
        ep=placement.ep, replicas=placement.replicas, **_default_keys(mine, rows.get("default")))


def _default_keys(mine: dict, default: dict | None) -> dict:
    """Against the program's default placement (absent with replicas: only a placement places copies)."""
    if default is None:
        return {}
    return dict(default_cross_rank_tokens=default["cross_rank_tokens"],
                default_max_load_ratio=default["max_load_ratio"],
                cross_rank_reduction_vs_default=1 - mine["cross_rank_tokens"] / default["cross_rank_tokens"]
                if default["cross_rank_tokens"] else 0.0)


def _print_report(report: dict, rows: dict, out: Path | None, plot: Path | None) -> None:
    table = Table(title=f"expert placement, ep={report['ep']}, replicas={report['replicas']}")
    for col in ("", "cross tokens", "share", "a2a MB max", "a2a MB mean", "max/mean", "objective"):
        table.add_column(col, justify="right" if col else "left")
    for name, s in rows.items():
        table.add_row(name, f"{s['cross_rank_tokens']:,.0f}", f"{s['cross_fraction']:.1%}",
                      f"{s['a2a_bytes_per_rank_max'] / 1e6:,.1f}", f"{s['a2a_bytes_per_rank_mean'] / 1e6:,.1f}",
                      f"{s['max_load_ratio']:.3f}", f"{s['objective']:,.1f}")
    console.print(table)
    console.print(f"lower bound {report['lower_bound']:,.1f}, gap {report['gap']:.2%}, "
                  f"{report['method']} ({report['solver']}) in {report['solve_time_s']:.1f} s; cross-rank tokens "
                  f"{report['cross_rank_reduction_vs_round_robin']:.1%} below round-robin"
                  + (f", {report['cross_rank_reduction_vs_default']:.1%} below the default placement"
                     if "cross_rank_reduction_vs_default" in report else ""))
    for label, path in (("placement", out), ("heat map", plot)):
        if path is not None:
            console.print(f"wrote {label} {path}")


def plot_load_heatmap(loads: dict[str, np.ndarray], path: Path) -> None:
    """One panel per placement: rank load over the layer's mean load, layers down, ranks across."""
    import matplotlib
    import numpy as np

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    ratios = {k: v / np.maximum(v.mean(axis=1, keepdims=True), 1e-12) for k, v in loads.items()}
    vmax = max(float(r.max()) for r in ratios.values())
    fig, axes = plt.subplots(1, len(ratios), figsize=(4.5 * len(ratios), 4), squeeze=False,
                             constrained_layout=True)
    for ax, (name, r) in zip(axes[0], ratios.items()):
        im = ax.imshow(r, aspect="auto", cmap="magma", vmin=0.0, vmax=vmax, interpolation="nearest")
        v = loads[name]
        ax.set_title(f"{name}: max/mean {v.max(axis=1).sum() / max(v.mean(axis=1).sum(), 1e-12):.3f}")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("EP rank")
        ax.set_ylabel("MoE layer")
    fig.colorbar(im, ax=axes[0].tolist(), label="rank load / layer mean")
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    write_atomic(path, buf.getvalue())
