"""`autopar estimate` and `autopar memory`: price one given strategy."""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional

import typer

from autopar.cli import common as c
from autopar.cli.app import app
from autopar.core.strategy import Strategy
from autopar.errors import DoesNotFitError, InputError

if TYPE_CHECKING:  # the cost model and rich load inside the commands (fast --help and input errors)
    from rich.console import Console

    from autopar.cost_models.estimate import Estimate

StrategyOpt = typer.Option("", "--strategy", help="e.g. tp=8,pp=4,dp=-1,mbs=1,zero=1; " + c.STRATEGY_KEYS)


def _price(model, gpu, nodes, gpus_per_node, cluster, seq_len, global_batch, strategy, dtype, profile,
           placement, trace, input_shape, runtime="torch", input_dtype="int64", hf=False, program=("none", False)):
    from autopar.cost_models.session import build_cost_model, default_global_batch
    from autopar.planner.stack_split import no_split, split_setting

    if not strategy.replace(",", "").strip():  # ",," names no key either
        raise InputError("--strategy is required, e.g. --strategy tp=8,pp=1,dp=-1,mbs=1")
    inp = c.inputs(model, gpu, nodes, gpus_per_node, cluster, seq_len, dtype, profile, placement, trace, input_shape,
                   runtime, input_dtype, hf, *program)
    cm, spec, cl, seq = build_cost_model(inp)
    s = Strategy.parse(strategy)
    gb = global_batch or s.global_batch or default_global_batch(cl.world, seq)
    if global_batch and s.global_batch and global_batch != s.global_batch:
        raise InputError(f"--global-batch={global_batch} disagrees with the strategy's gbs={s.global_batch}")
    s = s.resolve(cl.world, gb)
    cm.check(s)
    why = no_split(cm.stack_name, cm.num_layers, s)   # plan's rule: the stack runs none of the splits priced
    if why and split_setting(cm.stack_name, _stages(cm, s), s.pp) is None:   # ... nor its default one
        raise InputError(why)
    if cm.ctx.tp_comm_overlap and s.tp > 1 and not s.sequence_parallel:  # Megatron-Core asserts it
        raise InputError("--tp-comm-overlap: Megatron-Core overlaps tp communication only under sequence parallel; "
                         "add sp=1 to --strategy or drop --tp-comm-overlap")
    return cm, cl, s, cm.estimate(s)


@app.command("estimate")
def estimate_cmd(model: str = c.Model, gpu: Optional[str] = c.Gpu, nodes: Optional[int] = c.Nodes,
                 gpus_per_node: Optional[int] = c.GpusPerNode, cluster: Optional[str] = c.Cluster,
                 seq_len: Optional[int] = c.SeqLen, global_batch: Optional[int] = c.GlobalBatch,
                 strategy: str = StrategyOpt,
                 dtype: str = c.Dtype, profile: Optional[str] = c.Profile, placement: Optional[str] = c.Placement,
                 trace: Optional[str] = c.Trace, json_out: bool = c.Json,
                 input_shape: Optional[str] = c.InputShape, no_cache: bool = c.NoCache,
                 runtime: str = c.Runtime, input_dtype: str = c.InputDtype, hf: bool = c.Hf,
                 compile: str = c.Compile, loss_parallel: bool = c.LossParallel,
                 moe_capacity_factor: Optional[float] = c.MoeCapacityFactor, no_a2a_overlap: bool = c.NoA2aOverlap,
                 cross_entropy: str = c.CrossEntropy, tp_comm_overlap: bool = c.TpCommOverlap):
    """Predict step time, throughput, MFU and per-GPU memory of one strategy."""
    from autopar.cost_models.report import host_bound_note

    cm, cl, s, e = _price(model, gpu, nodes, gpus_per_node, cluster, seq_len, global_batch, strategy, dtype,
                          profile, placement, trace, input_shape, runtime, input_dtype, hf,
                          (compile, loss_parallel, moe_capacity_factor, no_a2a_overlap, cross_entropy,
                           tp_comm_overlap))
    if json_out:
        c.print_json(priced_dict(e, cm))
        return
    console = c.console()
    console.print(f"[bold]{cm.spec.short()}[/] on {cl.short()}, seq {cm.seq_len}, "
                  f"global batch {s.global_batch}, {cm.dtype}")
    print_strategy(console, cm, s)
    for msg in _emit_notes(cm, s):  # priced as written; emit names the strategy that runs it
        console.print(f"[yellow]emit: {msg}[/]")
    print_time(console, e)
    for note in filter(None, [host_bound_note(e, cm)]):  # only when the host adds a material share
        console.print(note, highlight=False, soft_wrap=True)
    print_memory(console, e)


def _stages(cm, s: Strategy) -> list[tuple[int, int]]:
    """The stages ``CostModel.estimate`` priced: the stack's default split (``estimate.default_stages``)."""
    from autopar.cost_models.estimate import default_stages

    return default_stages(cm.ctx.runtime, cm.num_layers, s.pp, s.vpp)


def print_strategy(console: Console, cm, s: Strategy) -> None:
    """The strategy, and the stage split priced with the stack's setting that runs it where it needs one."""
    from autopar.planner.stack_settings import split_phrase

    console.print(f"strategy: {s.compact()}")
    split = split_phrase(cm.stack_name, _stages(cm, s), s.pp)
    if split:
        console.print(f"pipeline: {split}", highlight=False, soft_wrap=True)


def priced_dict(e: Estimate, cm) -> dict:
    """``report.estimate_dict`` with the stages priced and the stack's settings that run them
    (``core.plan.StackSettings``, as ``plan --json`` gives each plan)."""
    from autopar.cost_models.report import estimate_dict
    from autopar.planner.stack_settings import stack_settings

    s, stages = e.strategy, _stages(cm, e.strategy)
    out = estimate_dict(e, cm)
    out["stages"] = [list(x) for x in stages]
    settings = stack_settings(cm.stack_name, [s.recompute] * cm.num_layers, stages, s, cm.spec)
    out["stack_settings"] = settings.model_dump()
    return out


def _emit_notes(cm, s: Strategy) -> list[str]:
    """What ``emit`` refuses of a strategy ``estimate`` prices (the techniques' emit rules), e.g. optimizer
    offload below ZeRO-2, which runs ZeRO-2's program (``techniques.offload.stage_rule``)."""
    from autopar import techniques

    spec = cm.spec.model_copy(update={"layers": cm.spec.layers or cm.num_layers})
    return techniques.violations(s, spec, s.world, cm.seq_len, emitted=True)


@app.command("memory")
def memory_cmd(model: str = c.Model, gpu: Optional[str] = c.Gpu, nodes: Optional[int] = c.Nodes,
               gpus_per_node: Optional[int] = c.GpusPerNode, cluster: Optional[str] = c.Cluster,
               seq_len: Optional[int] = c.SeqLen, global_batch: Optional[int] = c.GlobalBatch,
               strategy: str = StrategyOpt,
               dtype: str = c.Dtype, profile: Optional[str] = c.Profile, placement: Optional[str] = c.Placement,
               trace: Optional[str] = c.Trace, json_out: bool = c.Json,
               input_shape: Optional[str] = c.InputShape, no_cache: bool = c.NoCache,
               runtime: str = c.Runtime, input_dtype: str = c.InputDtype, hf: bool = c.Hf,
               compile: str = c.Compile, loss_parallel: bool = c.LossParallel,
               moe_capacity_factor: Optional[float] = c.MoeCapacityFactor, no_a2a_overlap: bool = c.NoA2aOverlap,
               cross_entropy: str = c.CrossEntropy, tp_comm_overlap: bool = c.TpCommOverlap):
    """Say whether a strategy fits, per GPU and component; exit 3 with priced fixes when not."""
    from autopar.cost_models.report import candidate_fixes, host_overflow_message, overflow_bytes

    cm, cl, s, e = _price(model, gpu, nodes, gpus_per_node, cluster, seq_len, global_batch, strategy, dtype,
                          profile, placement, trace, input_shape, runtime, input_dtype, hf,
                          (compile, loss_parallel, moe_capacity_factor, no_a2a_overlap, cross_entropy,
                           tp_comm_overlap))
    fixes = [] if e.feasible else candidate_fixes(cm, s, e)
    if json_out:
        out = priced_dict(e, cm)
        out["fixes"] = [{"change": label, "peak_bytes": f.peak_bytes, "feasible": f.feasible,
                         "step_time_s": f.step_time_s} for label, f in fixes]
        c.print_json(out)
    else:
        console = c.console()
        print_strategy(console, cm, s)
        print_memory(console, e)
        if fixes:
            console.print("fixes, each priced by the model:")
            for label, f in fixes:
                verdict = "fits" if f.feasible else "does not fit"
                console.print(f"  {label}: peak {c.gib(f.peak_bytes)} ({verdict}), step {c.seconds(f.step_time_s)}")
    if not e.feasible and overflow_bytes(e) <= 0:
        raise DoesNotFitError(f"does not fit: {host_overflow_message(e)}")
    if not e.feasible:
        worst = e.worst_rank
        comp = max(worst.memory, key=worst.memory.get)
        raise DoesNotFitError(f"does not fit: stage {worst.rank} needs {c.gib(e.peak_bytes)} of "
                              f"{c.gib(e.capacity_bytes)} ({c.gib(overflow_bytes(e))} over the usable memory); "
                              f"largest component: {comp} {c.gib(worst.memory[comp])}")


def print_time(console: Console, e: Estimate) -> None:
    from rich.table import Table

    t = Table(title="time per step", show_edge=False)
    t.add_column("component")
    t.add_column("time", justify="right")
    t.add_column("share", justify="right")
    for k, v in e.time.items():
        if v > 0:
            t.add_row(k, c.seconds(v), f"{100 * v / e.step_time_s:.1f}%")
    console.print(t)
    console.print(f"step time {c.seconds(e.step_time_s)} | {e.tokens_per_s:,.0f} tokens/s | "
                  f"{e.strategy.global_batch / e.step_time_s:,.1f} samples/s | "
                  f"{e.tflops_per_gpu:.1f} TFLOP/s per GPU | MFU {100 * e.mfu:.1f}%")


def print_memory(console: Console, e: Estimate) -> None:
    from rich.table import Table

    worst = e.worst_rank
    t = Table(title=f"memory per GPU (most loaded: pipeline stage {worst.rank})", show_edge=False)
    t.add_column("component")
    t.add_column("bytes", justify="right")
    for k, v in worst.memory.items():
        t.add_row(k, c.gib(v))
    t.add_row("[bold]total[/]", f"[bold]{c.gib(e.peak_bytes)}[/]")
    console.print(t)
    if len(e.ranks) > 1:
        console.print("per stage: " + ", ".join(f"{r.rank}: {c.gib(r.mem_bytes)}" for r in e.ranks))
    verdict = "fits" if e.feasible else "DOES NOT FIT"
    console.print(f"peak {c.gib(e.peak_bytes)} of {c.gib(e.capacity_bytes)} ({verdict})")
    if e.allocator_reserve_fraction:  # what torch.cuda.max_memory_reserved would report
        console.print(f"caching allocator reserved at peak: {c.gib(e.reserved_peak_bytes)} (live tensors without "
                      f"framework_overhead x {1 + e.allocator_reserve_fraction:.3f}, the reserve of "
                      "this stack on this GPU)")
