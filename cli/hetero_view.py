"""`autopar plan` on a cluster with node groups (``planner.hetero``): the plan, stage by stage."""

from __future__ import annotations

from autopar.cli import common as c


def run(cm, gb: int, cons, json_out: bool) -> None:
    from autopar.planner import hetero

    hp = hetero.plan(cm, gb, cons)
    if json_out:
        c.print_json(as_json(cm, hp))
        return
    _print(cm, hp)


def as_json(cm, hp) -> dict:
    b, groups = hp.best, cm.cluster.node_groups
    return {"strategy": b.strategy.compact(), "step_time_s": b.step_time_s, "pipeline_s": b.pipeline_s,
            "outside_pipeline_s": b.outside_pipeline_s, "even_split_step_time_s": hp.even.step_time_s,
            "slowest_group": groups[hp.slow_group].name or groups[hp.slow_group].gpu,
            "stages": [{"stage": j, "group": groups[g].name or groups[g].gpu, "gpu": groups[g].gpu,
                        "layers": list(b.stages[j]), "fwd_s": b.stage_fwd_s[j], "bwd_s": b.stage_bwd_s[j],
                        "mem_bytes": b.stage_mem_bytes[j], "usable_bytes": b.stage_usable_bytes[j]}
                       for j, g in enumerate(b.stage_group)],
            "tried_pp": [{"pp": p, "step_time_s": t} for p, t in hp.tried]}


def _print(cm, hp) -> None:
    from rich.table import Table

    b, groups, console = hp.best, cm.cluster.node_groups, c.console()
    desc = " + ".join(f"{g.nodes} x {cm.cluster.gpus_per_node} {g.gpu}"
                      + (f" ({g.nic_fraction:.0%} NICs)" if g.nic_fraction < 1 else "") for g in groups)
    console.print(f"[bold]{cm.spec.short()}[/] on {desc}, seq {cm.seq_len}, global batch "
                  f"{b.strategy.global_batch}, {cm.dtype}")
    t = Table(show_edge=False)
    for col in ("stage", "group", "layers", "fwd / micro-batch", "bwd / micro-batch", "memory", "usable"):
        t.add_column(col, justify="left" if col == "group" else "right")
    for j, g in enumerate(b.stage_group):
        a, e = b.stages[j]
        t.add_row(str(j), groups[g].name or groups[g].gpu, f"{a}-{e - 1} ({e - a})", c.seconds(b.stage_fwd_s[j]),
                  c.seconds(b.stage_bwd_s[j]), c.gib(b.stage_mem_bytes[j]), c.gib(b.stage_usable_bytes[j]))
    console.print(t)
    console.print(f"strategy {b.strategy.short()}: step {c.seconds(b.step_time_s)} (pipeline "
                  f"{c.seconds(b.pipeline_s)}, gradient sync / optimizer beyond it {c.seconds(b.outside_pipeline_s)}); "
                  f"an even layer split would take {c.seconds(hp.even.step_time_s)}")
    from autopar.cost_models.hetero import slowest_inter_link

    console.print(f"each stage on one GPU type; collectives between nodes at the slowest link "
                  f"({slowest_inter_link(cm.cluster).bw_gbps:g} GB/s per GPU); intra-stage strategy searched on "
                  f"the slowest group ({groups[hp.slow_group].name or groups[hp.slow_group].gpu})")
    console.print(f"best strategy: {b.strategy.compact()}")
