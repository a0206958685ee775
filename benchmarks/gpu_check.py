"""GPU truth in one run: profile, closed-loop validate and one emitted program on this device.

Called by ``benchmarks/gpu_check.sh`` (which prepares the Python environment); it can also be
run directly: ``python benchmarks/gpu_check.py --out DIR [--dry-run] [--quick]``.

Steps (each bounded by its own time budget so the whole check fits in about 8 minutes):

1. ``env.json``: GPU name, driver, torch / CUDA versions, the autopar commit;
2. ``autopar profile`` on a small Llama-style model and a small MoE (bf16, GEMMs in the
   large-matrix regime), both into one measured profile ``profile-<gpu>-measured.json``;
3. ``autopar validate --nproc 1`` on both across micro-batch sizes, recomputation
   off / selective / full, bf16 and fp32, and FSDP2 (``zero=3``) on one rank, predicted with the
   fresh profile; every strategy is priced again with the shipped datasheet profile
   (``autopar estimate``, run beside the validation: it needs only the CPU) so both errors stand
   side by side;
4. one emitted program for 20 steps with mixed precision and one checkpoint at the end (none when
   the model's checkpoint would exceed ``--ckpt-max-gb``: the check model's is ~13 GB);
5. ``summary.json`` and ``summary.md`` (per-configuration table and MAPE of both profiles),
   rewritten after every step: a check cut short by a timeout keeps what it finished
   (``summary.json`` "done" lists the steps, "complete" is false until the end).

``--quick`` fits a short device session (<= 170 s plus the shell set-up): profile budget 15 s per model,
llama bf16 mbs 1 and 2 in one validate call, the emitted program for 8 steps, then the MoE mbs 1
if the deadline (``--deadline-s``, default 170 s in quick mode) leaves time; no fp32. A step that
would run past the deadline is skipped and says so in the summary; a running one is stopped at it.
``--dry-run`` runs the same steps on CPU (gloo) with tiny sizes: that is how CI tests it.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
CONFIGS = HERE / "gpu_check_models"


class Case:
    """One model of the check: its config, shapes and the strategies it validates."""

    def __init__(self, name: str, config: Path, seq_len: int, global_batch: int, strategies: dict[str, list[str]]):
        self.name, self.config, self.seq_len, self.global_batch = name, config, seq_len, global_batch
        self.strategies = strategies  # dtype -> strategy strings


def cases(dry: bool, quick: bool = False) -> list[Case]:
    """Large-matrix shapes on a GPU (h=4096 GEMMs, 4k tokens per micro-batch); tiny ones on CPU.
    ``quick``: llama bf16 mbs 1 and 2, MoE mbs 1 (no recomputation, FSDP2 or fp32 runs)."""
    llama_bf16 = ["dp=1,mbs=1", "dp=1,mbs=2", "dp=1,mbs=1,recompute=selective", "dp=1,mbs=2,recompute=full",
                  "dp=1,mbs=1,zero=3"]
    llama_fp32 = ["dp=1,mbs=1"]
    moe_bf16 = ["dp=1,mbs=1", "dp=1,mbs=2,recompute=full"]
    if dry:  # the same kinds of runs, fewer, all fp32: the shipped CPU profile has no bf16 peak
        llama = llama_bf16[:2] if quick else llama_bf16[::4]
        return [Case("llama", CONFIGS / "llama-tiny.json", 64, 4, {"fp32": llama}),
                Case("moe", CONFIGS / "moe-tiny.json", 64, 4, {"fp32": moe_bf16[:1]})]
    if quick:
        return [Case("llama", CONFIGS / "llama-gpu.json", 4096, 4, {"bf16": llama_bf16[:2]}),
                Case("moe", CONFIGS / "moe-gpu.json", 4096, 4, {"bf16": moe_bf16[:1]})]
    return [Case("llama", CONFIGS / "llama-gpu.json", 4096, 4, {"bf16": llama_bf16, "fp32": llama_fp32}),
            Case("moe", CONFIGS / "moe-gpu.json", 4096, 4, {"bf16": moe_bf16})]


class Clock:
    """Seconds since the check started and what the deadline leaves (None: no deadline)."""

    def __init__(self, deadline_s: float | None):
        self.t0, self.deadline_s = time.time(), deadline_s

    def elapsed(self) -> float:
        return time.time() - self.t0

    def left(self, cap: float) -> float:
        """A step's timeout: its own ``cap``, cut to what the deadline leaves."""
        return cap if self.deadline_s is None else max(0.0, min(cap, self.deadline_s - self.elapsed()))

    def fits(self, need_s: float) -> bool:
        return self.deadline_s is None or self.elapsed() + need_s <= self.deadline_s


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


def profile_one(case: Case, first: bool, device: str, dtype: str, out: Path, name: str, budget_s: float, log: Path,
                clock: Clock) -> bool:
    """Measure one model's ops into the check's profile (a later model ``--extend``s it)."""
    args = ["profile", str(case.config), "--device", device, "--dtype", dtype, "--seq-len", str(case.seq_len),
            "--budget-s", str(budget_s), "--out", str(out), "--name", name] + ([] if first else ["--extend"])
    return autopar(args, log, timeout_s=clock.left(budget_s * 3 + 120)).returncode == 0 and out.is_file()


def validate_case(case: Case, dtype: str, device: str, gpu: str, profile: Path | None, work: Path, steps: int,
                  log: Path, clock: Clock) -> list[dict]:
    """``autopar validate --nproc 1`` over the case's strategies; its per-strategy rows. ``profile``
    (measured in the check's main dtype) predicts the runs in that dtype; the others are priced from
    the datasheet ``gpu`` alone. The datasheet estimates run beside it (CPU only)."""
    folder = work / f"validate-{case.name}-{dtype}"
    folder.mkdir(parents=True, exist_ok=True)
    strategies = case.strategies[dtype]
    (folder / "strategies.txt").write_text("\n".join(strategies) + "\n")
    args = ["validate", str(case.config), "--nproc", "1", "--device", device, "--strategies",
            str(folder / "strategies.txt"), "--seq-len", str(case.seq_len), "--global-batch", str(case.global_batch),
            "--steps", str(steps), "--warmup", "2", "--dtype", dtype, "--out", str(folder / "runs"), "--json",
            "--gpu", gpu]
    if profile is not None and dtype == main_dtype(device):
        args += ["--profile", str(profile)]
    sheets = [start_datasheet(case, dtype, st, gpu) for st in strategies]
    proc = autopar(args, log, timeout_s=clock.left(120 + 90 * len(strategies)))
    try:
        rows = json.loads(proc.stdout)["strategies"]
    except (json.JSONDecodeError, KeyError):
        why = "timed out (see log.txt)" if proc.returncode == 124 else "validate printed no report (see log.txt)"
        rows = [{"name": st, "strategy": st, "status": "failed", "error": why} for st in strategies]
    out = []
    for i, row in enumerate(rows):
        row = {**row, "model": case.name, "dtype": dtype}
        if row.get("status") == "ok" and i < len(sheets):
            row.update(collect_datasheet(sheets[i], log))
        out.append({**row, **error_columns(row)})
    for p in sheets[len(rows):]:
        p.kill()
    return out


def start_datasheet(case: Case, dtype: str, strategy: str, gpu: str) -> subprocess.Popen:
    """The same strategy priced with the shipped profile (``autopar estimate``), started now."""
    args = ["estimate", str(case.config), "--gpu", gpu, "--gpus-per-node", "1", "--seq-len", str(case.seq_len),
            "--global-batch", str(case.global_batch), "--dtype", dtype, "--strategy", strategy, "--json"]
    return subprocess.Popen([sys.executable, "-m", "autopar", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def collect_datasheet(proc: subprocess.Popen, log: Path) -> dict:
    """Step time and tensor bytes (no framework overhead) of a ``start_datasheet`` estimate."""
    try:
        stdout, stderr = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        proc.kill()
        stdout, stderr = "", "timed out after 120 s"
    with log.open("a") as fh:
        fh.write(f"\n$ {' '.join(map(str, proc.args))}\n{stderr[-2000:]}")
    try:
        est = json.loads(stdout)
    except json.JSONDecodeError:
        return {}
    mem = est["memory"]
    return {"datasheet_time_s": est["step_time_s"],
            "datasheet_mem_bytes": mem["peak_bytes"] - mem["breakdown"].get("framework_overhead", 0.0)}


def prepare_emitted(case: Case, device: str, gpu: str, profile: Path | None, work: Path, log: Path,
                    clock: Clock) -> dict | None:
    """plan -> emit of the program the emitted-program step runs (CPU only: it can run beside a
    validation); None when both worked, else the step's failed result."""
    run_dir, plan = work / "emitted", work / "plan.json"
    args = ["plan", str(case.config), "--gpu", gpu, "--gpus-per-node", "1", "--seq-len", str(case.seq_len),
            "--global-batch", str(case.global_batch), "--dtype", main_dtype(device), "--out", str(plan)]
    if profile is not None:
        args += ["--profile", str(profile)]
    if autopar(args, log, timeout_s=clock.left(300)).returncode != 0:
        return {"status": "failed", "error": "plan failed (see log.txt)"}
    if autopar(["emit", str(plan), "--out", str(run_dir), "--device", device], log,
               timeout_s=clock.left(120)).returncode:
        return {"status": "failed", "error": "emit failed (see log.txt)"}
    return None


def run_emitted(work: Path, steps: int, clock: Clock, ckpt_max_gb: float) -> dict:
    """``steps`` steps of the emitted program (mixed precision on a GPU) with one checkpoint at the
    end, none when the plan's checkpoint (parameters + optimizer states) exceeds ``ckpt_max_gb``."""
    run_dir = work / "emitted"
    ckpt_gb = checkpoint_gb(work / "plan.json")
    every = steps if ckpt_gb <= ckpt_max_gb else 0
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "1",
           str(run_dir / "train.py"), "--steps", str(steps), "--ckpt-every", str(every),
           "--ckpt-dir", str(run_dir / "checkpoints")]
    t0 = time.time()
    with (work / "emitted.log").open("w") as fh:
        try:
            code = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, cwd=run_dir,
                                  timeout=clock.left(600)).returncode
        except subprocess.TimeoutExpired:
            code = 124
    text = (work / "emitted.log").read_text()
    ckpts = sorted(p.name for p in (run_dir / "checkpoints").glob("*")) if (run_dir / "checkpoints").is_dir() else []
    return {"status": "ok" if code == 0 else "failed", "exit_code": code, "wall_s": round(time.time() - t0, 1),
            "steps": steps, "checkpoint_gb": round(ckpt_gb, 2), "checkpoints": ckpts,
            "last_step": next((ln for ln in reversed(text.splitlines()) if ln.startswith("step=")), ""),
            "checkpoint_note": "" if every else f"skipped: ~{ckpt_gb:.1f} GB > --ckpt-max-gb {ckpt_max_gb:g}",
            "log_tail": text[-1500:]}


def checkpoint_gb(plan: Path) -> float:
    """Bytes a checkpoint of the plan writes, in GB: parameters + optimizer states of every rank."""
    try:
        p = json.loads(plan.read_text())
        mem = p["predictions"]["memory"]["breakdown"]
        world = math.prod(p["strategy"].get(k, 1) for k in ("dp", "tp", "pp", "cp"))  # an upper bound
        return (mem.get("parameters", 0.0) + mem.get("optimizer_states", 0.0)) * world / 1e9
    except (OSError, json.JSONDecodeError, KeyError, TypeError):
        return float("inf")


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
    emit = (f"Emitted program ({emitted.get('status')}): {emitted.get('steps')} steps in {emitted.get('wall_s')} s, "
            f"checkpoints {emitted.get('checkpoints')} {emitted.get('checkpoint_note') or ''}" if "steps" in emitted
            else f"Emitted program ({emitted.get('status')}) {emitted.get('error') or ''}")
    state = (f"{'Complete' if summary.get('complete') else 'PARTIAL (still running or cut short)'}: "
             f"{summary.get('wall_s')} s, mode {summary.get('mode')}; done: {'; '.join(summary.get('done', []))}"
             + (f"; skipped: {'; '.join(summary['skipped'])}" if summary.get("skipped") else ""))
    last = f"\n\nLast step: `{emitted['last_step']}`" if emitted.get("last_step") else ""
    lines += ["", emit.rstrip() + last, "", state, ""]
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
    ap.add_argument("--quick", action="store_true", help="a short device session (module doc)")
    ap.add_argument("--budget-s", type=float, default=None,
                    help="profile budget per model (default 60, quick 15, dry 6)")
    ap.add_argument("--steps", type=int, default=None, help="validate steps per strategy (default 8, quick 6, dry 4)")
    ap.add_argument("--deadline-s", type=float, default=None,
                    help="skip the steps that would end later than this (default: none, quick 170)")
    ap.add_argument("--ckpt-max-gb", type=float, default=3.0,
                    help="the emitted program writes its one checkpoint only below this size")
    ap.add_argument("--skip-emitted", action="store_true",
                    help="no emitted-program step (a second short session whose first already ran it)")
    return ap.parse_args()


class Check:
    """The results so far; ``write()`` rewrites summary.json / summary.md (atomically) after every step."""

    def __init__(self, out: Path, env: dict, baseline: str, clock: Clock, mode: str):
        self.out, self.env, self.baseline, self.clock, self.mode = out, env, baseline, clock, mode
        self.rows: list[dict] = []
        self.emitted: dict = {"status": "not run"}
        self.profiled: list[str] = []
        self.done: list[str] = []
        self.skipped: list[str] = []

    def step(self, name: str, need_s: float) -> bool:
        """Whether step ``name`` (about ``need_s`` seconds) still fits the deadline; a skip is recorded."""
        if self.clock.fits(need_s):
            return True
        self.skipped.append(f"{name} (needs ~{need_s:.0f} s, {self.clock.elapsed():.0f} s elapsed)")
        self.write()
        return False

    def finish(self, name: str, complete: bool = False) -> None:
        self.done.append(name)
        print(f"[gpu_check] {name} ({self.clock.elapsed():.0f} s)", flush=True)
        self.write(complete)

    def write(self, complete: bool = False) -> dict:
        summary = {**summarize(self.rows), "profile_measured": bool(self.profiled), "profiled": self.profiled,
                   "datasheet_profile": self.baseline, "mode": self.mode, "wall_s": round(self.clock.elapsed(), 1),
                   "complete": complete, "done": self.done, "skipped": self.skipped}
        result = {"env": self.env, "summary": summary, "strategies": self.rows, "emitted": self.emitted}
        _write(self.out / "summary.json", json.dumps(result, indent=2, default=str) + "\n")
        _write(self.out / "summary.md", markdown(self.env, self.rows, summary, self.emitted))
        return summary


def _write(path: Path, text: str) -> None:
    """Atomic: a kill mid-write leaves the previous version."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def main() -> int:
    a = parse_args()
    device = "cpu" if a.dry_run else "cuda"
    budget = a.budget_s or (6.0 if a.dry_run else 15.0 if a.quick else 60.0)
    steps = a.steps or (4 if a.dry_run else 6 if a.quick else 8)
    clock = Clock(a.deadline_s if a.deadline_s is not None else 170.0 if a.quick and not a.dry_run else None)
    env = environment(device)
    if device == "cuda" and env["gpu"] == "cpu":
        print("gpu_check: no CUDA device visible to torch; use --dry-run on a CPU machine", file=sys.stderr)
        return 2
    work, log = a.out / "work", a.out / "log.txt"
    work.mkdir(parents=True, exist_ok=True)
    (a.out / "env.json").write_text(json.dumps(env, indent=2) + "\n")
    check = Check(a.out, env, datasheet_profile(env["gpu"]), clock, "quick" if a.quick else "full")
    check.write()
    cs = cases(a.dry_run, a.quick)
    prof_name = f"{check.baseline}-measured" if device == "cuda" else "cpu-dry-run"
    profile = a.out / f"profile-{prof_name}.json"
    for case in cs:
        if check.step(f"profile {case.name}", budget + 15) and \
                profile_one(case, not check.profiled, device, main_dtype(device), profile, prof_name, budget, log,
                            clock):
            check.profiled.append(case.name)
        check.finish(f"profile {case.name}: {'ok' if case.name in check.profiled else 'FAILED'}")
    measured = profile if check.profiled else None
    # plan + emit beside the GPU work (not started when the deadline leaves no room for the program)
    prep = Prepared(cs[0], device, check.baseline, measured, work) if clock.fits(60) and not a.skip_emitted else None
    todo = [(c, d) for c in cs for d in c.strategies]
    if not a.skip_emitted:
        todo.insert(1 if a.quick else len(todo), (None, None))  # quick: the MoE only if the deadline leaves time
    for case, dtype in todo:
        if case is None:
            run_emitted_step(check, prep, work, 6 if a.dry_run else 8 if a.quick else 20, log, a.ckpt_max_gb)
        elif check.step(f"validate {case.name} {dtype}", 30 + 30 * len(case.strategies[dtype])):
            check.rows += validate_case(case, dtype, device, check.baseline, measured, work, steps, log, clock)
            ran = sum(r.get("status") == "ok" for r in check.rows)
            check.finish(f"validate {case.name} {dtype}: {ran}/{len(check.rows)} ran so far")
    summary = check.write(complete=True)
    print((a.out / "summary.md").read_text())
    return 0 if check.profiled and summary["ran"] and (a.skip_emitted or check.emitted["status"] == "ok") else 1


class Prepared(threading.Thread):
    """``prepare_emitted`` in a background thread, its log kept apart (work/plan_emit.log) until joined."""

    def __init__(self, case: Case, device: str, gpu: str, profile: Path | None, work: Path):
        super().__init__(daemon=True)
        self.args, self.log, self.result = (case, device, gpu, profile, work), work / "plan_emit.log", None
        self.start()

    def run(self) -> None:
        case, device, gpu, profile, work = self.args
        self.result = prepare_emitted(case, device, gpu, profile, work, self.log, Clock(None))

    def wait(self, log: Path, timeout_s: float) -> dict | None:
        self.join(timeout_s)
        with log.open("a") as fh:
            fh.write(self.log.read_text() if self.log.is_file() else "")
        if self.is_alive():
            return {"status": "failed", "error": "plan + emit still running at the deadline"}
        return self.result


def run_emitted_step(check: Check, prep: Prepared | None, work: Path, steps: int, log: Path,
                     ckpt_max_gb: float) -> None:
    if not check.step("emitted program", 30 + steps * 0.5) or prep is None:
        return
    check.emitted = prep.wait(log, check.clock.left(420)) or run_emitted(work, steps, check.clock, ckpt_max_gb)
    check.finish(f"emitted program: {check.emitted['status']}")


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
