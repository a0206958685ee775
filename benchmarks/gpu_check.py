"""GPU truth in one run: profile, closed-loop validate and one emitted program on this device.

Called by ``benchmarks/gpu_check.sh`` (which prepares the Python environment); it can also be
run directly: ``python benchmarks/gpu_check.py --out DIR [--dry-run]``.

Steps (each bounded by its own time budget so the whole check fits in about 8 minutes):

1. ``env.json``: GPU name, driver, torch / CUDA versions, the autopar commit;
2. ``autopar profile`` on a small Llama-style model and a small MoE (bf16, GEMMs in the
   large-matrix regime), both into one measured profile ``profile-<gpu>-measured.json``;
3. ``autopar validate --nproc 1`` on both across micro-batch sizes, recomputation
   off / selective / full, bf16 and fp32, and FSDP2 (``zero=3``) on one rank, predicted with the
   fresh profile; every strategy is priced again with the shipped datasheet profile
   (``autopar estimate``) so both errors stand side by side;
4. one emitted program for 20 steps with mixed precision and checkpointing on;
5. ``summary.json`` and ``summary.md`` (per-configuration table and MAPE of both profiles).

``--dry-run`` runs the same steps on CPU (gloo) with tiny sizes: that is how CI tests it.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
CONFIGS = HERE / "gpu_check_models"


class Case:
    """One model of the check: its config, shapes and the strategies it validates."""

    def __init__(self, name: str, config: Path, seq_len: int, global_batch: int, strategies: dict[str, list[str]]):
        self.name, self.config, self.seq_len, self.global_batch = name, config, seq_len, global_batch
        self.strategies = strategies  # dtype -> strategy strings


def cases(dry: bool) -> list[Case]:
    """Large-matrix shapes on a GPU (h=4096 GEMMs, 4k tokens per micro-batch); tiny ones on CPU."""
    llama_bf16 = ["dp=1,mbs=1", "dp=1,mbs=2", "dp=1,mbs=1,recompute=selective", "dp=1,mbs=2,recompute=full",
                  "dp=1,mbs=1,zero=3"]
    llama_fp32 = ["dp=1,mbs=1"]
    moe_bf16 = ["dp=1,mbs=1", "dp=1,mbs=2,recompute=full"]
    if dry:  # the same kinds of runs, fewer, all fp32: the shipped CPU profile has no bf16 peak
        return [Case("llama", CONFIGS / "llama-tiny.json", 64, 4, {"fp32": llama_bf16[::4]}),
                Case("moe", CONFIGS / "moe-tiny.json", 64, 4, {"fp32": moe_bf16[:1]})]
    return [Case("llama", CONFIGS / "llama-gpu.json", 4096, 4, {"bf16": llama_bf16, "fp32": llama_fp32}),
            Case("moe", CONFIGS / "moe-gpu.json", 4096, 4, {"bf16": moe_bf16})]


def autopar(args: list[str], log: Path, timeout_s: float) -> subprocess.CompletedProcess:
    """``python -m autopar ARGS`` with its output appended to ``log``; never raises on failure."""
    cmd = [sys.executable, "-m", "autopar", *args]
    with log.open("a") as fh:
        fh.write(f"\n$ {' '.join(cmd)}\n")
        fh.flush()
        try:
            proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=fh, text=True, timeout=timeout_s)
        except subprocess.TimeoutExpired:
            fh.write(f"timed out after {timeout_s:.0f} s\n")
            return subprocess.CompletedProcess(cmd, 124, "", "")
        fh.write(proc.stdout[-4000:])
    return proc


def environment(device: str) -> dict:
    """What ran: device, driver, torch and CUDA versions, the code's commit."""
    import torch

    info = {"device": device, "torch": torch.__version__, "cuda": torch.version.cuda, "python": sys.version.split()[0],
            "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "commit": _git_commit()}
    if device == "cuda" and torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=props.name, gpu_mem_bytes=props.total_memory, sm_count=props.multi_processor_count,
                    driver=_nvidia_smi("driver_version"), power_limit_w=_nvidia_smi("power.limit"))
    else:
        info.update(gpu="cpu", driver=None)
    return info


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(HERE.parent), "rev-parse", "HEAD"], capture_output=True, text=True)
        return out.stdout.strip() or None
    except OSError:
        return None


def _nvidia_smi(field: str) -> str | None:
    if not shutil.which("nvidia-smi"):
        return None
    out = subprocess.run(["nvidia-smi", f"--query-gpu={field}", "--format=csv,noheader"], capture_output=True,
                         text=True)
    return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None


def main_dtype(device: str) -> str:
    """bf16 on a GPU (what people train in); fp32 on CPU, where the shipped profile has no bf16 peak."""
    return "bf16" if device == "cuda" else "fp32"


def datasheet_profile(gpu_name: str) -> str:
    """The shipped profile a user would pick for this device (the baseline the measurement is judged against)."""
    name = gpu_name.lower()
    for key, profile in (("h200", "h200"), ("h100", "h100-sxm"), ("h800", "h800"), ("a100", "a100-80g")):
        if key in name:
            return profile
    return "cpu" if name == "cpu" else "h100-sxm"


def profile_models(cs: list[Case], device: str, dtype: str, out: Path, name: str, budget_s: float, log: Path) -> bool:
    """Measure both models' ops into one profile (the second run extends the first)."""
    ok = True
    for i, case in enumerate(cs):
        args = ["profile", str(case.config), "--device", device, "--dtype", dtype, "--seq-len", str(case.seq_len),
                "--budget-s", str(budget_s), "--out", str(out), "--name", name]
        if i:
            args.append("--extend")
        ok &= autopar(args, log, timeout_s=budget_s * 3 + 120).returncode == 0
    return ok and out.is_file()


def validate_case(case: Case, dtype: str, device: str, gpu: str, profile: Path | None, work: Path, steps: int,
                  log: Path) -> list[dict]:
    """``autopar validate --nproc 1`` over the case's strategies; its per-strategy rows. ``profile``
    (measured in the check's main dtype) predicts the runs in that dtype; the others are priced from
    the datasheet ``gpu`` alone."""
    folder = work / f"validate-{case.name}-{dtype}"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "strategies.txt").write_text("\n".join(case.strategies[dtype]) + "\n")
    args = ["validate", str(case.config), "--nproc", "1", "--device", device, "--strategies",
            str(folder / "strategies.txt"), "--seq-len", str(case.seq_len), "--global-batch", str(case.global_batch),
            "--steps", str(steps), "--warmup", "2", "--dtype", dtype, "--out", str(folder / "runs"), "--json",
            "--gpu", gpu]
    if profile is not None and dtype == main_dtype(device):
        args += ["--profile", str(profile)]
    proc = autopar(args, log, timeout_s=120 + 90 * len(case.strategies[dtype]))
    try:
        rows = json.loads(proc.stdout)["strategies"]
    except (json.JSONDecodeError, KeyError):
        return [{"name": s, "strategy": s, "status": "failed", "error": "validate printed no report",
                 "model": case.name, "dtype": dtype}
                for s in case.strategies[dtype]]
    return [{**r, "model": case.name, "dtype": dtype} for r in rows]


def datasheet_prediction(case: Case, row: dict, gpu: str, log: Path) -> dict:
    """The same strategy priced with the shipped profile: step time and tensor bytes (no framework overhead)."""
    args = ["estimate", str(case.config), "--gpu", gpu, "--gpus-per-node", "1", "--seq-len", str(case.seq_len),
            "--global-batch", str(case.global_batch), "--dtype", row["dtype"], "--strategy", row["strategy"], "--json"]
    proc = autopar(args, log, timeout_s=120)
    try:
        est = json.loads(proc.stdout)
    except json.JSONDecodeError:
        return {}
    mem = est["memory"]
    return {"datasheet_time_s": est["step_time_s"],
            "datasheet_mem_bytes": mem["peak_bytes"] - mem["breakdown"].get("framework_overhead", 0.0)}


def run_emitted(case: Case, device: str, gpu: str, profile: Path | None, work: Path, steps: int, log: Path) -> dict:
    """plan -> emit -> ``steps`` steps of the program (mixed precision on a GPU) with a checkpoint every
    half-run."""
    run_dir, plan = work / "emitted", work / "plan.json"
    args = ["plan", str(case.config), "--gpu", gpu, "--gpus-per-node", "1", "--seq-len", str(case.seq_len),
            "--global-batch", str(case.global_batch), "--dtype", main_dtype(device), "--out", str(plan)]
    if profile is not None:
        args += ["--profile", str(profile)]
    if autopar(args, log, timeout_s=300).returncode != 0:
        return {"status": "failed", "error": "plan failed (see log.txt)"}
    if autopar(["emit", str(plan), "--out", str(run_dir), "--device", device], log, timeout_s=120).returncode:
        return {"status": "failed", "error": "emit failed (see log.txt)"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "1",
           str(run_dir / "train.py"), "--steps", str(steps), "--ckpt-every", str(max(1, steps // 2)),
           "--ckpt-dir", str(run_dir / "checkpoints")]
    t0 = time.time()
    with (work / "emitted.log").open("w") as fh:
        code = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, cwd=run_dir, timeout=600).returncode
    text = (work / "emitted.log").read_text()
    ckpts = sorted(p.name for p in (run_dir / "checkpoints").glob("*")) if (run_dir / "checkpoints").is_dir() else []
    return {"status": "ok" if code == 0 else "failed", "exit_code": code, "wall_s": round(time.time() - t0, 1),
            "checkpoints": ckpts, "log_tail": text[-1500:]}


def ape(pred: float | None, meas: float | None) -> float | None:
    """Absolute percentage error of a prediction against a measurement."""
    if not pred or not meas:
        return None
    return 100.0 * abs(pred - meas) / meas


def under(pred: float | None, meas: float | None) -> float | None:
    """How far (percent) a memory prediction falls short of the measurement (0 when it does not)."""
    if not pred or not meas:
        return None
    return max(0.0, 100.0 * (meas - pred) / meas)


def error_columns(row: dict) -> dict:
    """Time and memory errors of both profiles for one validated strategy."""
    t, m = row.get("measured_time_s"), row.get("measured_mem_bytes")
    return {"time_err_measured_pct": ape(row.get("predicted_time_s"), t),
            "time_err_datasheet_pct": ape(row.get("datasheet_time_s"), t),
            "mem_err_measured_pct": ape(row.get("predicted_mem_bytes"), m),
            "mem_err_datasheet_pct": ape(row.get("datasheet_mem_bytes"), m),
            "mem_under_measured_pct": under(row.get("predicted_mem_bytes"), m),
            "mem_under_datasheet_pct": under(row.get("datasheet_mem_bytes"), m)}


def summarize(rows: list[dict]) -> dict:
    """Mean / max of each error column over the strategies that ran."""
    ok = [r for r in rows if r.get("status") == "ok"]
    out: dict = {"ran": len(ok), "failed": len(rows) - len(ok)}
    for key in ("time_err_measured_pct", "time_err_datasheet_pct", "mem_err_measured_pct", "mem_err_datasheet_pct",
                "mem_under_measured_pct", "mem_under_datasheet_pct"):
        vals = [r[key] for r in ok if r.get(key) is not None]
        out[key] = {"mean": sum(vals) / len(vals), "max": max(vals)} if vals else None
    return out


def markdown(env: dict, rows: list[dict], summary: dict, emitted: dict) -> str:
    """The comparison table docs/validation.md takes over verbatim."""
    lines = [f"# GPU check: {env.get('gpu')} (driver {env.get('driver')}, torch {env.get('torch')}, "
             f"CUDA {env.get('cuda')}), {env.get('date')}", "",
             "| model | dtype | strategy | measured ms | pred. ms (measured / datasheet) | time err % | "
             "measured GiB | pred. GiB (measured / datasheet) | mem err % | status |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(_md_row(r))
    lines += ["", "| error (mean / max %) | measured profile | datasheet profile |", "|---|---|---|"]
    for label, key in (("step time", "time_err"), ("peak memory", "mem_err"), ("memory under-prediction", "mem_under")):
        measured, datasheet = summary.get(key + "_measured_pct"), summary.get(key + "_datasheet_pct")
        lines.append(f"| {label} | {_mm(measured)} | {_mm(datasheet)} |")
    lines += ["", f"Emitted program ({emitted.get('status')}): {emitted.get('wall_s')} s, checkpoints "
              f"{emitted.get('checkpoints')}", ""]
    return "\n".join(lines)


def _md_row(r: dict) -> str:
    def ms(x):
        return f"{1e3 * x:.1f}" if x else "-"

    def gib(x):
        return f"{x / 2**30:.2f}" if x else "-"

    def pct(x):
        return f"{x:.1f}" if x is not None else "-"

    return (f"| {r.get('model')} | {r.get('dtype')} | {r.get('name')} | {ms(r.get('measured_time_s'))} | "
            f"{ms(r.get('predicted_time_s'))} / {ms(r.get('datasheet_time_s'))} | "
            f"{pct(r.get('time_err_measured_pct'))} / {pct(r.get('time_err_datasheet_pct'))} | "
            f"{gib(r.get('measured_mem_bytes'))} | {gib(r.get('predicted_mem_bytes'))} / "
            f"{gib(r.get('datasheet_mem_bytes'))} | {pct(r.get('mem_err_measured_pct'))} / "
            f"{pct(r.get('mem_err_datasheet_pct'))} | {r.get('status')} |")


def _mm(stat: dict | None) -> str:
    return f"{stat['mean']:.1f} / {stat['max']:.1f}" if stat else "-"


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("gpu-check-out"), help="folder for every result")
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny sizes: the same steps in a few minutes")
    ap.add_argument("--budget-s", type=float, default=None, help="profile budget per model (default 60, dry 6)")
    ap.add_argument("--steps", type=int, default=None, help="validate steps per strategy (default 8, dry 4)")
    return ap.parse_args()


def main() -> int:
    a = parse_args()
    device = "cpu" if a.dry_run else "cuda"
    budget = a.budget_s or (6.0 if a.dry_run else 60.0)
    steps = a.steps or (4 if a.dry_run else 8)
    env = environment(device)
    if device == "cuda" and env["gpu"] == "cpu":
        print("gpu_check: no CUDA device visible to torch; use --dry-run on a CPU machine", file=sys.stderr)
        return 2
    work, log = a.out / "work", a.out / "log.txt"
    work.mkdir(parents=True, exist_ok=True)
    (a.out / "env.json").write_text(json.dumps(env, indent=2) + "\n")
    cs = cases(a.dry_run)
    baseline = datasheet_profile(env["gpu"])
    prof_name = f"{baseline}-measured" if device == "cuda" else "cpu-dry-run"
    profile = a.out / f"profile-{prof_name}.json"
    t0 = time.time()
    measured = profile_models(cs, device, main_dtype(device), profile, prof_name, budget, log)
    print(f"[gpu_check] profile {'ok' if measured else 'FAILED'} in {time.time() - t0:.0f} s", flush=True)
    rows = validate_all(cs, device, profile if measured else None, work, steps, log, baseline)
    print(f"[gpu_check] validate: {sum(r.get('status') == 'ok' for r in rows)}/{len(rows)} ran "
          f"({time.time() - t0:.0f} s)", flush=True)
    emitted = run_emitted(cs[0], device, baseline, profile if measured else None, work, 6 if a.dry_run else 20, log)
    print(f"[gpu_check] emitted program {emitted['status']} ({time.time() - t0:.0f} s)", flush=True)
    summary = {**summarize(rows), "profile_measured": measured, "datasheet_profile": baseline,
               "wall_s": round(time.time() - t0, 1)}
    result = {"env": env, "summary": summary, "strategies": rows, "emitted": emitted}
    (a.out / "summary.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    (a.out / "summary.md").write_text(markdown(env, rows, summary, emitted))
    print((a.out / "summary.md").read_text())
    return 0 if measured and summary["ran"] and emitted["status"] == "ok" else 1


def validate_all(cs: list[Case], device: str, profile: Path | None, work: Path, steps: int, log: Path,
                 baseline: str) -> list[dict]:
    """Every (model, dtype) validated with the fresh profile, then priced with the datasheet one."""
    rows = []
    for case in cs:
        for dtype in case.strategies:
            for row in validate_case(case, dtype, device, baseline, profile, work, steps, log):
                if row.get("status") == "ok":
                    row.update(datasheet_prediction(case, row, baseline, log))
                rows.append({**row, **error_columns(row)})
    return rows


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
