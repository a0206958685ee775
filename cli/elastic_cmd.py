"""Elastic training: `autopar plan --from` (re-plan for the GPUs left), `autopar inspect-checkpoint`
and `autopar reshard` (see docs/elastic.md). Heavy imports stay inside the functions."""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path

import typer
from rich.table import Table

from autopar.cli import common as c
from autopar.cli import paths
from autopar.cli.app import app
from autopar.errors import DoesNotFitError, InputError

_INT_INPUTS = ("nodes", "gpus_per_node", "seq_len")
MAX_GROUPS = 8  # lines of per-rank fetches printed (--json has them all)


# ----- plan --from -------------------------------------------------------------------------------
def _inputs_of(plan, **override):
    """The cost-model inputs that produced ``plan`` (its provenance), with ``override`` applied."""
    from autopar.cost_models.session import Inputs

    rec = dict(plan.provenance.inputs)
    kw = {k: (int(v) if k in _INT_INPUTS else v) for k, v in rec.items()
          if k in Inputs.__dataclass_fields__ and k != "input_shape"}
    if rec.get("input_shape"):
        kw["input_shape"] = json.loads(rec["input_shape"])
    kw.setdefault("model", _model_arg(plan.model))
    kw.update(gpu=plan.cluster.gpu, seq_len=plan.seq_len, dtype=plan.dtype, gpus_per_node=plan.cluster.gpus_per_node,
              nodes=plan.cluster.nodes, runtime=plan.runtime, compile=plan.compile, loss_parallel=plan.loss_parallel,
              moe_capacity_factor=plan.moe_capacity_factor, a2a_overlap=plan.a2a_overlap,
              cross_entropy=plan.cross_entropy, tp_comm_overlap=plan.tp_comm_overlap)
    kw.update({k: v for k, v in override.items() if v is not None})
    return Inputs(**kw)


def _model_arg(spec) -> str:
    """The model argument that resolves to ``spec`` (its source: ``preset:NAME``, ``factory:X``, a path)."""
    kind, _, rest = (spec.source or "").partition(":")
    return rest if kind in ("preset", "factory", "config") and rest else spec.name


def same_model(plan, cm) -> None:
    """The model the plan's inputs resolve to today must be the plan's own (the context length aside)."""
    skip = {"max_seq_len", "source"}
    a, b = plan.model.model_dump(exclude=skip), cm.spec.model_dump(exclude=skip)
    diff = next((k for k in a if a[k] != b.get(k)), None)
    if diff is not None:
        raise InputError(f"--from: the plan's model differs from what '{_model_arg(plan.model)}' resolves to "
                         f"today ({diff}: {a[diff]!r} vs {b.get(diff)!r}); fix: re-run `autopar plan` for it")


def new_shape(plan, gpus: int | None, nodes: int | None) -> tuple[int, int]:
    """(nodes, gpus per node) of the re-planned job from ``--gpus`` or ``--nodes``."""
    gpn = plan.cluster.gpus_per_node
    if (gpus is None) == (nodes is None):
        raise InputError("--from: give the new size with exactly one of --gpus N or --nodes N")
    if nodes is not None:
        return nodes, gpn
    if gpus % gpn == 0:
        return gpus // gpn, gpn
    if plan.cluster.nodes == 1 and gpus < gpn:
        return 1, gpus
    raise InputError(f"--gpus={gpus} is not a multiple of the {gpn} GPUs per node; fix: use whole nodes "
                     f"(--gpus {gpus - gpus % gpn or gpn}) or --nodes")


def replan_from(from_plan: Path, gpus: int | None, nodes: int | None, global_batch: int | None, strategy: str,
                caps: dict, top: int, json_out: bool, out: Path | None, lost_nodes: str | None) -> None:
    """`autopar plan --from PLAN.json --gpus N`: the same model on N GPUs, the global batch kept
    (unless --global-batch); ``strategy`` fixes knobs and ``caps`` bound them as in a plain search."""
    from autopar.core.plan import Plan
    from autopar.core.strategy import Strategy
    from autopar.cost_models.session import build_cost_model
    from autopar.planner import elastic
    from autopar.planner.search import Constraints

    plan = Plan.load(from_plan)
    cons = Constraints(fixed=Strategy.parse_partial(strategy) if strategy else {}, **caps)
    n_nodes, gpn = new_shape(plan, gpus, nodes)
    cm_old = build_cost_model(_inputs_of(plan))[0]
    same_model(plan, cm_old)
    inp_new = _inputs_of(plan, nodes=n_nodes, gpus_per_node=gpn)
    cm_new = build_cost_model(inp_new)[0]
    gb = global_batch or plan.strategy.global_batch
    lost = elastic.lost_ranks(plan.cluster.world, plan.cluster.gpus_per_node, cm_new.cluster.world,
                              _int_list(lost_nodes))
    res = elastic.replan(cm_old, cm_new, plan, gb, cons, lost=lost, top_k=max(top, 8))
    if not res.options:
        raise DoesNotFitError(f"no plan of {plan.model.name} fits {cm_new.cluster.world} GPUs with global batch "
                              f"{gb}; fix: --global-batch with more divisors of the GPU count, or more GPUs")
    if out:
        _write(cm_new, res.best.candidate, inp_new, gb, from_plan, out)
    if json_out:
        c.print_json(_json(plan, cm_new, res, top))
        return
    _print(plan, cm_new, res, top, out)


def _write(cm, cand, inp, gb: int, from_plan: Path, out: Path) -> None:
    from autopar.core.plan import Provenance
    from autopar.planner.build import plan_from_candidate

    record = {k: str(v) for k, v in vars(inp).items() if v is not None} | {"global_batch": str(gb),
                                                                           "from_plan": str(from_plan)}
    command = f"autopar plan --from {from_plan} --gpus {cm.cluster.world} --global-batch {gb}"
    plan_from_candidate(cm, cand, Provenance(command=command, inputs=record)).save(out)


def _int_list(text: str | None) -> list[int] | None:
    if not text:
        return None
    try:
        return [int(x) for x in text.split(",")]
    except ValueError:
        raise InputError(f"--lost-nodes={text}: comma-separated node indices, e.g. 15 or 3,7") from None


def _json(plan, cm_new, res, top: int) -> dict:
    opts = [{"strategy": o.candidate.strategy.model_dump(), "step_time_s": o.candidate.step_time_s,
             "from_peers_bytes": o.move.from_peers_bytes, "from_checkpoint_bytes": o.move.from_checkpoint_bytes,
             "max_rank_bytes": o.move.max_rank_bytes} for o in res.options[:top]]
    return {"old": {"strategy": plan.strategy.model_dump(), "gpus": plan.cluster.world,
                    "step_time_s": res.old_step_time_s},
            "new": {"strategy": res.best.candidate.strategy.model_dump(), "gpus": cm_new.cluster.world,
                    "step_time_s": res.best.candidate.step_time_s, "move": res.best.move.as_dict()},
            "global_batch": res.global_batch, "chosen": res.chosen, "options": opts, "notes": res.notes}


def _print(plan, cm_new, res, top: int, out: Path | None) -> None:
    console = c.console()
    old_s, new = plan.strategy, res.best.candidate
    console.print(f"[bold]{plan.model.name}[/]: {plan.cluster.world} -> {cm_new.cluster.world} GPUs, global batch "
                  f"{res.global_batch} kept (was {old_s.global_batch}), seq {plan.seq_len}, {plan.dtype}")
    t = Table(show_edge=False)
    for col in ("#", "strategy", "step", "vs old", "from peers", "from ckpt", "max/rank", ""):
        t.add_column(col, justify="left" if col in ("strategy", "") else "right")
    for i, o in enumerate(res.options[:top]):
        m, st = o.move, o.candidate.step_time_s
        t.add_row(str(i + 1), o.candidate.strategy.short(), c.seconds(st),
                  f"{100 * (st / res.old_step_time_s - 1):+.1f}%",
                  _size(m.from_peers_bytes), _size(m.from_checkpoint_bytes), _size(m.max_rank_bytes),
                  "chosen" if i == res.chosen else "")
    console.print(t)
    fastest = min(o.candidate.step_time_s for o in res.options)
    console.print(f"old plan {old_s.short()} on {plan.cluster.world} GPUs: {c.seconds(res.old_step_time_s)} per step "
                  f"(today's cost model); new plan {new.strategy.short()}: {c.seconds(new.step_time_s)} "
                  f"({100 * (new.step_time_s / res.old_step_time_s - 1):+.1f}%), chosen as the least state moved "
                  f"within {100 * 0.02:.0f}% of the fastest ({c.seconds(fastest)})")
    n_old, n_new = old_s.global_batch // old_s.dp // old_s.micro_batch, new.strategy.global_batch // \
        new.strategy.dp // new.strategy.micro_batch
    console.print(f"batch: dp {old_s.dp} -> {new.strategy.dp}, micro-batch {old_s.micro_batch} -> "
                  f"{new.strategy.micro_batch}, micro-batches per step {n_old} -> {n_new}")
    console.print(f"state to fetch (weights + Adam states; model total {_size(res.best.move.total_state_bytes)}):")
    groups = _rank_groups(res.best.move)
    for line in groups[:MAX_GROUPS]:
        console.print("  " + line)
    if len(groups) > MAX_GROUPS:
        per = [r.from_peers_bytes + r.from_checkpoint_bytes for r in res.best.move.per_rank]
        console.print(f"  ... {len(groups) - MAX_GROUPS} more groups of ranks (per rank {_size(min(per))} to "
                      f"{_size(max(per))}; --json lists every rank)")
    for note in res.notes:
        console.print(f"note: {note}")
    if out:
        console.print(f"plan written to {out} (next: autopar emit {out}; train.py --resume auto continues the "
                      "checkpoint under the new plan)")


def _rank_groups(move) -> list[str]:
    """Consecutive new ranks fetching the same amounts, one line each."""
    lines, start = [], 0
    ranks = move.per_rank
    for i in range(1, len(ranks) + 1):
        same = i < len(ranks) and _key(ranks[i]) == _key(ranks[start]) and (ranks[i].gpu < 0) == (ranks[start].gpu < 0)
        if same:
            continue
        a, b = ranks[start], ranks[i - 1]
        where = "new GPUs" if a.gpu < 0 else f"on old GPUs {a.gpu}-{b.gpu}" if b.gpu != a.gpu else f"on old GPU {a.gpu}"
        who = f"rank {a.rank}" if a is b else f"ranks {a.rank}-{b.rank}"
        lines.append(f"{who} ({where}): {_size(a.from_peers_bytes)} from peers, "
                     f"{_size(a.from_checkpoint_bytes)} from the checkpoint")
        start = i
    return lines


def _size(x: float) -> str:
    return f"{x / 2**30:.2f} GiB" if x >= 2**30 else f"{x / 2**20:.1f} MiB"


def _key(r) -> tuple[int, int]:
    return round(r.from_peers_bytes / 2**20), round(r.from_checkpoint_bytes / 2**20)


# ----- checkpoints ---------------------------------------------------------------------------------
def _complete(path: Path) -> Path:
    """A complete, readable ``step-N`` folder: ``path`` itself, or the newest in a ``--ckpt-dir``
    (``runtime_ckpt.find_checkpoint``, the reader train.py --resume uses)."""
    from autopar.codegen import runtime_ckpt as rc

    with _refused():
        return rc.find_checkpoint(path)


@contextmanager
def _refused():
    """runtime_ckpt's one-line refusals of a checkpoint (``CheckpointMismatch``) as input errors (exit 2)."""
    from autopar.codegen import runtime_ckpt as rc

    try:
        yield
    except rc.CheckpointMismatch as err:
        raise InputError(str(err)) from None


def checkpoint_info(path: Path) -> dict:
    """What a checkpoint holds: its metadata, tensor counts and bytes per section, train state."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    from autopar.codegen import runtime_ckpt as rc

    meta = rc.read_meta(path)
    sections: dict = {}
    experts = set()
    with _refused():
        index, train = rc.read_index(path), rc.read_train_state(path)
    for key, md in index.items():
        sec = sections.setdefault(key.split(".", 1)[0], {"tensors": 0, "values": 0, "bytes": 0, "objects": 0})
        if isinstance(md, TensorStorageMetadata):
            n = md.size.numel()
            sec["tensors"] += 1
            sec["values"] += n
            sec["bytes"] += n * md.properties.dtype.itemsize
        else:
            sec["objects"] += 1
        if ".expert" in key:
            experts.add(key.rsplit(".expert", 1)[1])
    return {"path": str(path), "step": meta["step"], "world": meta["world"], "model": meta["model"],
            "plan": meta.get("plan", {}), "sections": sections, "experts": len(experts),
            "resharded_from": meta.get("resharded_from"),
            "train_state": {"scheduler": train.get("scheduler"), "sampler": train.get("sampler"),
                            "rng_ranks": len(train.get("rng") or [])}}


def _plan_line(plan: dict) -> str:
    from autopar.core.strategy import Strategy

    if not plan.get("strategy"):
        return "unknown (no plan recorded)"
    s = Strategy.model_validate(plan["strategy"])
    cl = plan.get("cluster", {})
    return (f"{s.short()} ({s.compact()}), {cl.get('nodes', '?')} x {cl.get('gpus_per_node', '?')} "
            f"{cl.get('gpu', '?')}, seq {plan.get('seq_len', '?')}, {plan.get('dtype', '?')}")


@app.command("inspect-checkpoint")
def inspect_checkpoint_cmd(ckpt: Path = typer.Argument(..., help="a step-N checkpoint folder, or the --ckpt-dir "
                                                       "holding them (its newest complete one)"),
                           json_out: bool = c.Json):
    """Print the plan that wrote a checkpoint, its step, and what it holds (model, optimizer,
    scheduler, sampler, RNG)."""
    info = checkpoint_info(_complete(ckpt))
    if json_out:
        c.print_json(info)
        return
    m, console = info["model"], c.console()
    console.print(f"checkpoint {info['path']}: step {info['step']}, written by {info['world']} ranks"
                  + (f" (resharded from {info['resharded_from']})" if info["resharded_from"] else ""))
    console.print(f"model: {m.get('name')}, vocab {m.get('vocab')}, {m.get('n_params', 0):,} parameters, "
                  f"shapes {m.get('shapes_sha256')}")
    console.print(f"plan: {_plan_line(info['plan'])}")
    for name, sec in sorted(info["sections"].items()):
        console.print(f"{name}: {sec['tensors']} tensors, {sec['values']:,} values, {_size(sec['bytes'])}"
                      + (f", {sec['objects']} other entries" if sec["objects"] else ""))
    if info["experts"]:
        console.print(f"experts: saved per expert id ({info['experts']} ids), any placement loads them")
    ts = info["train_state"]
    console.print(f"train state: scheduler {ts['scheduler'] is not None}, sampler {ts['sampler']}, "
                  f"RNG of {ts['rng_ranks']} ranks")


def target_identity(plan) -> tuple[dict, list[str]]:
    """Model identity of ``plan``'s program (as train.py records it) and the model keys it loads."""
    from torch import nn

    from autopar.codegen import runtime_ckpt as rc
    from autopar.profiles.models import build_model
    from autopar.profiles.models.layers import GroupedExperts

    model = build_model(plan.model, "meta")
    vocab = plan.model.vocab or next(m for m in model.modules() if isinstance(m, nn.Embedding)).num_embeddings
    experts = {name for name, mod in model.named_modules() if isinstance(mod, GroupedExperts)}
    keys = []
    for name, p in model.named_parameters():
        owner = name.rsplit(".", 1)[0]
        keys += [f"model.{name}.expert{e}" for e in range(p.shape[0])] if owner in experts else [f"model.{name}"]
    return rc.model_identity(model, plan.model.name, vocab), keys


@app.command("reshard")
def reshard_cmd(ckpt: Path = typer.Argument(..., help="a step-N checkpoint folder (or the --ckpt-dir holding it)"),
                to: Path = typer.Option(..., "--to", help="the plan (plan.json) the checkpoint will continue under"),
                out: Path = typer.Option(..., "--out", callback=paths.out_folder,
                                         help="checkpoint folder to write step-N into (train.py --ckpt-dir)")):
    """Convert a checkpoint offline for another plan: refuse another model or vocabulary (exit 2),
    check every tensor the target program loads is there, and write it again (one writer,
    plan-independent keys) recording the target plan."""
    from autopar.codegen import runtime_ckpt as rc
    from autopar.core.plan import Plan

    src = _complete(ckpt)
    target = Plan.load(to)
    identity, keys = target_identity(target)
    with _refused():
        rc.check_identity(rc.read_meta(src)["model"], identity)
    final = _rewrite(src, out, target, keys)
    c.console().print(f"wrote {final} for {target.strategy.short()} on {target.cluster.world} ranks "
                      f"(step {rc.read_meta(final)['step']}); next: train.py --ckpt-dir {out} --resume auto")


def _rewrite(src: Path, out: Path, target, keys: list[str]) -> Path:
    """Every tensor of ``src`` in memory (one process), saved again under ``out/step-N``."""
    import shutil
    import warnings

    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.default_planner import _EmptyStateDictLoadPlanner
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

    from autopar.codegen import runtime_ckpt as rc

    with _refused():   # both read before anything is written
        saved, train = set(rc.read_index(src)), rc.read_train_state(src)
    missing = [k for k in keys if k not in saved]
    if missing:
        raise InputError(f"checkpoint: {src} lacks {missing[0]} ({len(missing)} tensors the target loads); "
                         "fix: reshard a checkpoint written by this model's emitted program")
    state: dict = {}
    _load_state_dict(state, storage_reader=FileSystemReader(str(src)), planner=_EmptyStateDictLoadPlanner(),
                     no_dist=True)
    meta = rc.read_meta(src) | {"plan": json.loads(target.model_dump_json()), "resharded_from": str(src)}
    tmp = out / f"{src.name}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    with warnings.catch_warnings():  # "assuming the intent is to save in a single process": it is
        warnings.simplefilter("ignore", UserWarning)
        dcp.save(state, checkpoint_id=str(tmp), no_dist=True)
    return rc.finalize(tmp, meta, train)
