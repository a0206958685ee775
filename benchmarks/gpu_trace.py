"""Where an emitted program's step goes on one GPU: torch.profiler summaries of chosen strategies.

    python benchmarks/gpu_trace.py --out DIR            # on a CUDA machine, about 90 s
    python benchmarks/gpu_trace.py --out DIR --dry-run  # the same on CPU with tiny models

For each case: ``autopar plan --strategy`` (the strategy fixed, one GPU) -> ``autopar emit`` -> the
program for a few steps with ``--profile-steps`` on one step; then the Chrome trace is reduced to
``summary-<case>.json`` and one ``summary.md``: the step time the program printed, GPU busy time
(sum of kernel durations), the top kernels and CPU ops by total time, and the CUDA runtime calls
that block the host (``cudaStreamSynchronize``, device-to-host copies) with their counts. The
summaries size the terms a price is missing (``docs/experts.md``, ``docs/validation.md`` cite them).
"""

from __future__ import annotations

import argparse
import gzip
import json
import shutil
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

HERE = Path(__file__).resolve().parent
MODELS = HERE / "gpu_check_models"
# name -> (config, strategy); the GPU-check models at seq 4096, global batch 4
# (llama-mbs1-full: its re-run separates host_bound's backward ratio from kernels per op call: fit_kernel_rates)
CASES = {"moe-mbs1": ("moe-gpu.json", "dp=1,mbs=1"), "llama-mbs1": ("llama-gpu.json", "dp=1,mbs=1"),
         "llama-mbs1-z3": ("llama-gpu.json", "dp=1,mbs=1,zero=3"),
         "llama-mbs1-full": ("llama-gpu.json", "dp=1,mbs=1,recompute=full")}
BLOCKING = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "cudaMemcpy")


def run(cmd: list[str], log: Path, cwd: Path | None = None, timeout_s: float = 300) -> int:
    with log.open("a") as fh:
        fh.write("\n$ " + " ".join(cmd) + "\n")
        fh.flush()
        try:
            return subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, cwd=cwd, timeout=timeout_s).returncode
        except subprocess.TimeoutExpired:
            fh.write(f"timed out after {timeout_s:.0f} s\n")
            return 124


def trace_case(name: str, work: Path, log: Path, dry: bool, steps: int) -> Path | None:
    """plan -> emit -> run with a profiled step; the Chrome trace's path (None on failure)."""
    config, strategy = CASES[name]
    model = MODELS / (config.replace("-gpu", "-tiny") if dry else config)
    seq, gpu, device = ("64", "cpu", "cpu") if dry else ("4096", "h100-sxm", "cuda")
    folder = work / name
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    dtype = "fp32" if dry else "bf16"
    cli = [sys.executable, "-m", "autopar"]
    if run([*cli, "plan", str(model), "--gpu", gpu, "--gpus-per-node", "1", "--seq-len", seq, "--global-batch", "4",
            "--dtype", dtype, "--strategy", strategy, "--out", str(folder / "plan.json")], log):
        return None
    if run([*cli, "emit", str(folder / "plan.json"), "--out", str(folder / "prog"), "--device", device], log):
        return None
    prof = folder / "prof"
    code = run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "1", "train.py",
                "--steps", str(steps), "--profile-steps", str(steps - 1), "--profile-dir", str(prof),
                "--metrics-file", str(folder / "metrics.jsonl")], log, cwd=folder / "prog")
    traces = sorted(prof.glob("trace_step*_rank0.json"))
    return traces[0] if code == 0 and traces else None


def summarize(trace: Path, metrics: Path, top: int = 25) -> dict:
    """Kernel, CPU-op and blocking-call totals of one Chrome trace (durations in microseconds)."""
    events = json.loads(trace.read_text()).get("traceEvents", [])
    totals: dict[str, dict[str, list[float]]] = {"kernel": defaultdict(lambda: [0, 0.0]),
                                                 "cpu_op": defaultdict(lambda: [0, 0.0]),
                                                 "cuda_runtime": defaultdict(lambda: [0, 0.0])}
    for e in events:
        cat = e.get("cat")
        if cat in totals and e.get("ph") == "X":
            slot = totals[cat][e.get("name", "?")[:120]]
            slot[0] += 1
            slot[1] += float(e.get("dur", 0.0))
    lines = [json.loads(x) for x in metrics.read_text().splitlines() if x.strip()] if metrics.is_file() else []
    step = lines[-1] if lines else {}

    def ranked(cat: str) -> list[dict]:
        rows = sorted(totals[cat].items(), key=lambda kv: -kv[1][1])[:top]
        return [{"name": n, "count": c, "total_ms": round(t / 1e3, 3)} for n, (c, t) in rows]

    blocking = {n: {"count": c, "total_ms": round(t / 1e3, 3)} for n, (c, t) in totals["cuda_runtime"].items()
                if n.startswith(BLOCKING)}
    return {"step_time_s": step.get("step_time_s"), "pred_step_time_s": step.get("pred_step_time_s"),
            "profiled_step_wall_note": "the profiled step runs slower than the others (profiler overhead)",
            "kernel_busy_ms": round(sum(t for _, t in totals["kernel"].values()) / 1e3, 3),
            "kernel_launches": sum(c for c, _ in totals["kernel"].values()),
            "blocking_calls": blocking, "top_kernels": ranked("kernel"), "top_cpu_ops": ranked("cpu_op")}


def markdown(results: dict[str, dict]) -> str:
    out = ["# gpu_trace: where each profiled step goes", ""]
    for name, s in results.items():
        if "error" in s:
            out += [f"## {name}: {s['error']}", ""]
            continue
        out += [f"## {name}", "", f"step {s['step_time_s']} s (predicted {s['pred_step_time_s']} s); kernels busy "
                f"{s['kernel_busy_ms']} ms in {s['kernel_launches']} launches (profiled step)",
                "", "blocking calls: " + ", ".join(f"{k} x{v['count']} ({v['total_ms']} ms)"
                                                  for k, v in s["blocking_calls"].items()), "",
                "| kernel | count | ms |", "|---|---|---|"]
        out += [f"| {k['name'][:90]} | {k['count']} | {k['total_ms']} |" for k in s["top_kernels"][:15]]
        out += ["", "| cpu op (inclusive) | count | ms |", "|---|---|---|"]
        out += [f"| {k['name'][:90]} | {k['count']} | {k['total_ms']} |" for k in s["top_cpu_ops"][:20]]
        out.append("")
    return "\n".join(out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny models")
    ap.add_argument("--cases", default=",".join(CASES), help=f"comma list of {', '.join(CASES)}")
    ap.add_argument("--steps", type=int, default=4, help="steps per run; the last one is profiled")
    ap.add_argument("--keep-trace", default="moe-mbs1", help="case whose raw trace is kept (gzipped) in --out")
    a = ap.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    work, log, results = a.out / "work", a.out / "log.txt", {}
    for name in a.cases.split(","):
        trace = trace_case(name, work, log, a.dry_run, a.steps)
        if trace is None:
            results[name] = {"error": "plan, emit or the run failed (see log.txt)"}
            continue
        results[name] = summarize(trace, work / name / "metrics.jsonl")
        (a.out / f"summary-{name}.json").write_text(json.dumps(results[name], indent=1) + "\n")
        if name == a.keep_trace:
            with gzip.open(a.out / f"trace-{name}.json.gz", "wb") as fh:
                fh.write(trace.read_bytes())
        (a.out / "summary.md").write_text(markdown(results))
        print(f"[gpu_trace] {name}: step {results[name]['step_time_s']} s, kernels "
              f"{results[name]['kernel_busy_ms']} ms", flush=True)
    return 0 if all("error" not in r for r in results.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
