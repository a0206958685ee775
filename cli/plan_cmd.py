"""`autopar plan`: search the parallel strategies of a training job and write the best as a Plan."""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import typer

from autopar.cli import awkward_view, paths
from autopar.cli import common as c
from autopar.cli.app import app
from autopar.core.strategy import COMPACT_KEYS, Strategy
from autopar.errors import DoesNotFitError, InputError
from autopar.techniques.base import cli_key, cli_value

if TYPE_CHECKING:  # the cost model and the planner load inside the command (fast --help and input errors)
    from autopar.planner.search import Candidate, Constraints, SearchResult

Opt = Optional


@app.command("plan")
def plan_cmd(model: Opt[str] = typer.Argument(None, help=c.Model.help + "; omitted with --from"),
             gpu: Opt[str] = c.Gpu, nodes: Opt[int] = c.Nodes,
             gpus_per_node: Opt[int] = c.GpusPerNode, cluster: Opt[str] = c.Cluster, seq_len: Opt[int] = c.SeqLen,
             global_batch: Opt[int] = c.GlobalBatch, dtype: str = c.Dtype, profile: Opt[str] = c.Profile,
             placement: Opt[str] = c.Placement, trace: Opt[str] = c.Trace, input_shape: Opt[str] = c.InputShape,
             input_dtype: str = c.InputDtype, hf: bool = c.Hf,
             top: int = typer.Option(5, "--top", help="plans to list"),
             strategy: str = typer.Option("", "--strategy", help="fix the knobs it names, e.g. tp=8,pp=4; "
                                          "the rest is searched; " + c.STRATEGY_KEYS),
             tp: Opt[int] = typer.Option(None, "--tp", help="fix the tensor-parallel degree"),
             pp: Opt[int] = typer.Option(None, "--pp", help="fix the pipeline depth"),
             cp: Opt[int] = typer.Option(None, "--cp", help="fix the context-parallel degree"),
             dp: Opt[int] = typer.Option(None, "--dp", help="fix the data-parallel degree"),
             ep: Opt[int] = typer.Option(None, "--ep", help="fix the expert-parallel degree"),
             etp: Opt[int] = typer.Option(None, "--etp", help="fix the expert tensor-parallel degree"),
             vpp: Opt[int] = typer.Option(None, "--vpp", help="fix the interleaved chunks per GPU"),
             mbs: Opt[int] = typer.Option(None, "--mbs", help="fix the micro-batch size"),
             zero: Opt[int] = typer.Option(None, "--zero", help="fix the ZeRO stage (0-3)"),
             schedule: Opt[str] = typer.Option(None, "--schedule", help="gpipe | 1f1b | interleaved | "
                                                 "zb_interleaved | zbv | dualpipev"),
             recompute: Opt[str] = typer.Option(None, "--recompute", help="one mode for every layer: none | "
                                                "selective | op | full (default: chosen per layer)"),
             sp: Opt[bool] = typer.Option(None, "--sp/--no-sp", help="force sequence parallel on / off"),
             offload: Opt[bool] = typer.Option(None, "--offload/--no-offload", help="force ZeRO-Offload on / off"),
             no_cp: bool = typer.Option(False, "--no-cp", help="no context parallelism"),
             max_tp: Opt[int] = typer.Option(None, "--max-tp", min=1, help="largest tensor-parallel degree"),
             max_pp: Opt[int] = typer.Option(None, "--max-pp", min=1, help="largest pipeline depth"),
             max_cp: Opt[int] = typer.Option(None, "--max-cp", min=1, help="largest context-parallel degree"),
             max_ep: Opt[int] = typer.Option(None, "--max-ep", min=1, help="largest expert-parallel degree"),
             max_mbs: Opt[int] = typer.Option(None, "--max-mbs", min=1, help="largest micro-batch"),
             cross_node: bool = typer.Option(False, "--cross-node", help="let tp and ep*etp span nodes"),
             exact_gpus: bool = typer.Option(False, "--exact-gpus", help="use every GPU: on an awkward GPU count "
                                             "offer no plan that leaves GPUs idle"),
             exact_batch: bool = typer.Option(False, "--exact-batch", help="keep the global batch: on an awkward "
                                              "GPU count offer no plan at a nearby batch"),
             json_out: bool = c.Json, no_cache: bool = c.NoCache, runtime: str = c.Runtime,
             compile: str = c.Compile, loss_parallel: bool = c.LossParallel,
             moe_capacity_factor: Opt[float] = c.MoeCapacityFactor, no_a2a_overlap: bool = c.NoA2aOverlap,
             cross_entropy: str = c.CrossEntropy, tp_comm_overlap: bool = c.TpCommOverlap,
             out: Opt[Path] = typer.Option(None, "--out", callback=paths.out_file,
                                          help="write the winning Plan (JSON) for `autopar emit`"),
             plot: Opt[Path] = typer.Option(None, "--plot", callback=paths.out_folder,
                                           help="folder for timeline.png and memory.png"),
             from_plan: Opt[Path] = typer.Option(None, "--from", help="elastic re-plan of this plan.json for "
                                                 "--gpus N (or --nodes N), the global batch kept (docs/elastic.md)"),
             gpus: Opt[int] = typer.Option(None, "--gpus", min=1, help="with --from: the GPUs left"),
             lost_nodes: Opt[str] = typer.Option(None, "--lost-nodes", help="with --from: the old nodes that are "
                                                 "gone, e.g. 15 (default: the last ones)")):
    """Search dp/ZeRO, tp, sp, cp, pp (schedule, vpp), ep/etp, micro-batch and per-layer recompute;
    print the top plans that fit (exit 3 with the nearest fixes when none does) and why the winner
    wins. Order: by predicted step time; plans within 1% of each other are listed simpler first
    (fewer model-parallel dimensions > 1 (tp, pp, cp, ep), then fewer with dp, DDP before ZeRO-3,
    lower ZeRO stage, no offload before offload, no recompute before recompute).
    Defaults: one node of 8 x h100-sxm, the model's
    sequence length (capped at 4096; 8192 for Llama 3) and about one million tokens per step."""
    if top < 1:
        raise InputError(f"--top={top} must be at least 1")
    if from_plan is not None:  # elastic: the same model on the GPUs left (cli/elastic_cmd.py)
        from autopar.cli.elastic_cmd import replan_from

        caps = dict(max_tp=max_tp, max_pp=max_pp, max_cp=max_cp, max_ep=max_ep, max_mbs=max_mbs, cross_node=cross_node)
        return replan_from(from_plan, gpus, nodes, global_batch, strategy, caps, top, json_out, out, lost_nodes)
    if model is None:
        raise InputError("MODEL: missing; fix: autopar plan MODEL ..., or autopar plan --from PLAN.json --gpus N")
    if dtype == "fp8":  # a stack whose program runs no fp8 GEMMs (techniques.precision): nothing fp8 to search
        from autopar.techniques.precision import FP8, fp8_refusal

        if runtime in FP8 and (msg := fp8_refusal(runtime)):
            raise InputError(msg)
    inp = c.inputs(model, gpu, nodes, gpus_per_node, cluster, seq_len, dtype, profile, placement, trace, input_shape,
                   runtime, input_dtype, hf, compile, loss_parallel, moe_capacity_factor, no_a2a_overlap,
                   cross_entropy, tp_comm_overlap)
    from autopar.cost_models.session import build_cost_model
    from autopar.planner.search import Constraints, search

    cm, spec, cl, seq = build_cost_model(inp)
    flags = dict(tp=tp, pp=pp, cp=1 if no_cp else cp, dp=dp, ep=ep, etp=etp, vpp=vpp, micro_batch=mbs,
                 zero_stage=zero, schedule=schedule, recompute=recompute, sequence_parallel=sp,
                 offload_optimizer=offload)
    fixed = _fixed(strategy, flags)
    gb = _global_batch(global_batch, fixed, cl.world, seq)
    cons = Constraints(fixed=fixed, max_tp=max_tp, max_pp=max_pp, max_cp=max_cp, max_ep=max_ep, max_mbs=max_mbs,
                       cross_node=cross_node)
    _check_complete(cm, fixed, gb)
    if cl.heterogeneous:  # node groups of different GPUs or links: each stage on one kind (planner/hetero.py)
        from autopar.cli import hetero_view

        return hetero_view.run(cm, gb, cons, json_out)
    res = search(cm, gb, cons, top_k=top)
    alts = awkward_view.alternatives(cm, gb, cons, res, top, exact_gpus, exact_batch)
    if alts is not None and alts.recommended is not None:  # continue with the recommended option
        cm, res = alts.recommended.cm, alts.recommended.result
    if not res.candidates:
        _nothing_fits(cm, cons, res)
    if out:
        _write_plan(cm, res.candidates[0], _inputs_record(inp, res.global_batch, fixed), placement, out)
    pngs = _plots(cm, res, plot) if plot else []
    if json_out:
        c.print_json({**plan_json(cm, res, top), **({"alternatives": awkward_view.as_json(alts)} if alts else {})})
        return
    if alts is not None and alts.options:
        awkward_view.print_table(alts, gb)
    _print(cm, res, out, pngs)


# ----- inputs ------------------------------------------------------------------------------------
def _fixed(strategy: str, flags: dict) -> dict:
    """Knobs fixed by --strategy and by the single flags (which must agree)."""
    fixed = Strategy.parse_partial(strategy) if strategy else {}
    for k, v in flags.items():
        if v is None:
            continue
        if k in fixed and fixed[k] != v:
            name = cli_key(k)
            raise InputError(f"--{name.replace('_', '-')}={v} disagrees with --strategy {name}={fixed[k]}")
        fixed[k] = v
    if fixed.get("vpp", 1) > 1 and "schedule" not in fixed:
        fixed["schedule"] = "interleaved"
    if fixed.get("schedule") in ("zbv", "dualpipev") and "vpp" not in fixed:
        fixed["vpp"] = 2   # V-shaped schedules run two stages per rank
    for k in ("tp", "pp", "cp", "ep", "etp", "vpp", "micro_batch"):
        if k in fixed and fixed[k] < 1:
            raise InputError(f"{cli_key(k)}={fixed[k]} must be a positive integer")
    if fixed.get("dp", 1) < 1 and fixed.get("dp") != -1:
        raise InputError(f"dp={fixed['dp']} must be a positive integer (or -1 for the rest)")
    return fixed


def _global_batch(flag: int | None, fixed: dict, world: int, seq: int) -> int:
    from autopar.cost_models.session import default_global_batch

    named = fixed.pop("global_batch", 0)
    if flag and named and flag != named:
        raise InputError(f"--global-batch={flag} disagrees with the strategy's gbs={named}")
    gb = flag or named or default_global_batch(world, seq)
    if gb < 1:
        raise InputError(f"--global-batch={gb} must be positive")
    return gb


def _check_complete(cm, fixed: dict, gb: int) -> None:
    """When tp, pp and cp are fixed (dp then follows), say which rule a bad combination breaks."""
    if not all(k in fixed for k in ("tp", "pp", "cp")):
        return
    vals = {k: fixed.get(k, 1) for k in ("tp", "pp", "cp", "ep", "etp")}
    vals["dp"] = fixed.get("dp", -1)
    s = Strategy.build(**vals, micro_batch=fixed.get("micro_batch", 1), global_batch=gb,
                       schedule=fixed.get("schedule", "1f1b"), vpp=fixed.get("vpp", 1),
                       sequence_parallel=fixed.get("sequence_parallel", False)).resolve(cm.cluster.world)
    cm.check(s)


def _inputs_record(inp, gb: int, fixed: dict) -> dict[str, str]:
    rec = {k: str(v) for k, v in vars(inp).items() if v is not None}
    rec["global_batch"] = str(gb)
    if fixed:
        rec["constraints"] = ",".join(f"{cli_key(k)}={cli_value(v)}" for k, v in fixed.items())
    return rec


def _stack_refuses(cm, cons: Constraints) -> None:
    """Nothing to search: where the fixed knobs break a rule of the stack itself (e.g. DeepSpeed's pipeline
    engine with ZeRO-2), say that rule rather than the generic divisibility line. The unfixed fields take their
    defaults (``techniques.stack_violations``); the model rules read the model as the search does (``rule_spec``)."""
    from autopar import techniques
    from autopar.planner.space import rule_spec

    for msg in techniques.stack_violations(cm.stack_name, cons.fixed, cm.cluster.world, cm.seq_len, rule_spec(cm)):
        raise InputError(f"strategy: {msg}")


def _nothing_fits(cm, cons: Constraints, res: SearchResult) -> None:
    from autopar.planner import explain

    if res.stats.space == 0:
        _stack_refuses(cm, cons)
        named = ",".join(f"{cli_key(k)}={cli_value(v)}" for k, v in cons.fixed.items()) or "the caps"
        raise InputError(f"no configuration satisfies {named} on {cm.cluster.world} GPUs (degrees multiply to the "
                         f"GPU count, tp and ep*etp stay in a node unless --cross-node, and they divide heads, "
                         f"layers, experts and the batch); relax them")
    closest = explain.closest(cm, cons, res.global_batch)
    if closest is None and res.rule_error:
        raise InputError(res.rule_error)
    msg = explain.overflow_message(closest)
    fixes = [*_nearest_fixes(cm, closest), *explain.fit_suggestions(cm, cons, res.global_batch)]
    err = DoesNotFitError("; ".join([msg, *fixes]))
    err.details = {"reasons": [msg], "fixes": fixes}  # kept apart for --json (cli.main.error_json)
    raise err


def _nearest_fixes(cm, closest) -> list[str]:
    """The knob changes of the closest configuration that lower its peak most (``candidate_fixes``)."""
    from autopar.cost_models.report import candidate_fixes

    if closest is None:
        return []
    fixes = sorted(candidate_fixes(cm, closest.strategy, closest), key=lambda f: (not f[1].feasible, f[1].peak_bytes))
    if not fixes:
        return []
    return ["nearest fixes for it: " + ", ".join(f"{label} -> {e.peak_bytes / 2**30:.1f} GiB"
                                                 + ("" if e.feasible else " (still over)") for label, e in fixes[:3])]


# ----- the Plan ----------------------------------------------------------------------------------
def _placement_for(path: str, ep: int) -> list[list[list[int]]] | None:
    """The placement file's assignment when it was made for the plan's ep (else the default)."""
    from autopar.planner.experts import ExpertPlacement

    pl = ExpertPlacement.load_file(path)
    return pl.assignment if pl.ep == ep else None


def _write_plan(cm, best: Candidate, inputs: dict[str, str], placement: str | None, out: Path) -> None:
    """The winner as a Plan (``planner.build``, the one builder), with the placement file's
    assignment when it matches the plan's ep (emit routes by it)."""
    from autopar.planner.build import plan_from_candidate

    chosen = _placement_for(placement, best.strategy.ep) if placement else None
    from autopar.core.plan import Provenance

    plan_from_candidate(cm, best, Provenance(command=_command(cm, best, inputs), inputs=inputs), chosen).save(out)


def _command(cm, cand: Candidate, inputs: dict[str, str]) -> str:
    """A command line that reproduces the search (the plan's own inputs, not the caller's argv)."""
    args = ["autopar", "plan", inputs.get("model", cm.spec.name), "--gpu", cm.cluster.gpu,
            "--nodes", str(cm.cluster.nodes), "--gpus-per-node", str(cm.cluster.gpus_per_node),
            "--seq-len", str(cm.seq_len), "--global-batch", str(cand.strategy.global_batch), "--dtype", cm.dtype]
    for key, flag in (("profile", "--profile"), ("placement", "--placement"), ("trace", "--trace")):
        if key in inputs:
            args += [flag, inputs[key]]
    if "constraints" in inputs:
        args += ["--strategy", inputs["constraints"]]
    return " ".join(shlex.quote(a) for a in args + _program_args(cm))


def _program_args(cm) -> list[str]:
    """The stack and program options the search priced (a re-run must price the same program)."""
    ctx = cm.ctx
    args = ["--runtime", cm.stack_name] if cm.stack_name != "torch" else []
    args += ["--compile", ctx.compile] if ctx.compile != "none" else []
    args += ["--loss-parallel"] if ctx.loss_parallel else []
    args += ["--moe-capacity-factor", str(ctx.moe_capacity_factor)] if ctx.moe_capacity_factor is not None else []
    args += ["--cross-entropy", ctx.cross_entropy] if ctx.cross_entropy != "te" else []
    args += ["--tp-comm-overlap"] if ctx.tp_comm_overlap else []
    return args + ([] if ctx.a2a_overlap else ["--no-a2a-overlap"])


def plan_json(cm, res: SearchResult, top: int) -> dict:
    from autopar.planner import explain

    cands = [_cand_json(cm, x) for x in res.candidates[:top]]
    return {"best": cands[0], "candidates": cands, "global_batch": res.global_batch,
            "why": explain.why(res.candidates, cm), "stats": res.stats.as_dict()}


def _cand_json(cm, cand: Candidate) -> dict:
    from autopar.cost_models.report import estimate_dict
    from autopar.planner.stack_settings import stack_settings

    d = estimate_dict(cand.estimate, cm)
    d["strategy"] = strategy_keys(cand.strategy)
    d["layer_recompute"] = cand.layer_recompute
    d["stages"] = [list(x) for x in cand.stages]
    settings = stack_settings(cm.stack_name, cand.layer_recompute, cand.stages, cand.strategy, cm.spec)
    d["stack_settings"] = settings.model_dump()
    return d


def strategy_keys(s: Strategy) -> dict:
    """The strategy with the compact string's keys (tp, mbs, zero, sp, ...)."""
    out = {}
    for item in s.compact().split(","):
        k, v = item.split("=", 1)
        field = getattr(s, {v2: k2 for k2, v2 in COMPACT_KEYS.items()}.get(k, k))
        out[k] = field if not isinstance(field, bool) else int(field)
    return out


def _plots(cm, res: SearchResult, folder: Path) -> list[Path]:
    from autopar.planner import plots  # matplotlib: only for --plot

    best = res.candidates[0]
    return [plots.timeline(best, cm.p2p_time(best.strategy), folder / "timeline.png"),
            plots.memory_bars(res.candidates, folder / "memory.png")]


# ----- the table ---------------------------------------------------------------------------------
def _print(cm, res: SearchResult, out: Path | None, pngs: list[Path]) -> None:
    from autopar.planner import explain, search_cache

    console = c.console()
    cl = cm.cluster
    unit = "" if cm.spec.sample_unit == "tokens" else f" {cm.spec.sample_unit}"
    console.print(f"[bold]{cm.spec.short()}[/] on {cl.short()}, seq {cm.seq_len}{unit}, global batch "
                  f"{res.global_batch}, {cm.dtype}")
    if cm.stack_name != "torch":  # the search kept to the stack's declarations (techniques/*.py ``stacks``)
        console.print(f"space searched: what {cm.stack_name} runs (docs/planner.md, \"What each stack runs\")")
    from rich.table import Table  # rich's table and the Plan model load only for output (fast input errors)

    t = Table(show_edge=False)
    for col in ("#", "strategy", "step", "tokens/s", "samples/s", "TFLOP/s/GPU", "MFU", "peak mem"):
        t.add_column(col, justify="left" if col == "strategy" else "right")
    for i, x in enumerate(res.candidates, 1):
        e = x.estimate
        t.add_row(str(i), x.strategy.short(), c.seconds(e.step_time_s), f"{e.tokens_per_s:,.0f}",
                  f"{res.global_batch / e.step_time_s:,.1f}",
                  f"{e.tflops_per_gpu:.1f}", f"{100 * e.mfu:.1f}%", c.gib(e.peak_bytes))
    console.print(t)
    times = [x.estimate.step_time_s for x in res.candidates]
    if times != sorted(times):  # the tie rule moved a simpler plan ahead: say why the column is not sorted
        from autopar.planner.rank import RULE

        console.print(f"(order: {RULE})")
    for line in explain.why(res.candidates, cm):
        console.print(line)
    st = res.stats
    console.print(f"searched {st.space:,} configurations in {st.search_time_s:.2f} s: {st.pruned_memory:,} ruled "
                  f"out by memory, {st.pruned_time:,} by the time bound, {st.priced:,} partitioned "
                  f"({st.layer_pricings:,} layer pricings){search_cache.note(st)}")
    console.print(f"best strategy: {res.candidates[0].strategy.compact()}")
    if out:
        nxt = f"next: autopar emit {out}" if cm.stack_name == "torch" else \
            f"priced for {cm.stack_name}'s programs: emit writes autopar's own, re-plan with --runtime torch"
        console.print(f"plan written to {out} ({nxt})")
    for p in pngs:
        console.print(f"figure: {p}")
