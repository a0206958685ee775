"""Closed-loop validation: predict, emit, run and compare strategies on local ranks.

For each strategy the cost model (built from the hardware profile the user names, never
from the measurements) predicts the step time and the per-rank memory; ``emit`` writes
the training program; ``torchrun`` runs it in its own process group under a timeout; its
``step=`` lines give the median step time after warm-up and the peak memory (max over
ranks). A run that crashes, hangs or prints too few steps is reported failed with its
log, and the remaining strategies still run.

Memory is compared like with like: the measured peak counts tensor storages only (the
CPU live-tensor tracker of ``runtime_mem``, or CUDA ``max_memory_allocated``), so the
predicted figure compared is the worst rank's peak *without* the ``framework_overhead``
component (CUDA context, gloo/NCCL buffers, the Python heap: never a tensor).

This module imports the planner (``Plan``) and codegen (``emit``); nothing in
``cost_models`` imports it.
"""

from __future__ import annotations

import os
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from autopar.codegen.emit import emit
from autopar.codegen.emit_checks import check_plan
from autopar.core.plan import Plan
from autopar.core.strategy import Strategy
from autopar.cost_models.estimate import CostModel
from autopar.errors import AutoparError, InputError
from autopar.planner.build import plan_from_strategy

# Diverse strategies for n ranks (h = n / 2): pure data parallel, ZeRO-1 and ZeRO-3, tensor
# (+ sequence) parallel, pipelines (1F1B, GPipe, interleaved), their mixes, FSDP + TP, full and
# per-op recompute (also under tp + sp), a larger micro-batch and context parallel (alone and with
# dp, at a larger micro-batch: its gathered K/V grow with it). Entries the model or the rank count
# does not allow are dropped (see ``select``).
DENSE = (
    "dp={n},mbs=1", "dp={n},mbs=1,zero=1", "dp={n},mbs=1,zero=3", "tp={n},dp=1,mbs=1", "tp=2,dp={h},mbs=1",
    "tp=2,dp={h},mbs=1,sp=1", "tp=2,dp={h},mbs=1,zero=3", "pp={n},dp=1,mbs=1", "pp=2,dp={h},mbs=1",
    "pp=2,tp={h},dp=1,mbs=1", "pp={n},dp=1,mbs=1,schedule=interleaved,vpp=2", "pp={n},dp=1,mbs=1,schedule=gpipe",
    "dp={n},mbs=1,recompute=full", "dp={n},mbs=1,recompute=op", "tp=2,dp={h},mbs=1,sp=1,recompute=op", "dp={n},mbs=4",
    "cp={n},dp=1,mbs=1", "cp=2,dp={h},mbs=4",
)
# MoE: expert parallel over the data-parallel ranks (where the emitted programs place it); context
# parallel (experts run on each rank's sequence share).
MOE = (
    "dp={n},mbs=1", "dp={n},ep=2,mbs=1", "dp={n},ep={n},mbs=1", "dp={n},ep={n},mbs=1,zero=3",
    "dp={n},ep=2,mbs=1,zero=1", "pp=2,dp={h},ep=2,mbs=1", "tp=2,dp={h},mbs=1", "tp={n},dp=1,mbs=1",
    "pp={n},dp=1,mbs=1", "pp=2,dp={h},mbs=1", "dp={n},ep={n},mbs=4", "cp={n},dp=1,mbs=1", "cp=2,dp={h},mbs=4",
)


@dataclass
class Config:
    nproc: int
    global_batch: int
    steps: int = 6
    warmup: int = 2
    timeout_s: float = 300.0
    device: str = "cpu"
    threads_per_rank: int = 1

    @property
    def mem_steps(self) -> int:
        """CPU: the live-tensor tracker runs only in the warm-up steps (its per-op Python call would
        slow the timed ones); at least 2, since step 1 allocates the optimizer states after its peak."""
        return max(2, self.warmup) if self.device == "cpu" else 0

    @property
    def untimed(self) -> int:
        return max(self.warmup, self.mem_steps)

    def check(self) -> None:
        if self.nproc < 1:
            raise InputError(f"--nproc={self.nproc} must be at least 1")
        if self.warmup < 0 or self.steps < self.untimed + 1:
            raise InputError(f"--steps={self.steps} must exceed the {self.untimed} warm-up steps; use --steps "
                             f"{self.untimed + 3} or more")
        if self.timeout_s <= 0:
            raise InputError(f"--timeout={self.timeout_s} must be positive (seconds per run)")
        if self.device not in ("cpu", "cuda"):
            raise InputError(f"--device={self.device} is not cpu or cuda")


@dataclass
class Prediction:
    step_time_s: float
    tensor_bytes: float      # worst rank's peak without the framework overhead (what the tracker sees)
    total_bytes: float       # with it (what `estimate` reports)
    breakdown: dict[str, float]


@dataclass
class Measurement:
    status: str              # ok | failed | timeout
    step_times_s: list[float] = field(default_factory=list)
    peak_bytes: list[float] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    wall_s: float = 0.0
    log: str = ""
    error: str = ""
    warmup: int = 2
    load_1min: float | None = None   # the machine's load average when the run started (other work)

    @property
    def time_s(self) -> float | None:
        """Median step time after the warm-up steps (allocations, first collectives, caches)."""
        rest = self.step_times_s[self.warmup:]
        return statistics.median(rest) if rest else None

    @property
    def mem_bytes(self) -> float | None:
        """Peak tensor bytes from step 2 on (step 1 allocates the optimizer states after its
        peak); steps printed with -1 were not measured (the CPU tracker stopped)."""
        rest = [b for b in self.peak_bytes[1:] if b >= 0]
        return max(rest) if rest else None


@dataclass
class Row:
    name: str
    strategy: str
    prediction: Prediction | None = None
    measurement: Measurement | None = None
    error: str = ""          # why it could not be planned or emitted

    @property
    def ok(self) -> bool:
        return self.prediction is not None and self.measurement is not None and self.measurement.status == "ok"


# ----- strategy selection ---------------------------------------------------------------
def read_strategies(path: str | os.PathLike) -> list[str]:
    """One compact strategy per line (``tp=2,dp=-1,mbs=1``); ``#`` starts a comment. A line that does not parse
    (not key=value, unknown key, a value of the wrong type) is a typo, refused in one line; a well-formed strategy
    that breaks a rule on the ranks stays a failed row with its reason (``select``) and the others still run."""
    p = Path(path)
    if not p.is_file():
        raise InputError(f"--strategies: {p} does not exist; give 'auto' or a file with one strategy per line")
    lines = [ln.split("#", 1)[0].strip() for ln in p.read_text().splitlines()]
    out = [ln for ln in lines if ln]
    if not out:
        raise InputError(f"--strategies: {p} lists no strategy; write one per line, e.g. tp=2,dp=-1,mbs=1")
    for text in out:
        try:
            Strategy.parse_partial(text)
        except InputError as exc:
            raise InputError(f"--strategies: {p}: {exc.message.removeprefix('strategy: ')}") from None
    return out


def candidates(cm: CostModel, source: str, nproc: int) -> list[str]:
    """The strategies of a file, or the built-in diverse set for ``nproc`` ranks ("auto")."""
    if source != "auto":
        return read_strategies(source)
    half = max(1, nproc // 2) if nproc % 2 == 0 else 0  # odd n: the n/2 entries resolve to nothing
    return [t.format(n=nproc, h=half) for t in (MOE if cm.spec.is_moe else DENSE) if half or "{h}" not in t]


def make_plan(cm: CostModel, s: Strategy) -> Plan:
    """A plan for one resolved strategy: even stages (what ``estimate`` assumes), default
    expert placement, and the estimate it was priced with in ``predictions``."""
    return plan_from_strategy(cm, s, command="autopar validate")


def select(cm: CostModel, texts: list[str], cfg: Config, strict: bool) -> list[tuple[Row, Plan | None]]:
    """Resolve, check and plan each strategy. ``strict`` (a user's file): a strategy that
    breaks a rule becomes a failed row with the reason; ``auto``: it is dropped. Duplicates
    (two templates resolving to the same strategy) are kept once."""
    out, seen = [], set()
    for text in texts:
        try:
            s = Strategy.parse(text).resolve(cfg.nproc, cfg.global_batch)
            cm.check(s)
            plan = make_plan(cm, s)
            check_plan(plan, cfg.device)
        except AutoparError as exc:
            if strict:
                out.append((Row(name=text, strategy=text, error=exc.message), None))
            continue
        if s.compact() in seen:
            continue
        seen.add(s.compact())
        out.append((Row(name=s.short(), strategy=s.compact(), prediction=predict(cm, s)), plan))
    return out


def predict(cm: CostModel, s: Strategy) -> Prediction:
    e = cm.estimate(s)
    mem = e.worst_rank.memory
    return Prediction(step_time_s=e.step_time_s, tensor_bytes=e.peak_bytes - e.memory_overhead,
                      total_bytes=e.peak_bytes, breakdown=dict(mem))


# ----- one run --------------------------------------------------------------------------
def torchrun_command(cfg: Config) -> list[str]:
    """torchrun of this interpreter (the same environment as autopar), one process per rank."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={cfg.nproc}",
            "train.py", "--steps", str(cfg.steps), "--device", cfg.device, "--mem-steps", str(cfg.mem_steps),
            "--timeout", str(max(30.0, cfg.timeout_s / 2))]


def run_env(cfg: Config) -> dict[str, str]:
    """The rank threads the profile was measured with (torchrun would force 1 otherwise)."""
    env = dict(os.environ)
    env["OMP_NUM_THREADS"] = str(cfg.threads_per_rank)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def launch(cmd: list[str], cwd: Path, timeout_s: float, log: Path, env: dict | None = None) -> tuple[int | None, str,
                                                                                                        float]:
    """Run ``cmd`` in a new session; on timeout kill its whole process group (torchrun and its
    ranks). Returns (exit code or None on timeout, combined output, wall seconds)."""
    t0 = time.perf_counter()
    with open(log, "w") as fh:
        proc = subprocess.Popen(cmd, cwd=cwd, stdout=fh, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            rc = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            rc = None
    return rc, log.read_text(errors="replace"), time.perf_counter() - t0


def _kill_group(proc: subprocess.Popen) -> None:
    for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def parse_steps(text: str) -> dict[int, dict[str, float]]:
    """``step=N loss=... step_time_s=... peak_mem_bytes=...`` lines -> {N: {field: value}}."""
    rows = {}
    for line in text.splitlines():
        if not line.startswith("step="):
            continue
        try:
            fields = dict(item.split("=", 1) for item in line.split())
            rows[int(fields.pop("step"))] = {k: float(v) for k, v in fields.items()}
        except ValueError:  # a line interleaved with another rank's output
            continue
    return rows


def measure(rc: int | None, text: str, wall: float, log: Path, cfg: Config) -> Measurement:
    steps = parse_steps(text)
    ordered = [steps[k] for k in sorted(steps)]
    m = Measurement(status="ok", step_times_s=[r.get("step_time_s", 0.0) for r in ordered],
                    peak_bytes=[r.get("peak_mem_bytes", -1.0) for r in ordered],
                    losses=[r.get("loss", float("nan")) for r in ordered], wall_s=wall, log=str(log),
                    warmup=cfg.untimed)
    if rc is None:
        m.status, m.error = "timeout", f"no exit after {cfg.timeout_s:.0f} s (killed); {len(ordered)} steps printed"
    elif rc != 0 and len(ordered) >= cfg.steps:  # every step measured, then a crash at teardown
        m.error = f"exit code {rc} after the last step (at shutdown): {last_error(text)}"
    elif rc != 0:
        m.status, m.error = "failed", f"exit code {rc}: {last_error(text)}"
    elif len(ordered) < cfg.untimed + 1 or m.mem_bytes is None:
        m.status, m.error = "failed", f"{len(ordered)} step lines, need more than {cfg.untimed} warm-up steps"
    return m


def last_error(text: str) -> str:
    """The most telling line of a crash log: the last exception line, else the last line."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    for ln in reversed(lines):
        if ("Error" in ln or "Exception" in ln) and not ln.startswith(("File ", "Traceback")):
            return ln[:300]
    return lines[-1][:300] if lines else "no output"


def run_plan(plan: Plan, run_dir: Path, cfg: Config, cmd: list[str] | None = None) -> Measurement:
    """Emit ``plan`` into ``run_dir`` and run it; never raises for a failing program."""
    run_dir.mkdir(parents=True, exist_ok=True)
    log = run_dir / "log.txt"
    try:
        emit(plan, run_dir, cfg.device)
    except AutoparError as exc:
        log.write_text(f"emit failed: {exc.message}\n")
        return Measurement(status="failed", error=f"emit: {exc.message}", log=str(log), warmup=cfg.untimed)
    load = os.getloadavg()[0]
    rc, text, wall = launch(cmd or torchrun_command(cfg), run_dir, cfg.timeout_s, log, run_env(cfg))
    m = measure(rc, text, wall, log, cfg)
    m.load_1min = load
    return m


# ----- comparison -----------------------------------------------------------------------
def ape(pred: float, meas: float) -> float:
    """Absolute percentage error of a prediction, in % of the measurement."""
    return abs(pred - meas) / meas * 100.0


def under_prediction(pred: float, meas: float) -> float:
    """How far the prediction falls short of the measurement, in % of it (0 when over)."""
    return max(0.0, (meas - pred) / meas * 100.0)


def spearman(xs: list[float], ys: list[float]) -> float | None:
    """Spearman rank correlation (ties get average ranks); None below 3 points or no spread."""
    if len(xs) < 3:
        return None
    rx, ry = _ranks(xs), _ranks(ys)
    mx, my = statistics.fmean(rx), statistics.fmean(ry)
    cov = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    vx, vy = sum((a - mx) ** 2 for a in rx), sum((b - my) ** 2 for b in ry)
    return cov / (vx * vy) ** 0.5 if vx and vy else None


def _ranks(xs: list[float]) -> list[float]:
    order = sorted(range(len(xs)), key=lambda i: xs[i])
    ranks = [0.0] * len(xs)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and xs[order[j + 1]] == xs[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def row_dict(r: Row) -> dict:
    p, m = r.prediction, r.measurement
    out = {"name": r.name, "strategy": r.strategy, "status": m.status if m else "failed",
           "error": r.error or (m.error if m else ""), "log": m.log if m else "",
           "predicted_time_s": p.step_time_s if p else None, "measured_time_s": m.time_s if m else None,
           "predicted_mem_bytes": p.tensor_bytes if p else None, "measured_mem_bytes": m.mem_bytes if m else None,
           "predicted_total_mem_bytes": p.total_bytes if p else None,
           "predicted_breakdown": p.breakdown if p else None,
           "step_times_s": m.step_times_s if m else [], "peak_mem_bytes": m.peak_bytes if m else [],
           "losses": m.losses if m else [], "wall_s": m.wall_s if m else 0.0,
           "load_1min": m.load_1min if m else None}
    if r.ok and m.time_s and m.mem_bytes:
        out["time_error_pct"] = (p.step_time_s - m.time_s) / m.time_s * 100.0
        out["memory_error_pct"] = (p.tensor_bytes - m.mem_bytes) / m.mem_bytes * 100.0
    return out


def summarize(rows: list[Row]) -> dict:
    """The comparison over the strategies that ran: MAPEs, worst memory under-prediction,
    Spearman of step times, and whether the predicted fastest is the measured fastest."""
    return summarize_dicts([row_dict(r) for r in rows])


def summarize_dicts(strategies: list[dict]) -> dict:
    """``summarize`` from the per-strategy dicts (``row_dict``, the ``strategies`` of validation.json),
    so that runs made in pieces (``autopar validate --merge``) are compared as one set."""
    ok = [r for r in strategies if r["status"] == "ok" and r["predicted_time_s"] is not None
          and r["measured_time_s"] and r["measured_mem_bytes"]]
    pt, mt = [r["predicted_time_s"] for r in ok], [r["measured_time_s"] for r in ok]
    pm, mm = [r["predicted_mem_bytes"] for r in ok], [r["measured_mem_bytes"] for r in ok]
    out = {"ran": len(ok), "failed": len(strategies) - len(ok), "spearman": spearman(pt, mt),
           "time_mape": _mean([ape(p, m) for p, m in zip(pt, mt)]),
           "memory_mape": _mean([ape(p, m) for p, m in zip(pm, mm)]),
           "max_memory_under_prediction": max([under_prediction(p, m) for p, m in zip(pm, mm)], default=None),
           "predicted_best": None, "measured_best": None, "best_gap_pct": None}
    if ok:
        pb, mb = min(ok, key=lambda r: r["predicted_time_s"]), min(ok, key=lambda r: r["measured_time_s"])
        out["predicted_best"], out["measured_best"] = pb["name"], mb["name"]
        out["predicted_best_is_measured_best"] = pb is mb
        # how much slower the predicted best really is than the real best
        out["best_gap_pct"] = (pb["measured_time_s"] / mb["measured_time_s"] - 1.0) * 100.0
    out["strategies"] = strategies
    return out


def _mean(xs: list[float]) -> float | None:
    return statistics.fmean(xs) if xs else None


# ----- the loop -------------------------------------------------------------------------
def validate(cm: CostModel, chosen: list[tuple[Row, Plan | None]], cfg: Config, out_dir: Path,
             on_start: Callable[[Row], None] | None = None, on_done: Callable[[Row], None] | None = None,
             cmd: list[str] | None = None) -> tuple[list[Row], dict]:
    """Emit, run and compare every strategy ``select`` chose; returns the rows and ``summarize``."""
    if not chosen:
        raise InputError(f"strategies: none is valid for {cm.spec.name} on {cfg.nproc} ranks; list ones whose "
                         f"degrees multiply to {cfg.nproc}")
    rows = []
    for i, (row, plan) in enumerate(chosen):
        if on_start:
            on_start(row)
        if plan is not None:
            slug = "".join(ch if ch.isalnum() else "-" for ch in row.name).strip("-")
            row.measurement = run_plan(plan, out_dir / "runs" / f"{i:02d}-{slug}", cfg, cmd)
        rows.append(row)
        if on_done:
            on_done(row)
    return rows, summarize(rows)
