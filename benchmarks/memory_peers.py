"""autopar's per-rank memory estimate next to llm-analysis's and DeepSpeed's estimators and the
measured peak, for the strategies of a closed-loop validation (`autopar validate ... --out DIR`).

The peer estimators are not project dependencies: install them in a separate environment and
name its interpreter with ``--peers-python`` (each estimate runs there in a subprocess):

    python -m venv /tmp/peers-venv
    echo "$PWD/.venv/lib/python3.11/site-packages" > /tmp/peers-venv/lib/python3.11/site-packages/torch.pth
    /tmp/peers-venv/bin/pip install llm-analysis deepspeed
    .venv/bin/python benchmarks/memory_peers.py validate-out/validation.json --peers-python /tmp/peers-venv/bin/python

(the ``.pth`` line lends the peers this project's torch instead of a second download).

What each column counts, per rank, in MiB (all compared with the measured peak of live tensor
bytes, max over ranks):
- autopar: the worst rank's predicted peak without the framework overhead (the same figure
  `autopar validate` compares).
- llm-analysis (``LLMAnalysis.training``): weights + gradients + optimizer states + activations
  of one micro-batch, with tp / pp / dp / ep / sp and DeepSpeed ZeRO stage; fp32 weights and
  activations (``DtypeConfig`` 32 bits), no separate master copy (``master_weights_dtype_bytes=0``,
  fp32 training). Its latency path asserts 16-bit types, so its TFLOPS lookup is stubbed (the
  latency is not used).
- DeepSpeed (``estimate_zero2/zero3_model_states_mem_needs``): model states only (no
  activations), for data-parallel ZeRO strategies; mixed-precision Adam (16 bytes a parameter)
  is all it knows, so its figure is for that, not for fp32. Strategies with tp or pp: n/a.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

MiB = 2**20

# Run in the peers' interpreter: one JSON line in, one JSON line out.
PEER_SNIPPET = r'''
import contextlib, io, json, sys
job = json.loads(sys.argv[1])
out = {}
try:
    from llm_analysis.analysis import DSZeRO, LLMAnalysis, ActivationRecomputation
    from llm_analysis.config import DtypeConfig, GPUConfig, ModelConfig, ParallelismConfig
    m = ModelConfig(**job["model"])
    g = GPUConfig(name="cpu", mem_per_GPU_in_GB=12, hbm_bandwidth_in_GB_per_sec=20,
                  intra_node_bandwidth_in_GB_per_sec=1, intra_node_min_message_latency=1e-4, peak_fp16_TFLOPS=0.17)
    d = DtypeConfig(name="w32a32e32", weight_bits=32, activation_bits=32, embedding_bits=32)
    a = LLMAnalysis(m, g, d, ParallelismConfig(**job["parallel"]))
    a.get_TFLOPS_per_gpu = lambda: 0.17  # latency only; it asserts 16-bit weights
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        r = a.training(batch_size_per_gpu=job["mbs"], gradient_accumulation_steps=job["n_micro"],
                       seq_len=job["seq_len"], ds_zero=DSZeRO(job["zero"]), flash_attn=True,
                       activation_recomputation=ActivationRecomputation(job["recompute"]),
                       master_weights_dtype_bytes=0)
    out["llm_analysis"] = r["(weight+op_state+grad+act)_memory_per_gpu"]
except Exception as exc:
    out["llm_analysis_error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
try:
    if job["ds"] is not None:
        with contextlib.redirect_stdout(io.StringIO()):
            if job["ds"]["stage"] == 3:
                from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs as f
                _, gpu, _ = f(total_params=job["ds"]["params"], largest_layer_params=job["ds"]["largest"],
                              num_gpus_per_node=job["ds"]["gpus"], num_nodes=1, cpu_offload=False,
                              cpu_offload_params=False, zero_init=True)
            else:
                from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs as f
                _, gpu = f(total_params=job["ds"]["params"], num_gpus_per_node=job["ds"]["gpus"], num_nodes=1,
                           cpu_offload=False)
        out["deepspeed"] = gpu
except Exception as exc:
    out["deepspeed_error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
print(json.dumps(out))
'''


def peer_job(spec, row: dict, seq_len: int, world: int, params: float, largest: float) -> dict:
    """The estimators' inputs for one strategy of the validation."""
    s = row["strategy_fields"]
    ffn = spec.moe_ffn_hidden if spec.is_moe else spec.ffn_hidden
    model = {"name": spec.name, "num_layers": spec.layers, "n_head": spec.heads, "hidden_dim": spec.hidden,
             "vocab_size": spec.vocab, "max_seq_len": seq_len, "num_key_value_heads": spec.kv_heads,
             "ffn_embed_dim": ffn, "expansion_ratio": ffn / spec.hidden,  # both given: no divisibility assert
             "moe_num_experts": max(1, spec.num_experts or 1), "moe_top_k": max(1, spec.topk or 1)}
    parallel = {"tp_size": s["tp"], "pp_size": s["pp"], "dp_size": s["dp"], "ep_size": s["ep"],
                "sp_size": s["tp"] if s["sequence_parallel"] else 1}
    n_micro = s["global_batch"] // (s["micro_batch"] * s["dp"])
    pure_dp = s["tp"] == 1 and s["pp"] == 1 and s["ep"] == 1
    ds = {"stage": 3 if s["zero_stage"] >= 3 else 2, "params": params, "largest": largest, "gpus": world} \
        if pure_dp and s["zero_stage"] >= 1 else None
    recompute = {"none": 0, "selective": 1, "full": 2}[s["recompute"]]
    return {"model": model, "parallel": parallel, "mbs": s["micro_batch"], "n_micro": n_micro, "seq_len": seq_len,
            "zero": s["zero_stage"], "recompute": recompute, "ds": ds}


def run_peer(python: str, job: dict) -> dict:
    try:
        res = subprocess.run([python, "-c", PEER_SNIPPET, json.dumps(job)], capture_output=True, text=True,
                             timeout=300)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return {"llm_analysis_error": str(exc), "deepspeed_error": str(exc)}
    lines = [ln for ln in res.stdout.splitlines() if ln.startswith("{")]
    if not lines:
        err = (res.stderr.strip().splitlines() or ["no output"])[-1]
        return {"llm_analysis_error": err, "deepspeed_error": err}
    return json.loads(lines[-1])


def model_counts(spec) -> tuple[float, float]:
    """(total parameters, largest block's parameters) of the model, from its meta build."""
    from autopar.profiles.models import build_model

    net = build_model(spec, "meta")
    total = sum(p.numel() for p in net.parameters())
    largest = max(sum(p.numel() for p in blk.parameters()) for blk in net.layers.values())
    return float(total), float(largest)


def compare(validation: Path, python: str) -> list[dict]:
    from autopar.core.plan import Plan
    from autopar.core.strategy import Strategy

    data = json.loads(validation.read_text())
    rows = []
    for r in data["strategies"]:
        if r["status"] != "ok":
            continue
        plan = Plan.load(Path(r["log"]).parent / "plan.json")
        r["strategy_fields"] = Strategy.parse(r["strategy"]).model_dump()
        params, largest = model_counts(plan.model)
        peer = run_peer(python, peer_job(plan.model, r, plan.seq_len, plan.cluster.world, params, largest))
        rows.append({"name": r["name"], "measured": r["measured_mem_bytes"], "autopar": r["predicted_mem_bytes"],
                     **peer})
    return rows


def cell(x, meas: float) -> str:
    if x is None:
        return "n/a"
    return f"{x / MiB:.1f} ({(x - meas) / meas * 100:+.0f}%)"


def markdown(rows: list[dict], title: str) -> str:
    out = [f"### {title}", "", "| strategy | measured MiB | autopar | llm-analysis | DeepSpeed (model states) |",
           "|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r['name']} | {r['measured'] / MiB:.1f} | {cell(r['autopar'], r['measured'])} | "
                   f"{cell(r.get('llm_analysis'), r['measured'])} | {cell(r.get('deepspeed'), r['measured'])} |")
    out.append("")
    out += ["- mean |error|: " + ", ".join(f"{k} {_mape(rows, k)}" for k in ("autopar", "llm_analysis", "deepspeed"))]
    errors = {r.get(k) for r in rows for k in ("llm_analysis_error", "deepspeed_error") if r.get(k)}
    out += [f"- estimator error: {e}" for e in sorted(errors)]
    return "\n".join(out) + "\n"


def _mape(rows: list[dict], key: str) -> str:
    errs = [abs(r[key] - r["measured"]) / r["measured"] * 100 for r in rows if r.get(key) is not None]
    return f"{sum(errs) / len(errs):.1f}% over {len(errs)}" if errs else "n/a"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("validation", nargs="+", type=Path, help="validation.json files from `autopar validate`")
    ap.add_argument("--peers-python", default="/tmp/peers-venv/bin/python",
                    help="interpreter with llm-analysis and deepspeed installed")
    args = ap.parse_args()
    for path in args.validation:
        if not path.is_file():
            sys.exit(f"error: {path} does not exist; run `autopar validate MODEL --nproc N --out DIR` first")
        meta = json.loads(path.read_text())
        rows = compare(path, args.peers_python)
        print(markdown(rows, f"{meta['model']}, {meta['nproc']} {meta['device']} ranks, seq {meta['seq_len']}, "
                             f"global batch {meta['global_batch']}, {meta['dtype']}"))


if __name__ == "__main__":
    main()
