"""The contract sweep: every knob value of the search space, planned, emitted and run as a user would.

For a small dense model (gpt-tiny) and a small MoE (moe-tiny) on 4 CPU ranks, a seeded cover
of strategies that together use every value of every knob (dp, tp, pp, cp, ep, etp, vpp,
micro-batch, ZeRO stage, recompute mode, sequence parallel, pipeline schedule, optimizer
offload, dtype: the values come from ``Strategy``'s own types, so a new schedule or
recompute mode joins the sweep without an edit here), each

1. planned:  ``autopar plan MODEL --gpu cpu --gpus-per-node 4 --strategy <all knobs> --out p.json``
2. emitted:  ``autopar emit p.json --out DIR --device cpu``
3. run:      2 steps of ``DIR/train.py`` under torchrun, 4 ranks (several programs per launch,
             ``tests/codegen_harness.py``: a launch costs seconds, a tiny program less)

and compared with a single-process run of the same model (``plan --gpus-per-node 1``):

- loss parity, both steps: rtol 1e-4 in fp32; bf16 rows (bf16 weights, activations and
  collectives against the fp32 single process) at ``BF16_RTOL`` (see its comment);
- memory: the measured peak of step 2 (live tensor bytes, max over ranks, ``runtime_mem``)
  against the plan's ``pooled_peak_bytes`` without the framework overhead (not a tensor): device
  and host bytes at their joint peak, since on CPU ranks an offloading plan's host memory is the
  rank's own (``cost_models.memory.pooled_peak_bytes``; without offload the device peak);
  within 10% of the prediction and never more than 10% above it.

    python benchmarks/contract.py                 # the whole cover (>= 40 strategies)
    python benchmarks/contract.py --subset 8      # a seeded subset (what CI runs)
    python benchmarks/contract.py --rows s02,s11  # single rows of the cover (or ranges: s00-s19)
"""

from __future__ import annotations

import argparse
import contextlib
import io
import itertools
import json
import os
import random
import subprocess
import sys
import typing
from dataclasses import dataclass, field
from pathlib import Path

from autopar.cli.main import main as autopar_main
from autopar.codegen.emit_checks import check_plan
from autopar.core.plan import Plan
from autopar.core.strategy import Strategy
from autopar.cost_models.session import Inputs, build_cost_model
from autopar.errors import AutoparError

NPROC = 4
SEQ_LEN = 32
GLOBAL_BATCH = 8
STEPS = 2
FP32_RTOL = 1e-4
# bf16 rows run bf16 weights, activations and collectives against the fp32 single process.
# bf16's unit roundoff is 2^-8 = 3.9e-3 per element, but the logged loss is the mean of the
# 256 token losses of a step, computed from fp32 logits (lm_loss upcasts): rounding moves it
# far less than one ulp. 1e-3 (a quarter of a bf16 ulp) passes every bf16 row we measured
# (docs/codegen.md lists each row's error) and still fails a real bug: a wrong shard, a missing
# or doubled reduction, or a different learning rate moves step 2 of these models by >= 1e-2.
BF16_RTOL = 1e-3
MEM_TOL = 0.10
# train.py flags of every run, the single-process ones included (the lr fixed: emit's default
# depends on the model size); the CPU memory tracker on in both steps
RUN_ARGS = ["--steps", str(STEPS), "--device", "cpu", "--mem-steps", str(STEPS), "--timeout", "60", "--lr", "1e-3"]
MODELS = ("gpt-tiny", "moe-tiny")
HARNESS = Path(__file__).resolve().parents[1] / "tests" / "codegen_harness.py"


def knob_space() -> dict[str, list]:
    """Every value each knob may take on 4 ranks; the Literal-typed knobs read from ``Strategy``."""
    lit = {k: list(typing.get_args(f.annotation)) for k, f in Strategy.model_fields.items()
           if typing.get_origin(f.annotation) is typing.Literal}
    deg = [1, 2, 4]
    return {"model": list(MODELS), "dtype": ["fp32", "bf16"], "dp": deg, "tp": deg, "pp": deg, "cp": deg,
            "ep": deg, "etp": [1, 2], "vpp": [1, 2], "micro_batch": [1, 2], "zero_stage": [0, 1, 2, 3],
            "recompute": lit["recompute"], "sequence_parallel": [False, True], "schedule": lit["schedule"],
            "offload_optimizer": [False, True]}


def strategy_text(c: dict) -> str:
    keys = ("dp", "tp", "pp", "cp", "ep", "etp", "vpp")
    bits = [f"{k}={c[k]}" for k in keys] + [
        f"mbs={c['micro_batch']}", f"gbs={GLOBAL_BATCH}", f"zero={c['zero_stage']}", f"recompute={c['recompute']}",
        f"sp={int(c['sequence_parallel'])}", f"schedule={c['schedule']}", f"offload={int(c['offload_optimizer'])}"]
    return ",".join(bits)


def contract_profile(root: Path) -> Path:
    """The shipped CPU profile (measured by ``autopar profile``) with what bf16 and offload plans
    need on CPU ranks: a bf16 peak (set to the measured fp32 one: the sweep compares losses and
    memory, never time) and the host link of optimizer offload, which on a CPU rank is a memory
    copy: ``host_link_gbps = host_optimizer_gbps = mem_bw_gbps`` (measured)."""
    src = Path(__file__).resolve().parents[1] / "profiles" / "hardware" / "cpu.json"
    prof = json.loads(src.read_text())
    prof["name"] = "cpu-contract"
    prof.pop("aliases", None)
    prof["description"] += "; contract sweep: bf16 peak = fp32 peak (time not compared), host link = memory bw"
    prof["peak_tflops"].setdefault("bf16", prof["peak_tflops"]["fp32"])
    prof["host_link_gbps"] = prof["host_optimizer_gbps"] = prof["mem_bw_gbps"]
    out = root / "cpu-contract.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(prof, indent=1))
    return out


class Checker:
    """In-process validity (the rules ``plan`` and ``emit`` apply), to draw only runnable strategies."""

    def __init__(self, profile: Path):
        self.cms, self.profile = {}, str(profile)

    def cm(self, model: str, dtype: str, nproc: int = NPROC):
        key = (model, dtype, nproc)
        if key not in self.cms:
            self.cms[key] = build_cost_model(Inputs(model=model, gpu=self.profile, gpus_per_node=nproc,
                                                    seq_len=SEQ_LEN, dtype=dtype))[0]
        return self.cms[key]

    def ok(self, c: dict) -> bool:
        """What ``plan --strategy`` then ``emit`` accept: the strategy's rules, the planner's search
        with every knob fixed (its space holds what the code generator emits), emit's checks."""
        from autopar.planner.search import Constraints, search

        try:
            s = Strategy.parse(strategy_text(c)).resolve(NPROC, GLOBAL_BATCH)
            cm = self.cm(c["model"], c["dtype"])
            cm.check(s)
            fixed = {k: getattr(s, k) for k in ("dp", "tp", "pp", "cp", "ep", "etp", "vpp", "micro_batch",
                                                 "zero_stage", "recompute", "sequence_parallel", "schedule",
                                                 "offload_optimizer")}
            if not search(cm, GLOBAL_BATCH, Constraints(fixed=fixed), top_k=1).candidates:
                return False
            plan = Plan(model=cm.spec, cluster=cm.cluster, seq_len=SEQ_LEN, dtype=c["dtype"], strategy=s)
            check_plan(plan, "cpu")
        except AutoparError:
            return False
        return s.schedule == c["schedule"] or s.pp == 1  # the strategy kept what was asked


def _draw(rng: random.Random, space: dict, fixed: dict) -> dict:
    """A random strategy holding ``fixed``; dp*tp*pp*cp = NPROC by construction."""
    c = {k: rng.choice(v) for k, v in space.items()}
    meshes = [m for m in itertools.product(space["dp"], space["tp"], space["pp"], space["cp"])
              if m[0] * m[1] * m[2] * m[3] == NPROC
              and all(fixed.get(d, x) == x for d, x in zip(("dp", "tp", "pp", "cp"), m))]
    c.update(zip(("dp", "tp", "pp", "cp"), rng.choice(meshes)))
    if c["pp"] == 1:  # pipeline-only knobs at their defaults, unless they are the point of the draw
        c.update(vpp=1, schedule="1f1b")
    c.update(fixed)
    return c


def cover(seed: int, count: int, checker: Checker, tries: int = 400) -> tuple[list[dict], list[str]]:
    """Seeded greedy cover: for each (knob, value) not used yet, the first valid random strategy
    with it; then random valid strategies up to ``count``."""
    rng, space = random.Random(seed), knob_space()
    chosen, seen, used = [], set(), set()
    pairs = [(k, v) for k, vals in space.items() for v in vals]

    def add(c):
        key = (c["model"], c["dtype"], strategy_text(c))
        if key not in seen:
            seen.add(key)
            chosen.append(c)
            used.update((k, c[k]) for k in space)

    for k, v in pairs:
        if (k, v) in used:
            continue
        for _ in range(tries):
            c = _draw(rng, space, {k: v})
            if checker.ok(c):
                add(c)
                break
    for _ in range(count * tries):
        if len(chosen) >= count:
            break
        c = _draw(rng, space, {})
        if checker.ok(c):
            add(c)
    missing = sorted(f"{k}={v}" for k, v in pairs if (k, v) not in used)
    return chosen, missing


# ----- one row: plan, emit (CLI), then the runs ---------------------------------------
@dataclass
class Row:
    name: str
    model: str
    dtype: str
    strategy: str
    dir: Path
    error: str = ""
    pred_bytes: float = 0.0
    losses: list[float] = field(default_factory=list)
    peak_bytes: float = -1.0

    @property
    def rtol(self) -> float:
        return FP32_RTOL if self.dtype == "fp32" else BF16_RTOL


def cli(args: list[str], cwd: Path) -> str:
    """``autopar ARGS`` through the console entry point (``autopar.cli.main.main``), in this
    process (a new interpreter per call would cost seconds of imports); returns '' or the
    one-line error it printed. ``cwd`` receives its output as ``cli.log``."""
    out, err = io.StringIO(), io.StringIO()
    code = 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            autopar_main(args)
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
        except Exception as exc:  # a crash is a failed row, not the end of the sweep
            code = 1
            print(f"crash: {type(exc).__name__}: {exc}", file=sys.stderr)
    with open(cwd / "cli.log", "a") as fh:
        fh.write(f"$ autopar {' '.join(args)}\n{out.getvalue()}{err.getvalue()}(exit {code})\n")
    if code == 0:
        return ""
    lines = [ln for ln in (err.getvalue() + out.getvalue()).splitlines() if ln.strip()]
    return f"exit {code}: " + (lines[-1] if lines else "")


def plan_and_emit(row: Row, nproc: int, strategy: str, profile: Path) -> None:
    row.dir.mkdir(parents=True, exist_ok=True)
    plan_json = row.dir / "p.json"
    err = cli(["plan", row.model, "--gpu", str(profile), "--gpus-per-node", str(nproc), "--seq-len", str(SEQ_LEN),
               "--global-batch", str(GLOBAL_BATCH), "--dtype", row.dtype, "--strategy", strategy,
               "--out", str(plan_json)], row.dir)
    if not err:
        err = cli(["emit", str(plan_json), "--out", str(row.dir / "run"), "--device", "cpu"], row.dir)
    if err:
        row.error = err
        return
    pred = json.loads(plan_json.read_text())["predictions"]["memory"]
    row.pred_bytes = pred["pooled_peak_bytes"] - pred["breakdown"].get("framework_overhead", 0.0)


def run_rows(rows: list[Row], nproc: int, root: Path, timeout_s: float = 1800) -> None:
    """All runnable rows in as few torchrun launches as possible: a failing program ends its
    launch (its peers would wait), so the launch restarts after it."""
    todo = [r for r in rows if not r.error]
    while todo:
        jobs = [{"name": r.name, "dir": str(r.dir / "run"),
                 "args": RUN_ARGS}
                for r in todo]
        spec = root / f"jobs_{nproc}.json"
        spec.write_text(json.dumps(jobs))
        env = dict(os.environ, OMP_NUM_THREADS="1", HARNESS_TIMEOUT="60", PYTHONUNBUFFERED="1")
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
               str(HARNESS), str(spec)]
        try:
            p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, env=env)
            out, err = p.stdout, p.stderr
        except subprocess.TimeoutExpired as exc:
            out, err = (exc.stdout or b"").decode(errors="replace"), "timeout"
        (root / f"log_{nproc}_{todo[0].name}.txt").write_text(out + "\n" + err)
        done = _collect(todo, out, err)
        todo = todo[done:]


def _collect(todo: list[Row], out: str, err: str) -> int:
    """Fill the rows the launch finished; returns how many rows it got through (incl. the failed one)."""
    for i, r in enumerate(todo):
        begin, end = f"=== BEGIN {r.name}\n", f"=== END {r.name}\n"
        if begin not in out:
            r.error = "launch ended before it: " + _tail(err or out)
            return i + 1
        body = out.split(begin, 1)[1]
        if end not in body:
            failed = body.split("=== FAILED", 1)
            r.error = "run failed: " + (_tail(failed[1]) if len(failed) > 1 else _tail(err or body))
            return i + 1
        steps = _steps(body.split(end, 1)[0])
        r.losses = [steps[k]["loss"] for k in sorted(steps)]
        r.peak_bytes = steps[max(steps)]["peak_mem_bytes"] if steps else -1.0
    return len(todo)


def _steps(text: str) -> dict[int, dict[str, float]]:
    rows = {}
    for line in text.splitlines():
        if line.startswith("step="):
            try:
                f = dict(item.split("=", 1) for item in line.split())
                rows[int(f["step"])] = {k: float(v) for k, v in f.items() if k in ("loss", "peak_mem_bytes")}
            except ValueError:
                continue
    return rows


def _tail(text: str) -> str:
    """The telling error line: a rank's own exception, not a peer's lost connection to it."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    errs = [ln for ln in lines if "Error" in ln or "error" in ln]
    own = [ln for ln in errs if "gloo" not in ln and "Connection" not in ln and not ln.startswith("File ")]
    return ((own or errs)[-1] if errs else (lines[-1] if lines else "no output"))[:240]


# ----- verdicts -----------------------------------------------------------------------------
def verdict(row: Row, ref: list[float]) -> tuple[str, float | None, float | None]:
    """(ok | FAIL reason, max relative loss error, measured / predicted memory)."""
    if row.error:
        return f"FAIL {row.error}", None, None
    if len(row.losses) < STEPS or len(ref) < STEPS:
        return "FAIL fewer than 2 steps logged", None, None
    rel = max(abs(a - b) / abs(b) for a, b in zip(row.losses, ref))
    ratio = row.peak_bytes / row.pred_bytes if row.pred_bytes > 0 and row.peak_bytes > 0 else None
    bad = []
    if rel > row.rtol:
        bad.append(f"loss rel err {rel:.2e} > {row.rtol:g}")
    if ratio is None or abs(ratio - 1) > MEM_TOL:
        bad.append("memory " + (f"{ratio:.3f}x predicted" if ratio else "not measured"))
    return ("ok" if not bad else "FAIL " + "; ".join(bad)), rel, ratio


def row_names(spec: str) -> set[str]:
    """``s02,s11,s20-s23`` -> the row names it lists (a range includes both ends)."""
    names = set()
    for item in filter(None, spec.split(",")):
        lo, _, hi = item.partition("-")
        names.update(f"s{i:02d}" for i in range(int(lo.lstrip("s")), int((hi or lo).lstrip("s")) + 1))
    return names


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seed", type=int, default=0, help="seed of the cover and of the subset")
    ap.add_argument("--count", type=int, default=40, help="strategies in the cover (at least every knob value)")
    ap.add_argument("--subset", type=int, default=0, help="run a seeded subset of this many (0: all)")
    ap.add_argument("--rows", default="", help="only these rows of the cover, e.g. s02,s11 or s00-s19")
    ap.add_argument("--out-dir", default="/tmp/autopar-contract", help="plans, programs and logs")
    args = ap.parse_args(argv)
    root = Path(args.out_dir)
    root.mkdir(parents=True, exist_ok=True)
    profile = contract_profile(root)
    combos, missing = cover(args.seed, args.count, Checker(profile))
    named = [(f"s{i:02d}", c) for i, c in enumerate(combos)]
    if args.subset:
        named = random.Random(args.seed).sample(named, min(args.subset, len(named)))
    if args.rows:
        want = row_names(args.rows)
        named = [(n, c) for n, c in named if n in want]
    combos = [c for _, c in named]
    print(f"contract sweep: {len(combos)} strategies (seed {args.seed}), {NPROC} CPU ranks, seq {SEQ_LEN}, "
          f"global batch {GLOBAL_BATCH}, {STEPS} steps; knob values not covered: {missing or 'none'}", flush=True)
    rows = [Row(name=n, model=c["model"], dtype=c["dtype"], strategy=strategy_text(c), dir=root / n)
            for n, c in named]
    refs = {m: Row(name=f"ref-{m}", model=m, dtype="fp32", strategy="dp=1", dir=root / f"ref-{m}")
            for m in sorted({r.model for r in rows})}
    for r in itertools.chain(refs.values(), rows):
        plan_and_emit(r, 1 if r.name.startswith("ref-") else NPROC,
                      "dp=1,tp=1,pp=1,cp=1,mbs=1,zero=0,recompute=none" if r.name.startswith("ref-") else r.strategy,
                      profile)
    run_rows(list(refs.values()), 1, root)
    run_rows(rows, NPROC, root)
    return report(rows, refs)


def report(rows: list[Row], refs: dict[str, Row]) -> int:
    for ref in refs.values():
        print(f"reference {ref.model} (1 process, fp32): losses {ref.losses} {ref.error}")
    print(f"{'row':4} {'model':9} {'dtype':5} {'loss rel err':>12} {'mem meas/pred':>13}  verdict  strategy")
    fails = 0
    for r in rows:
        v, rel, ratio = verdict(r, refs[r.model].losses)
        fails += v != "ok"
        print(f"{r.name:4} {r.model:9} {r.dtype:5} {'-' if rel is None else f'{rel:.2e}':>12} "
              f"{'-' if ratio is None else f'{ratio:.3f}':>13}  {v:7}  {r.strategy}", flush=True)
    print(f"{len(rows) - fails}/{len(rows)} strategies emitted, run and within the contract")
    return 1 if fails else 0


if __name__ == "__main__":
    sys.exit(main())
