"""``emit``: a ``Plan`` -> a folder with ``train.py``, launch scripts and a README.

Everything that would fail at run time is checked here and reported as a one-line
``InputError`` (a custom module without a block list, tp not dividing the heads, a
schedule the microbatch count does not allow, ...). Files are rendered first, written into
a temporary folder next to ``out_dir`` and moved into place at the end, so a failure
leaves nothing half-written.
"""

from __future__ import annotations

import math
import os
import pprint
import shutil
import tempfile
from pathlib import Path

from autopar import __version__
from autopar.codegen.emit_build import render_build
from autopar.codegen.emit_checks import Layout, check_plan
from autopar.codegen.emit_launch import (
    LaunchOptions,
    _fill,
    network_line,
    render_pytorchjob,
    render_slurm,
    render_torchrun,
)
from autopar.codegen.emit_vendor import vendored_runtime
from autopar.codegen.sample_data import ALPHABET, sample_bytes, sample_size
from autopar.core.plan import Plan
from autopar.errors import InputError
from autopar.fileio import write_atomic
from autopar.techniques.pipeline import stage_rank

FILES = ("train.py", "launch_torchrun.sh", "launch_slurm.sbatch", "pytorchjob.yaml", "README.md", "plan.json")
# Peak AdamW learning rate by parameter count (train.py --lr overrides it), interpolated in
# log-log between published recipes: nanoGPT's 10.7M-parameter shakespeare_char model (1e-3),
# then GPT-3's Table 2.1 (Brown et al. 2020) from 125M (6e-4) to 175B (6e-5).
LR_TABLE = ((1.07e7, 1e-3), (1.25e8, 6e-4), (3.5e8, 3e-4), (7.6e8, 2.5e-4), (1.3e9, 2e-4), (2.7e9, 1.6e-4),
            (6.7e9, 1.2e-4), (1.3e10, 1e-4), (1.75e11, 6e-5))


def default_lr(n_params: float) -> float:
    """The peak learning rate of ``LR_TABLE`` for a model of ``n_params`` (clamped at both ends)."""
    if n_params <= LR_TABLE[0][0]:
        return LR_TABLE[0][1]
    for (n0, lr0), (n1, lr1) in zip(LR_TABLE, LR_TABLE[1:]):
        if n_params <= n1:
            t = math.log(n_params / n0) / math.log(n1 / n0)
            return float(f"{math.exp(math.log(lr0) + t * math.log(lr1 / lr0)):.2g}")
    return LR_TABLE[-1][1]


def has_sample(vocab: int) -> bool:
    """The generated sample needs a vocabulary holding its alphabet (custom models: ``vocab`` unknown = 0)."""
    return vocab >= len(ALPHABET)


def plan_device(plan: Plan) -> str:
    """The device the plan was priced for: ``cpu`` when its profile describes CPU ranks (``cores``
    set, e.g. ``--gpu cpu``), else ``cuda``. A profile that cannot be read here (a file on another
    machine) counts as a GPU."""
    from autopar.profiles.hw import load_gpu_profile

    try:
        return "cpu" if load_gpu_profile(plan.cluster.gpu).cores else "cuda"
    except (InputError, OSError):
        return "cuda"


def emit(plan: Plan, out_dir: str | os.PathLike, device: str | None = None,
         launch: LaunchOptions | None = None) -> list[Path]:
    """Write the training program for ``plan`` into ``out_dir``; returns the files written.
    ``device``: default the one the plan was priced for (``plan_device``), so a plan made with
    ``--gpu cpu`` runs on gloo without a flag. ``launch``: account, partition, image, ... of the
    launch scripts (``emit_launch``)."""
    device = device or plan_device(plan)
    if device not in ("cuda", "cpu"):
        raise InputError(f"device: '{device}' is not cuda or cpu")
    layout = check_plan(plan, device)
    launch = launch or LaunchOptions()
    texts = {
        "train.py": render_train(plan, layout, device),
        "launch_torchrun.sh": render_torchrun(plan, device, launch),
        "launch_slurm.sbatch": render_slurm(plan, device, launch),
        "pytorchjob.yaml": render_pytorchjob(plan, device, launch),
        "README.md": render_readme(plan, layout, device),
        "plan.json": plan.model_dump_json(indent=2) + "\n",
        **vendored_runtime(),  # autopar_rt/: the runtime travels with the folder, nodes need only torch
    }
    if has_sample(layout.vocab):
        # at least 4 windows of the plan's sequence (long-context plans get a longer sample)
        texts["data/sample.bin"], texts["data/sample.txt"] = sample_bytes(layout.vocab, sample_size(plan.seq_len))
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise InputError(f"out: {out} exists and is not a folder; choose another --out")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        for name, text in texts.items():
            write_atomic(tmp / name, text)
            if name.endswith((".sh", ".sbatch", "train.py")):
                os.chmod(tmp / name, 0o755)
        if not out.exists():
            os.replace(tmp, out)  # the whole folder appears at once
        else:  # keep what else is there (checkpoints, logs): replace our files one by one
            for name in texts:
                (out / name).parent.mkdir(parents=True, exist_ok=True)
                os.replace(tmp / name, out / name)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return [out / name for name in FILES]


# ----- helpers ------------------------------------------------------------------------
def _procs(plan: Plan) -> tuple[int, int, int]:
    return plan.cluster.nodes, plan.cluster.gpus_per_node, plan.cluster.world


def launch_commands(plan: Plan) -> list[str]:
    """The ways to start the program, one command each (multi-line commands end lines with ``\\``)."""
    nodes, procs, _ = _procs(plan)
    if nodes == 1:
        direct = f"torchrun --standalone --nproc-per-node={procs} train.py --steps 10"
    else:
        direct = (f"torchrun --nnodes={nodes} --nproc-per-node={procs} --node-rank=$NODE_RANK \\\n"
                  "    --rdzv-backend=c10d --rdzv-endpoint=$MASTER_ADDR:29500 train.py --steps 10")
    every_node = "" if nodes == 1 else "  # on every node, with NODE_RANK=i MASTER_ADDR=<node 0>"
    return [
        direct,
        "bash launch_torchrun.sh --steps 10" + every_node,
        "sbatch launch_slurm.sbatch --steps 10",
        "kubectl apply -f pytorchjob.yaml",
    ]


# ----- train.py ---------------------------------------------------------------------
def render_train(plan: Plan, lay: Layout, device: str) -> str:
    return _fill("train.py.tmpl", DOCSTRING=_docstring(plan, lay, device), CONFIG=_config(plan, lay, device),
                 BUILD=render_build(plan, lay), STEP=_step(lay))


def _docstring(plan: Plan, lay: Layout, device: str) -> str:
    s, m = plan.strategy, plan.model
    nodes, procs, world = _procs(plan)
    lines = [
        f"Train {m.short()} with autopar plan '{s.short()}'.",
        "",
        f"Cluster: {plan.cluster.short()} ({world} ranks); this program runs on {device}"
        f" ({'NCCL' if device == 'cuda' else 'gloo, one process per rank'}).",
        f"Strategy: {s.compact()}",
        f"Batch: {s.global_batch} sequences x {plan.seq_len} tokens per step; {lay.n_micro} microbatch(es) of "
        f"{s.micro_batch} per data-parallel rank; precision {plan.dtype}.",
        f"Data parallel: {lay.dp_summary}.",
    ]
    if s.pp > 1:
        ranges = ", ".join(f"{a}-{b - 1}" if b > a else "-" for a, b in lay.stages)
        lines.append(f"Pipeline: {s.schedule}, {len(lay.stages)} virtual stages (layers {ranges}).")
    if lay.recompute:
        by_mode = {mode: [k for k, v in sorted(lay.recompute.items()) if v == mode]
                   for mode in ("full", "op", "selective")}
        lines.append("Recompute: " + "; ".join(f"{mode} on layer{'s' if len(ids) > 1 else ''} {_ranges(ids)}"
                                                for mode, ids in by_mode.items() if ids) + ".")
    if lay.ep > 1 or s.etp > 1:
        lines.append(f"Expert parallel: ep={lay.ep}, etp={s.etp} folded over the dp*cp*tp ranks of a stage "
                     f"(edp={lay.edp}).")
    lines += [f"Note: {n}" for n in lay.notes]
    preds = {k: v for k, v in plan.predictions.items() if isinstance(v, (int, float))}
    if preds:
        lines.append("Predicted: " + ", ".join(f"{k}={v:.4g}" for k, v in sorted(preds.items())[:6]) + ".")
    lines += ["", "Launch (from this folder):"]
    lines += ["    " + c.replace("\n", "\n    ") for c in launch_commands(plan)]
    lines += ["", "Each logged step prints loss= (mean over the global batch), lr=, grad_norm=, step_time_s=,",
              "tokens_per_s=, tflops_per_gpu=, mfu= (estimate's FLOP basis), peak_mem_bytes= (max over",
              "ranks) and the plan's predictions. Data: --data (default: data/sample.bin). Checkpoints:",
              "--ckpt-every N; a restart resumes from the newest complete one. All options: --help.",
              f"Generated by autopar {__version__}; re-run `autopar emit` to change the plan."]
    body = "\n".join(lines).replace('"""', "'''")
    return f'r"""{body}\n"""'  # raw: the launch commands hold shell line continuations


def _config(plan: Plan, lay: Layout, device: str) -> str:
    s = plan.strategy
    rows = [
        f'DEVICE = "{device}"  # cuda: NCCL, one GPU per rank; cpu: gloo, one process per rank',
        f"PP, DP, CP, TP, EP = {s.pp}, {s.dp}, {s.cp}, {s.tp}, {lay.ep}  # mesh order: pp, dp, cp, tp (innermost)",
        f"ETP = {s.etp}  # expert tensor parallel: ep*etp folded over a stage's dp*cp*tp ranks (etp innermost)",
        f"SEQ_LEN = {plan.seq_len}",
        f"GLOBAL_BATCH = {s.global_batch}  # sequences per step, over all data-parallel ranks",
        f"MICRO_BATCH = {s.micro_batch}",
        f"N_MICRO = {lay.n_micro}  # microbatches per data-parallel rank and step",
        f"VOCAB = {lay.vocab}",
        f'DTYPE = "{plan.dtype}"',
        f"ZERO_STAGE = {s.zero_stage}",
        f"ZERO1_OPTIMIZER = {lay.dp_mode == 'ddp' and s.zero_stage == 1}  # ZeroRedundancyOptimizer over dp*cp",
    ]
    rows += _training_rows(plan, lay)
    if s.tp > 1:
        rows.append(f"SEQUENCE_PARALLEL = {s.sequence_parallel}")
    rows.append(_const("STAGES", lay.stages, "[layer_start, layer_end) per virtual pipeline stage"))
    rows.append(f"N_STAGES = {len(lay.stages)}")
    if s.pp > 1:
        rows.append(f'SCHEDULE = "{s.schedule}"')
        ranks = [stage_rank(i, s.pp, s.schedule) for i in range(len(lay.stages))]
        rows.append(_const("STAGE_RANKS", ranks, "pipeline rank of each virtual stage (techniques.pipeline)"))
    if lay.recompute:
        rows.append(_const("RECOMPUTE", lay.recompute, "layer -> full | op | selective (others: none)"))
    if lay.ep > 1:
        rows.append(f"FIRST_MOE_LAYER = {plan.model.first_dense_layers}")
        rows.append(_const("EXPERT_PLACEMENT", lay.placement, "[moe layer][ep rank] -> expert ids"))
    return "\n".join(rows)


def _training_rows(plan: Plan, lay: Layout) -> list[str]:
    """Optimizer default, the sample flag and the FLOP basis of the logged MFU (the plan's predictions)."""
    p = plan.predictions
    mem = p.get("memory", {}).get("peak_bytes", float("nan")) if isinstance(p.get("memory"), dict) else float("nan")
    basis = (f"FLOPS = rt.FlopBasis(model_flops_per_step={p.get('model_flops_per_step', 0.0)!r}, "
             f"hardware_flops_per_step={p.get('hardware_flops_per_step', 0.0)!r},\n"
             f"                     peak_flops_per_gpu={p.get('peak_flops_per_gpu', 0.0)!r}, "
             f"pred_step_time_s={p.get('step_time_s', float('nan'))!r},\n"
             f"                     pred_mfu={p.get('mfu', float('nan'))!r}, pred_peak_mem_bytes={mem!r})")
    return [
        f"LR = {default_lr(_n_params(plan))}  # peak AdamW learning rate for this model size (--lr; see emit.LR_TABLE)",
        f"SAMPLE_DATA = {has_sample(lay.vocab)}  # data/sample.bin: the generated learnable sample (--data)",
        "# FLOP basis of the logged TFLOP/s and MFU (autopar estimate's) and the predicted figures",
        basis.replace("nan", "math.nan"),
    ]


def _n_params(plan: Plan) -> int:
    from autopar.profiles.models import build_model

    return sum(p.numel() for p in build_model(plan.model, "meta").parameters())


def _const(name: str, value, comment: str) -> str:
    """``NAME = value  # comment``, wrapped to stay readable (and under the line limit) when long."""
    one = f"{name} = {value!r}  # {comment}"
    if len(one) <= 110:
        return one
    body = pprint.pformat(value, width=100, compact=True).replace("\n", "\n" + " " * (len(name) + 3))
    return f"# {comment}\n{name} = {body}"


def _ranges(ids: list[int]) -> str:
    """[0, 1, 2, 5] -> '0-2, 5'."""
    out, start = [], None
    for i, x in enumerate(ids):
        if start is None:
            start = x
        if i + 1 == len(ids) or ids[i + 1] != x + 1:
            out.append(f"{start}-{x}" if x > start else f"{x}")
            start = None
    return ", ".join(out)


def _step(lay: Layout) -> str:
    if lay.pp > 1:
        return ("                with autocast:\n"
                "                    loss_sum = rt.pp_step(schedule, stage_ids, N_STAGES, inputs, targets)")
    return "                loss_sum = rt.train_step(parts[0], inputs, targets, N_MICRO, autocast)"


# ----- README -------------------------------------------------------------------------
def render_readme(plan: Plan, lay: Layout, device: str) -> str:
    nodes, procs, world = _procs(plan)
    cmds = "\n".join(launch_commands(plan))
    notes = "".join(f"- {n}\n" for n in lay.notes)
    unit = "GPUs" if device == "cuda" else "CPU processes"
    sample = ("| `data/sample.bin` | a generated learnable sample (its text: `data/sample.txt`), the default "
              "`--data` |\n" if has_sample(lay.vocab) else "")
    return f"""# {plan.model.name}: {plan.strategy.short()}

Generated by `autopar emit` (autopar {__version__}) for {plan.cluster.short()}:
{nodes} node(s) x {procs} {unit} per node, world size {world}, device `{device}`.
Network the plan was priced with: {network_line(plan)}.

| file | what |
|---|---|
| `train.py` | the training program (plan summary in its docstring) |
| `autopar_rt/` | its runtime (copied from autopar): nodes need only python and torch |
| `launch_torchrun.sh` | torchrun, single node or one call per node |
| `launch_slurm.sbatch` | Slurm: srun starts torchrun on each node, c10d rendezvous, requeue |
| `pytorchjob.yaml` | Kubeflow PyTorchJob (image from `autopar emit --image`) |
| `plan.json` | the plan this folder was generated from |
{sample}
## Run

```bash
{cmds}
```

Options of `train.py` (`--help` lists all): `--steps N`, `--data PATH` (nanoGPT-style flat
uint16/uint32 token file or a folder of `*.bin` shards; `synthetic` for random tokens),
`--lr`, `--warmup-steps`, `--lr-decay cosine|linear|constant`, `--grad-clip`, `--log-every`,
`--metrics-file FILE.jsonl`, `--profile-steps 5,6`, `--ckpt-every N`, `--resume auto|never|PATH`,
`--device cpu` (gloo: any plan runs on a laptop with a small model).

Each logged line prints `step= loss= lr= grad_norm= step_time_s= tokens_per_s= tflops_per_gpu=
mfu= peak_mem_bytes=` and the plan's `pred_step_time_s= pred_mfu= pred_peak_mem_bytes=`; the loss
is the mean over the global batch, so it does not depend on the strategy.

{notes}"""
