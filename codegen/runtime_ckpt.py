"""Checkpoints of the emitted programs: ``torch.distributed.checkpoint`` (DCP), plan-independent.

``CheckpointManager`` saves every N steps (asynchronously where DCP can), keeps the last K and
resumes from the newest *complete* checkpoint, so a SLURM requeue or a pod restart goes on
where it stopped. A checkpoint holds the model, the optimizer, the learning-rate scheduler,
the data sampler and every rank's RNG state, plus the plan that wrote it (``meta.json``).

Why any plan can load any other plan's checkpoint (docs/elastic.md):

- keys are global FQNs: pipeline stages keep the full model's layer names (``layers`` is a
  ``ModuleDict`` keyed by global index) and wrapper prefixes are stripped;
- expert weights and their optimizer states are saved per expert id (``...w1.expert5``), so
  the expert placement and the ep degree do not appear in the keys;
- tensors are DTensors (tp, FSDP2) or plain tensors; DCP records global shapes and offsets
  and reshards on load, whatever dp / ZeRO / tp / sp / cp / pp / ep the reader runs.

On disk: ``DIR/step-00000012/`` with DCP's files, ``train_state.pt`` (step, scheduler,
sampler, RNG of every rank), ``meta.json`` (plan, step, model identity) and ``COMPLETE``.
Everything is written into ``step-00000012.tmp/`` first; the marker is written last and the
folder renamed atomically, so a checkpoint killed half-way is never picked up.

Imports only torch, the standard library and runtime_ckpt_zero1: the run folder needs nothing else.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import random
import re
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor

import autopar.codegen.runtime_ckpt_zero1 as z1

MARKER = "COMPLETE"
META = "meta.json"
TRAIN_STATE = "train_state.pt"
INDEX = ".metadata"   # DCP's index of the saved tensors and objects (torch.distributed.checkpoint's file name)
FORMAT = 1  # bump when the on-disk layout changes
_STEP_DIR = re.compile(r"^step-(\d+)$")
# wrappers that insert a level into parameter names (activation checkpointing, DDP, compile);
# the same list as runtime.clean_fqn (kept here so this module imports nothing of autopar)
_WRAPPER_PREFIXES = ("_checkpoint_wrapped_module.", "module.", "_orig_mod.")


class CheckpointMismatch(ValueError):
    """A checkpoint this program cannot load: missing, half-written, corrupt, of another format or of another
    model (one line naming the file or field, and the fix)."""


@dataclass
class TrainState:
    """What a checkpoint holds besides RNG: this rank's model parts and their optimizers (one per
    part), the LR schedulers (one per optimizer, all on the same schedule) and the data sampler
    (``state_dict()`` / ``load_state_dict()``, its position global, not per rank)."""

    parts: list
    optimizers: list
    schedulers: list = field(default_factory=list)
    sampler: object | None = None


# ----- model identity -----------------------------------------------------------------
def model_identity(model: nn.Module, name: str, vocab: int) -> dict:
    """Name, vocabulary, parameter count and a hash of every (name, global shape) of the
    *whole* model (build it on the meta device): equal for every plan of the same model."""
    rows, count = [], 0
    for pname, p in model.named_parameters(remove_duplicate=False):
        rows.append(f"{clean_fqn(pname)}:{tuple(p.shape)}")
        count += p.numel()
    digest = hashlib.sha256("\n".join(sorted(rows)).encode()).hexdigest()[:16]
    return {"name": name, "vocab": int(vocab), "n_params": int(count), "shapes_sha256": digest}


def check_identity(saved: dict, current: dict) -> None:
    """Refuse a checkpoint of another model: one line naming the first field that differs."""
    for key, what in (("name", "model"), ("vocab", "vocabulary size"), ("n_params", "parameter count"),
                      ("shapes_sha256", "parameter names/shapes")):
        if saved.get(key) != current.get(key):
            raise CheckpointMismatch(f"checkpoint: {what} {saved.get(key)!r} differs from this program's "
                                     f"{current.get(key)!r}; fix: resume with a checkpoint of the same model")


def clean_fqn(name: str) -> str:
    for prefix in _WRAPPER_PREFIXES:
        name = name.replace(prefix, "")
    return name


# ----- plan-independent state dicts -----------------------------------------------------
def _state_dicts(parts: list[nn.Module], optimizers: list, for_load: bool = False) -> tuple[list, list]:
    """Per part: model and flattened optimizer state dicts (``get_state_dict``'s keys). ZeRO-1's
    ``ShardedAdamW`` through runtime_ckpt_zero1: gathered for a save, placeholders for a load."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_state_dict

    opts = StateDictOptions(flatten_optimizer_state_dict=True)
    models, optims = [], []
    for part, opt in zip(parts, optimizers):
        if z1.is_sharded_adamw(opt):
            opt.wait_params()  # the step's weight all-gather lands before the weights are read (or loaded)
            m = get_model_state_dict(part, options=opts)
            if for_load:
                weights, o = z1.placeholders(part, opt, clean_fqn)
            else:
                weights, o = z1.master_weights(part, opt, clean_fqn), z1.optim_state(part, opt, clean_fqn)
            m.update(weights)
        else:
            m, o = get_state_dict(part, getattr(opt, "optim", opt), options=opts)  # ZeroRedundancyOptimizer: local
        models.append(m)
        optims.append(o)
    return models, optims


def _expert_ids(parts: list[nn.Module]) -> dict:
    """Clean FQN of each expert-parallel weight -> the global expert id of each local row."""
    ids = {}
    for part in parts:
        for name, mod in part.named_modules():
            if hasattr(mod, "local_expert_ids"):
                for pname, _ in mod.named_parameters():
                    ids[clean_fqn(f"{name}.{pname}")] = mod.local_expert_ids
    return ids


def _per_expert(sd: dict, parts: list[nn.Module]) -> dict:
    """Expert-parallel weights differ across ranks under one name; give each expert its own key
    (``...experts.w1.expert5``) so the checkpoint holds every expert once, whatever the placement.
    The values are views: DCP loads into them in place."""
    ids = _expert_ids(parts)
    out = {}
    for key, val in sd.items():
        fqn = key.removeprefix("state.").rsplit(".", 1)[0] if key.startswith("state.") else key
        expert_ids = ids.get(fqn)
        if expert_ids is None or not isinstance(val, torch.Tensor) or val.ndim == 0:
            out[key] = val
            continue
        local, offset = val, 0
        if isinstance(val, DTensor):  # FSDP over edp: this rank holds rows [offset, offset+n)
            from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

            offset = compute_local_shape_and_global_offset(val.shape, val.device_mesh, val.placements)[1][0]
            local = val.to_local()
        for j in range(local.shape[0]):
            out[f"{key}.expert{expert_ids[offset + j]}"] = local[j]
    return out


def _flat(dicts: list[dict], parts) -> dict:
    merged = {}
    for d in dicts:
        merged.update(d)
    return _per_expert(merged, parts)


def dcp_state(parts: list[nn.Module], optimizers: list, for_load: bool = False) -> tuple[dict, list, list]:
    """``{"model": ..., "optim": ...}`` with plan-independent keys, and the per-part dicts that
    ``set_state_dict`` needs after a load (the flat one holds views of their tensors)."""
    models, optims = _state_dicts(parts, optimizers, for_load)
    return {"model": _flat(models, parts), "optim": _flat(optims, parts)}, models, optims


# ----- RNG, scheduler, sampler ------------------------------------------------------------
def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _train_state(step: int, state: TrainState) -> dict:
    """Step, scheduler, sampler (the same on every rank: rank 0's) and every rank's RNG state,
    gathered to rank 0, which writes the file."""
    rngs = [None] * dist.get_world_size()
    dist.all_gather_object(rngs, _rng_state())
    return {"step": step, "world": dist.get_world_size(), "rng": rngs,
            "scheduler": state.schedulers[0].state_dict() if state.schedulers else None,
            "sampler": state.sampler.state_dict() if state.sampler is not None else None}


def _restore_train_state(saved: dict, state: TrainState) -> None:
    """Scheduler and sampler into every rank; RNG: rank r's own state when the rank count is
    unchanged (an exact restart), else rank 0's (a new layout draws differently anyway)."""
    for sched in state.schedulers:
        if saved.get("scheduler") is not None:
            sched.load_state_dict(saved["scheduler"])
    if state.sampler is not None and saved.get("sampler") is not None:
        state.sampler.load_state_dict(saved["sampler"])
    rank = dist.get_rank()
    rngs = saved["rng"]
    _set_rng_state(rngs[rank] if saved.get("world") == dist.get_world_size() else rngs[0])


# ----- finding checkpoints ----------------------------------------------------------------
def step_of(path: str | os.PathLike) -> int | None:
    m = _STEP_DIR.match(Path(path).name)
    return int(m.group(1)) if m else None


def is_complete(path: str | os.PathLike) -> bool:
    """A finished checkpoint: renamed from ``.tmp`` and holding the marker written last."""
    p = Path(path)
    return p.is_dir() and step_of(p) is not None and (p / MARKER).is_file()


def complete_checkpoints(ckpt_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoints in ``ckpt_dir``, oldest first (half-written ones are skipped)."""
    root = Path(ckpt_dir)
    if not root.is_dir():
        return []
    return sorted((p for p in root.iterdir() if is_complete(p)), key=step_of)


def latest_checkpoint(ckpt_dir: str | os.PathLike) -> Path | None:
    found = complete_checkpoints(ckpt_dir)
    return found[-1] if found else None


def find_checkpoint(path: str | os.PathLike) -> Path:
    """The complete, readable ``step-N`` folder ``path`` names: itself, or the newest complete one in the
    ``--ckpt-dir`` it is (``autopar inspect-checkpoint`` / ``reshard``)."""
    return checkpoint_and_meta(path)[0]


def checkpoint_and_meta(path: str | os.PathLike) -> tuple[Path, dict]:
    """``find_checkpoint``'s folder and its ``read_meta`` (``train.py --resume PATH`` passes it to
    ``load_checkpoint``)."""
    p = Path(path)
    if not p.exists():
        raise CheckpointMismatch(f"checkpoint: {p} does not exist; fix: pass a step-N folder train.py wrote or "
                                 "the --ckpt-dir holding them")
    step = p if is_complete(p) else latest_checkpoint(p) if p.is_dir() and step_of(p) is None else None
    if step is None:
        raise CheckpointMismatch(f"checkpoint: {p} is not a complete step-N checkpoint (no {MARKER} marker) nor a "
                                 "folder holding one; fix: pass a folder train.py --ckpt-dir wrote")
    return step, read_meta(step)


def read_meta(path: str | os.PathLike) -> dict:
    """``meta.json`` of a complete checkpoint whose files are all there: a folder with the marker but its
    metadata, tensor index or train state missing or corrupt was copied or edited by hand, not written by
    train.py (``finalize`` writes the marker last)."""
    p = Path(path)
    if not is_complete(p):
        raise CheckpointMismatch(f"checkpoint: {p} is not a complete checkpoint (no {MARKER} marker in a "
                                 "step-N folder); fix: pass a step-N folder written to the end")
    try:
        meta = json.loads((p / META).read_text())
        problem = None if isinstance(meta, dict) else f"{META} holds no JSON object"
    except FileNotFoundError:
        problem = f"{META} is missing"
    except ValueError as exc:   # JSONDecodeError, UnicodeDecodeError
        problem = f"{META} is not valid JSON ({exc})"
    if problem is None and not (p / INDEX).is_file():
        problem = f"{INDEX} (the tensors' index) is missing"
    if problem is None and not (p / TRAIN_STATE).is_file():
        problem = f"{TRAIN_STATE} (step, scheduler, sampler, RNG) is missing"
    if problem:
        raise CheckpointMismatch(f"checkpoint: {p}: {problem}; fix: pass a checkpoint train.py wrote (copy the "
                                 "whole step-N folder)")
    return meta


def _write_file(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def finalize(tmp: Path, meta: dict, train_state: dict) -> Path:
    """Rank 0, once every rank's shards are on disk: metadata, train state, the marker (last),
    then the atomic rename ``step-N.tmp`` -> ``step-N``."""
    import io

    buf = io.BytesIO()
    torch.save(train_state, buf)
    _write_file(tmp / TRAIN_STATE, buf.getvalue())
    _write_file(tmp / META, (json.dumps(meta, indent=1) + "\n").encode())
    _write_file(tmp / MARKER, b"ok\n")
    final = tmp.with_name(tmp.name.removesuffix(".tmp"))
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    return final


def _crash_for_tests(step: int) -> None:
    """``AUTOPAR_CKPT_CRASH_AT_STEP=N``: die during the save of step N, shards written but no
    marker yet (the kill-during-save test; a real kill can land anywhere before the rename)."""
    if os.environ.get("AUTOPAR_CKPT_CRASH_AT_STEP") == str(step):
        print(f"AUTOPAR_CKPT_CRASH_AT_STEP: killed during the save of step {step}", file=sys.stderr, flush=True)
        os._exit(17)


# ----- save / load --------------------------------------------------------------------------
def _copy_objects(flat: dict, models: list, optims: list) -> None:
    """DCP loads tensors in place (the per-part dicts share them) but replaces other values (the
    param groups' lr, betas, ...) in the dict it was given: copy those back into the per-part dicts."""
    for section, dicts in (("model", models), ("optim", optims)):
        for d in dicts:
            for key, val in d.items():
                if not isinstance(val, torch.Tensor) and key in flat[section]:
                    d[key] = flat[section][key]


def load_checkpoint(path: str | os.PathLike, state: TrainState, identity: dict | None = None,
                    meta: dict | None = None) -> int:
    """Load a complete checkpoint written under any plan into this rank's parts (in place);
    returns its step. ``identity``: refuse another model's checkpoint before touching anything;
    ``meta``: its ``read_meta``, where the caller read it (``checkpoint_and_meta``)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, set_state_dict

    meta = read_meta(path) if meta is None else meta
    if meta.get("format") != FORMAT:
        raise CheckpointMismatch(f"checkpoint: format {meta.get('format')!r} is not {FORMAT}; "
                                 "fix: convert it with `autopar reshard`")
    if identity is not None:
        check_identity(meta.get("model", {}), identity)
    flat, models, optims = dcp_state(state.parts, state.optimizers, for_load=True)
    try:
        dcp.load(flat, checkpoint_id=str(path))  # fills the views above, resharding from the saved layout
    except CheckpointException as exc:   # DCP raises it on every rank, whichever rank's read failed
        raise CheckpointMismatch(f"checkpoint: {path}: its tensors do not load ({_first_line(exc)}); fix: pass a "
                                 "checkpoint train.py wrote (copy the whole step-N folder)") from None
    _copy_objects(flat, models, optims)
    opts = StateDictOptions(flatten_optimizer_state_dict=True)
    for part, opt, m, o in zip(state.parts, state.optimizers, models, optims):
        if z1.is_sharded_adamw(opt):
            set_model_state_dict(part, m, options=opts)
            z1.load_optim_state(part, opt, o, m, clean_fqn)
        else:
            set_state_dict(part, getattr(opt, "optim", opt), model_state_dict=m, optim_state_dict=o, options=opts)
    saved = read_train_state(path)
    _restore_train_state(saved, state)
    return int(saved["step"])


def read_train_state(path: str | os.PathLike) -> dict:
    """``train_state.pt`` of checkpoint ``path`` (step, scheduler, sampler, every rank's RNG)."""
    return _read(Path(path) / TRAIN_STATE, lambda p: torch.load(p, weights_only=True))


def read_index(path: str | os.PathLike) -> dict:
    """DCP's index of checkpoint ``path`` (``.metadata``): each saved key's tensor or object metadata."""
    from torch.distributed.checkpoint import FileSystemReader

    return _read(Path(path) / INDEX, lambda p: FileSystemReader(str(p.parent)).read_metadata()
                 ).state_dict_metadata


def _read(p: Path, load):
    """``load(p)``, a truncated or foreign file refused in one line."""
    try:
        return load(p)
    except (pickle.UnpicklingError, EOFError, RuntimeError) as exc:
        raise CheckpointMismatch(f"checkpoint: {p} does not load ({_first_line(exc)}); fix: pass a checkpoint "
                                 "train.py wrote (copy the whole step-N folder)") from None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


class CheckpointManager:
    """Save every ``every`` steps into ``ckpt_dir/step-N``, keep the newest ``keep`` (0: all),
    resume from the newest complete one. The plan (``plan_path``, plan.json) and ``identity``
    (``model_identity``) are recorded in each checkpoint; ``identity`` also guards loads.

    ``async_save``: ``dcp.async_save`` stages the state in host memory and writes it in a
    background thread over a separate gloo group (so it never interleaves with the training
    collectives); the next save, or ``close()``, waits for it. Rank 0 finalizes (marker, rename,
    rotation) once its write finished, which DCP only reports after every rank's shards are on disk.
    """

    def __init__(self, ckpt_dir: str | os.PathLike, every: int, keep: int = 3, plan_path: str | None = None,
                 identity: dict | None = None, async_save: bool = True):
        self.dir, self.every, self.keep = Path(ckpt_dir), int(every), int(keep)
        self.plan = json.loads(Path(plan_path).read_text()) if plan_path else {}
        self.identity, self.async_save = identity or {}, async_save
        self._pending = None
        self._group = dist.new_group(backend="gloo") if async_save and every > 0 else None

    def resume(self, state: TrainState, resume: str = "auto") -> int:
        """The step to continue after: 0 for a fresh start (``never``, or ``auto`` without a
        complete checkpoint), else the loaded checkpoint's. ``resume`` = auto | never | PATH.
        A checkpoint of another model stops the program with one line (exit 2)."""
        if dist.get_rank() == 0:
            self._remove_partial()
        if resume == "never":
            return 0
        try:   # PATH: a step-N folder, or a --ckpt-dir of another run (its newest complete one)
            path, meta = (latest_checkpoint(self.dir), None) if resume == "auto" else checkpoint_and_meta(resume)
            step = 0 if path is None else load_checkpoint(path, state, self.identity or None, meta)
        except CheckpointMismatch as err:  # every rank reads the same files, so every rank is here
            if dist.get_rank() == 0:
                print(f"error: {err}", file=sys.stderr, flush=True)
            dist.barrier()  # the line is out before any rank exits (torchrun then stops the others)
            raise SystemExit(2) from None
        if path is None:
            return 0
        if dist.get_rank() == 0:
            print(f"resumed from {path} (step {step}, plan {self._plan_of(path)})", flush=True)
        return step

    def maybe_save(self, step: int, state: TrainState, force: bool = False) -> Path | None:
        """Save at multiples of ``every`` (or when ``force``); returns the final folder."""
        if not force and (self.every <= 0 or step % self.every):
            return None
        self.wait()
        tmp = self.dir / f"step-{step:08d}.tmp"
        if dist.get_rank() == 0:
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir(parents=True)
        dist.barrier()
        flat, _, _ = dcp_state(state.parts, state.optimizers)
        extra = _train_state(step, state)
        meta = {"format": FORMAT, "step": step, "world": dist.get_world_size(), "model": self.identity,
                "plan": self.plan}
        if self.async_save:
            self._save_async(flat, tmp, meta, extra, step)
        else:
            import torch.distributed.checkpoint as dcp

            dcp.save(flat, checkpoint_id=str(tmp))
            self._finish(tmp, meta, extra, step)
            dist.barrier()  # the folder is final on every rank's return
        return tmp.with_name(tmp.name.removesuffix(".tmp"))

    def _save_async(self, flat: dict, tmp: Path, meta: dict, extra: dict, step: int) -> None:
        import torch.distributed.checkpoint as dcp

        fut = dcp.async_save(flat, checkpoint_id=str(tmp), process_group=self._group)
        fut = getattr(fut, "upload_completion", fut)  # AsyncSaveResponse (stager variants) or Future
        self._pending = (fut, tmp, meta, extra, step)

    def wait(self) -> None:
        """Block until the save in flight (if any) is written and, on rank 0, finalized."""
        if self._pending is None:
            return
        fut, tmp, meta, extra, step = self._pending
        self._pending = None
        fut.result()
        self._finish(tmp, meta, extra, step)

    def close(self) -> None:
        self.wait()
        dist.barrier()

    def _finish(self, tmp: Path, meta: dict, extra: dict, step: int) -> None:
        if dist.get_rank() != 0:
            return
        _crash_for_tests(step)
        finalize(tmp, meta, extra)
        self._rotate()

    def _rotate(self) -> None:
        if self.keep > 0:
            for old in complete_checkpoints(self.dir)[:-self.keep]:
                shutil.rmtree(old, ignore_errors=True)

    def _remove_partial(self) -> None:
        """``step-N.tmp`` folders are saves that never finished (killed): never loaded, removed."""
        if self.dir.is_dir():
            for p in self.dir.glob("step-*.tmp"):
                shutil.rmtree(p, ignore_errors=True)

    @staticmethod
    def _plan_of(path: Path) -> str:
        strategy = read_meta(path).get("plan", {}).get("strategy", {})
        keys = ("dp", "tp", "pp", "cp", "ep", "zero_stage")
        return ",".join(f"{k}={strategy[k]}" for k in keys if k in strategy) or "unknown"
