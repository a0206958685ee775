"""`autopar inspect MODEL`: per-layer-type table of a model from its captured graph."""

from __future__ import annotations

import json
import time
from typing import TYPE_CHECKING

import typer
from rich.console import Console
from rich.table import Table

from autopar.cli.app import app
from autopar.errors import InputError
from autopar.profiles.intake import resolve_model

if TYPE_CHECKING:  # capture imports torch: only inside the command
    from autopar.profiles.layer_stats import LayerGroup, ModelStats


@app.command("inspect")
def inspect_command(
    model: str = typer.Argument(..., help="preset name, path to a config.json, or factory pkg.mod:fn"),
    seq_len: int = typer.Option(None, "--seq-len", min=1, help="sequence length (default: the model's max_seq_len)"),
    micro_batch: int = typer.Option(1, "--micro-batch", min=1, help="sequences per micro-batch"),
    dtype: str = typer.Option("bf16", "--dtype", help="parameter / activation dtype: bf16, fp16, fp32"),
    input_shape: str = typer.Option(None, "--input-shape", help="example input shape of a factory, e.g. 2,128"),
    input_dtype: str = typer.Option("int64", "--input-dtype", help="example input dtype of a factory"),
    as_json: bool = typer.Option(False, "--json", help="print one JSON object instead of a table"),
    hf: bool = typer.Option(False, "--hf", help="capture the transformers module of the config.json as itself"),
) -> None:
    """Capture MODEL's graph and print parameters, FLOPs and saved activations per layer type."""
    t0 = time.perf_counter()
    model = model if not hf or model.startswith("hf:") else f"hf:{model}"
    spec = resolve_model(model, input_shape=_parse_shape(input_shape), input_dtype=_check_dtype(input_dtype))
    from autopar.profiles.graph import capture
    from autopar.profiles.layer_stats import summarize

    default = spec.input_shape[-1] if spec.hf_config and spec.input_shape else spec.max_seq_len  # HF: capped context
    stats = summarize(capture(spec, seq_len or default, micro_batch, dtype))
    report = inspect_report(stats, spec.short(), time.perf_counter() - t0)
    if as_json:
        print(json.dumps(report, indent=2))
    else:
        _print_table(report)


def _parse_shape(text: str | None) -> list[int] | None:
    if not text:
        return None
    try:
        shape = [int(x) for x in text.replace(" ", "").split(",") if x]
    except ValueError:
        raise InputError(f"--input-shape: '{text}' must be comma-separated integers, e.g. 2,128") from None
    if not shape or any(d <= 0 for d in shape):
        raise InputError(f"--input-shape: '{text}' must list positive sizes, e.g. 2,128")
    return shape


def _check_dtype(name: str) -> str:
    allowed = ("int64", "float32", "bfloat16", "float16")
    if name not in allowed:
        raise InputError(f"--input-dtype: '{name}' is not one of {', '.join(allowed)}")
    return name


def inspect_report(stats: ModelStats, title: str, wall_s: float) -> dict:
    """The table's content as plain data (what ``--json`` prints)."""
    tokens = stats.tokens
    return {
        "model": title,
        "seq_len": stats.seq_len,
        "micro_batch": stats.micro_batch,
        "dtype": stats.dtype,
        "groups": [_group_row(g, tokens) for g in stats.groups],
        "totals": {
            "params": stats.params,
            "params_active": stats.params_active,
            "train_flops_per_token_6n": stats.train_flops_6n_per_token,
            "train_flops_per_token": stats.train_flops_per_token,
            "fwd_flops_per_token": stats.fwd_flops_per_token,
            "saved_bytes_per_token": stats.saved_bytes_per_token,
        },
        "capture_time_s": round(stats.capture_time_s, 3),
        "wall_time_s": round(wall_s, 3),
    }


def _group_row(g: LayerGroup, tokens: int) -> dict:
    return {
        "name": g.name, "kind": g.kind, "count": g.count, "layers": _ranges(g.indices),
        "is_moe": g.is_moe, "params": g.params, "params_tp": g.params_tp,
        "params_replicated": g.params_replicated, "params_expert": g.params_expert,
        "params_embedding": g.params_embedding, "params_tied": g.params_tied,
        "fwd_flops_per_token": g.fwd_flops / tokens, "saved_bytes_per_token": g.saved_bytes / tokens,
        "temp_bytes_per_token": sum(t.bytes for t in g.temporaries) / tokens,
    }


def _ranges(indices: list[int]) -> str:
    """[0, 1, 2, 5] -> '0-2,5'."""
    parts, start = [], None
    for i, x in enumerate(indices):
        if start is None:
            start = x
        if i + 1 == len(indices) or indices[i + 1] != x + 1:
            parts.append(str(start) if start == x else f"{start}-{x}")
            start = None
    return ",".join(parts)


def _si(x: float, unit: str = "") -> str:
    for scale, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= scale:
            return f"{x / scale:.2f} {prefix}{unit}".rstrip()
    return f"{x:.0f} {unit}".rstrip()


def _bytes(x: float) -> str:
    for scale, prefix in ((2**30, "GiB"), (2**20, "MiB"), (2**10, "KiB")):
        if x >= scale:
            return f"{x / scale:.2f} {prefix}"
    return f"{x:.0f} B"


def _print_table(report: dict) -> None:
    console = Console()
    table = Table(title=f"{report['model']}  seq_len={report['seq_len']} micro_batch={report['micro_batch']} "
                        f"{report['dtype']}")
    for col in ("group", "count", "layers", "params / layer", "fwd FLOPs / token", "saved / token"):
        table.add_column(col, justify="left" if col in ("group", "layers") else "right")
    for g in report["groups"]:
        saved = _bytes(g["saved_bytes_per_token"])
        if g["temp_bytes_per_token"]:
            saved += f" (+{_bytes(g['temp_bytes_per_token'])} temp)"
        table.add_row(g["name"], str(g["count"]), g["layers"] or "-", _si(g["params"]),
                      _si(g["fwd_flops_per_token"]), saved)
    console.print(table)
    t = report["totals"]
    active = f" ({_si(t['params_active'])} active)" if t["params_active"] != t["params"] else ""
    console.print(f"params: {_si(t['params'])}{active} = {t['params']:,}")
    console.print(f"training FLOPs / token: 6N = {_si(t['train_flops_per_token_6n'])}, "
                  f"graph = {_si(t['train_flops_per_token'])} (forward + backward, no recompute)")
    console.print(f"activations saved / token: {_bytes(t['saved_bytes_per_token'])}")
    console.print(f"capture: {report['capture_time_s']:.2f} s (total {report['wall_time_s']:.2f} s)")
