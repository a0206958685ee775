"""Does the search's memory floor stay under the priced peak? The search drops a configuration whose floor
(``planner.bounds.floor_terms``, read as ``planner.groups.expand_row`` reads it: the recompute modes the
configuration may use, the fewest micro-batches any rank holds, the warm rule ``grads_freed``, the gradients a
zero-bubble FSDP2 stage holds) exceeds the GPU's usable bytes, before pricing it. A floor above the priced peak
(``CostModel.estimate``'s worst rank, live: ``peak_bytes - memory_overhead``, what ``Estimate.feasible`` reads; the
least over the same modes, one mode on every layer, the layers split evenly) can rule out a plan that fits.

    python benchmarks/floor_vs_peak.py [--limit N] [--seed S] [--quick]
    python benchmarks/floor_vs_peak.py --rows FILE [--source SRC]

Default: search rows (``planner.space.shardings`` x ``knob_options``, the rules the search checks) sampled at
random (``--limit`` per job, runtime and recompute: the stack's modes, or none) for llama3-8b, llama3-70b,
mixtral-8x7b, mixtral-8x22b, deepseek-v3 on h100-sxm under torch, megatron (bf16 and fp8), llm-foundry and
torchtitan. ``--rows``: every published row of FILE (``published_rows.case_for`` / ``build``, as
``published_fit.py`` builds them; torchtitan rows with their compile and vocabulary-parallel loss), its own
configuration and recompute mode, tallied by runtime. Per line: rows checked, rows whose floor exceeds the priced
peak, the worst floor / peak, rows the floor rules out (above the usable bytes) though the estimate fits.
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from autopar import techniques
from autopar.core.strategy import Strategy
from autopar.cost_models.session import Inputs, build_cost_model
from autopar.errors import InputError
from autopar.planner.bounds import Space, grads_freed, min_in_flight, probe
from autopar.planner.groups import allowed_modes, floor_for, with_deferred_grads
from autopar.planner.space import Constraints, Knobs, Sharding, for_stack, knob_options, rule_spec, shardings
from autopar.techniques import offload

# (model, nodes of 8 H100): small and large worlds per model, the ones `plan` is asked about in docs/benchmarks.md
JOBS = (("llama3-8b", 1), ("llama3-8b", 4), ("llama3-70b", 8), ("mixtral-8x7b", 2), ("mixtral-8x7b", 8),
        ("mixtral-8x22b", 8), ("deepseek-v3", 32))
RUNTIMES = (("torch", "bf16"), ("megatron", "bf16"), ("megatron", "fp8"), ("llm-foundry", "bf16"),
            ("torchtitan", "bf16"))
QUICK_JOBS = (("llama3-8b", 1), ("mixtral-8x7b", 2))
# recompute as the user leaves it (the stack's modes, the floor reads the least) and fixed to none (`plan
# --strategy recompute=none`: the floor reads that mode's saved bytes alone)
RECOMPUTES = (None, "none")


@dataclass
class Tally:
    """One (job, runtime)'s count; ``worst``: the largest floor / priced live peak (0 when none is above)."""

    label: str
    checked: int = 0
    above: int = 0
    worst: float = 0.0
    ruled_out: int = 0   # floor above the usable bytes while the estimate fits
    examples: list[str] = field(default_factory=list)

    def add(self, floor_bytes: float, live_bytes: float, usable_bytes: float, fits: bool, what: str) -> None:
        self.checked += 1
        if floor_bytes > live_bytes * (1 + 1e-9):
            self.above += 1
            self.worst = max(self.worst, floor_bytes / live_bytes)
            self.ruled_out += fits and floor_bytes > usable_bytes
            if len(self.examples) < 2:
                self.examples.append(f"{what}: floor {floor_bytes / 2**30:.2f} > peak {live_bytes / 2**30:.2f} GiB")

    def line(self) -> str:
        return f"{self.label:<44} {self.checked:>5} {self.above:>6} {self.worst:>6.3f} {self.ruled_out:>10}"


def floor_bytes(sp: Space, sh: Sharding, k: Knobs) -> float:
    """The configuration's memory floor as ``groups.expand_row`` compares it with the usable bytes."""
    modes = allowed_modes(sp.cons.modes, k.schedule, k.offload)
    m = sp.gb // (sh.dp * sh.mbs)
    in_flight = min_in_flight(sh.pp, m, k.schedule, k.vpp)
    warm = grads_freed(sp, sh, k.schedule, k.vpp)
    return with_deferred_grads(sp, sh, k, floor_for(sp, sh, modes)).bytes(sp.cm, sh, k.zero, k.offload,
                                                                          in_flight, warm)


def priced(sp: Space, sh: Sharding, k: Knobs) -> tuple[float, bool] | None:
    """(least live peak, fits) over the allowed modes, one on every layer; None where a rule the search checks
    refuses the configuration (``search._partitioned``'s check)."""
    cm = sp.cm
    s = Strategy(**probe(sh, sp.gb, k).model_dump()).resolve(cm.cluster.world)
    if techniques.violations(s, rule_spec(cm), s.world, cm.seq_len, emitted=True, stack=cm.stack_name) or \
            offload.gpu_violations(s, cm.gpu):
        return None
    modes = allowed_modes(sp.cons.modes, k.schedule, k.offload)
    ests = [cm.estimate(s, None, [md] * cm.num_layers) for md in modes]
    return min(e.peak_bytes - e.memory_overhead for e in ests), any(e.feasible for e in ests)


def compare(cm, gb: int, label: str, limit: int = 200, seed: int = 0, recompute: str | None = None) -> Tally:
    """``limit`` search rows of ``cm`` at global batch ``gb`` (sampled with ``seed``), floor against price."""
    cons = for_stack(cm, Constraints(fixed={"recompute": recompute} if recompute else {}))   # as search() does
    sp = Space(cm, cons, gb)
    rows = [(sh, k) for row in shardings(cm, cons, gb) for sh in row
            for k in knob_options(cm, cons, sh, gb, sp.knob_cache)]
    random.Random(seed).shuffle(rows)
    tally = Tally(label)
    for sh, k in rows:
        if tally.checked >= limit:
            break
        got = priced(sp, sh, k)
        if got is not None:
            tally.add(floor_bytes(sp, sh, k), got[0], sp.usable, got[1], probe(sh, gb, k).short())
    return tally


def job_tallies(model: str, nodes: int, runtime: str, dtype: str, limit: int, seed: int) -> list[Tally]:
    """One tally per ``RECOMPUTES`` entry for the job on ``nodes`` x 8 H100 SXM, global batch 8 per GPU."""
    cm = build_cost_model(Inputs(model=model, gpu="h100-sxm", nodes=nodes, gpus_per_node=8, dtype=dtype,
                                 runtime=runtime))[0]
    label = f"{model} x{nodes} {runtime} {dtype}"
    return [compare(cm, 8 * nodes * 8, f"{label} rc={rc or 'any'}", limit, seed, rc) for rc in RECOMPUTES]


def row_tallies(path: str, source: str | None) -> list[Tally]:
    """Every published row of ``path`` (its own configuration), tallied by runtime."""
    sys.path.insert(0, str(Path(__file__).parent))
    import published_rows as pr

    tallies: dict[str, Tally] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for run in pr.load_runs(path):
            try:
                case = pr.case_for(run)
                if source and case.source != source:
                    continue
                cm, s = pr.build(case, Path(tmp))
            except (pr.RowSkip, InputError):
                continue
            pr.as_run(case, cm, s)
            sp = Space(cm, Constraints(fixed={"recompute": s.recompute}), s.global_batch)
            sh = Sharding(s.tp, s.cp, s.pp, s.dp, s.ep, s.etp, s.sequence_parallel, s.micro_batch)
            k = Knobs(s.zero_stage, s.offload_optimizer, s.schedule, s.vpp)
            e = pr.estimate(case, cm, s)
            t = tallies.setdefault(case.runtime, Tally(f"--runtime {case.runtime} (published rows)"))
            t.add(floor_bytes(sp, sh, k), e.peak_bytes - e.memory_overhead, sp.usable, e.feasible, case.id)
    return list(tallies.values())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--limit", type=int, default=60, help="search rows sampled per job and runtime")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="llama3-8b x1 and mixtral-8x7b x2 only")
    ap.add_argument("--rows", help="a published file: its rows' own configurations instead of sampled ones")
    ap.add_argument("--source", help="with --rows: that source only")
    a = ap.parse_args(argv)
    if a.limit < 1:
        print(f"--limit={a.limit}: must be at least 1", file=sys.stderr)
        return 2
    if a.rows and not Path(a.rows).is_file():
        print(f"--rows={a.rows}: no such file (give a published yaml)", file=sys.stderr)
        return 2
    print(f"{'job / runtime':<44} {'rows':>5} {'above':>6} {'worst':>6} {'ruled out':>10}")
    tallies = row_tallies(a.rows, a.source) if a.rows else (
        t for m, n in (QUICK_JOBS if a.quick else JOBS) for rt, dt in RUNTIMES
        for t in job_tallies(m, n, rt, dt, a.limit, a.seed))
    for t in tallies:
        print(t.line(), *(f"\n    {x}" for x in t.examples), sep="", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
